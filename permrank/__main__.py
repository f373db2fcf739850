import sys

from permrank.cli.main import main

sys.exit(main())
