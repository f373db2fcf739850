"""The ``permrank`` command. Only the CLI prints; the library logs.

Commands are registered by modules in ``permrank.cli`` (one file a command or group), so a
new command is one new file listed in ``COMMAND_MODULES``.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import os
import sys
from typing import Any, NoReturn

from permrank.cli import interrupt
from permrank.core.errors import PermrankError

COMMAND_MODULES = (
    "permrank.cli.rerank",
    "permrank.cli.evaluate",
    "permrank.cli.simulate",
    "permrank.cli.serve",
    "permrank.cli.models",
    "permrank.cli.distill",
    "permrank.cli.demo",
)


class Parser(argparse.ArgumentParser):
    """argparse, with a mistyped flag reported by the subcommand it was given to (its usage,
    not the top-level one) and the closest flag it has ("did you mean --window-size?")."""

    def parse_known_args(  # type: ignore[override]
        self, args: Any = None, namespace: Any = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self._given = list(sys.argv[1:] if args is None else args)
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and getattr(self, "strict", False):
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    def suggestions(self) -> list[str]:
        """'did you mean' hints for the flags given that this parser does not know."""
        if not getattr(self, "strict", False):  # the top level: its flags are the commands'
            return []
        known = [o for o in self._option_string_actions if o.startswith("--")]
        hints = []
        for token in getattr(self, "_given", []):
            flag = token.split("=", 1)[0]
            if not flag.startswith("--") or flag in self._option_string_actions:
                continue
            if [o for o in known if o.startswith(flag)]:  # an abbreviation argparse takes
                continue
            close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
            if close:
                hints.append(f"{flag}: did you mean {close[0]}?")
            else:
                hints.append(f"{flag}: no such option (see {self.prog} --help)")
        return hints

    def error(self, message: str) -> NoReturn:
        hints = [] if "invalid choice" in message else self.suggestions()
        if "invalid choice" in message and self._subparsers is not None:
            for action in self._subparsers._group_actions:
                choices = getattr(action, "choices", None) or {}
                for token in getattr(self, "_given", []):
                    close = difflib.get_close_matches(token, list(choices), n=1, cutoff=0.6)
                    if token not in choices and close and not token.startswith("-"):
                        hints.append(f"{token}: did you mean {close[0]}?")
                        break
        if hints:
            message = message + "\n  " + "\n  ".join(hints)
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="permrank",
        description="Listwise reranking with large language models.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    commands = list(sub.choices.values())
    while commands:  # every (sub)command reports unknown flags with its own usage
        command = commands.pop()
        command.strict = True  # type: ignore[attr-defined]
        for action in command._subparsers._group_actions if command._subparsers else []:
            commands.extend((getattr(action, "choices", None) or {}).values())
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="permrank: %(levelname)s: %(message)s")
    for noisy in ("httpx", "openai", "httpcore"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    try:
        with interrupt.watching():
            status = int(args.func(args) or 0)
            interrupt.check()  # a Ctrl-C whose exception a finaliser swallowed
        return status
    except PermrankError as exc:
        print(f"permrank {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `permrank eval ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        note = getattr(args, "interrupted_note", "")
        print(f"permrank {args.command}: interrupted{note}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
