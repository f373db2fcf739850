"""The ``permrank`` command. Only the CLI prints; the library logs.

Commands are registered by modules in ``permrank.commands`` (one file a command or group), so a
new command is one new file listed in ``COMMAND_MODULES``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import PermrankError

COMMAND_MODULES = (
    "permrank.commands.rerank",
    "permrank.commands.evaluate",
    "permrank.commands.simulate",
    "permrank.commands.serve",
    "permrank.commands.models",
    "permrank.commands.distill",
    "permrank.commands.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="permrank",
        description="Listwise reranking with large language models.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="permrank: %(levelname)s: %(message)s")
    for noisy in ("httpx", "openai", "httpcore"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    try:
        return int(args.func(args) or 0)
    except PermrankError as exc:
        print(f"permrank {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        note = getattr(args, "interrupted_note", "")
        print(f"permrank {args.command}: interrupted{note}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
