"""``permrank serve ...``: start a model server and keep it running for repeated use.

Each server kind registers its own sub-command from its module (``permrank.servers.*``).
"""

from __future__ import annotations

import argparse
import importlib

SERVER_MODULES = ("permrank.servers.llamacpp", "permrank.servers.vllm")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="start a local model server and print its base URL")
    kinds = p.add_subparsers(dest="server", metavar="KIND")
    kinds.required = True
    for name in SERVER_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register_serve(kinds)
