"""Constrained answers: force a window's answer into the ``[i] > [j] > ...`` shape. Pure.

Three forms, one per kind of server:

- ``grammar``: a GBNF grammar (llama.cpp's ``grammar`` request field). For windows of up to
  ``EXACT_GRAMMAR_MAX`` passages it is an exact permutation grammar (one rule per set of
  identifiers still to be written: 2^n rules), so the answer needs no repair at all. Larger
  windows get a format grammar: exactly n bracketed identifiers in 1..n joined by `` > ``, where
  duplicates (and so missing identifiers) are still possible and repaired by the parser.
- ``regex``: a regular expression (vLLM's ``structured_outputs: {"regex": ...}``). Exact for up
  to ``EXACT_REGEX_MAX`` passages (the regex is the tree of all permutations, n! leaves), the
  format only above.
- ``json``: ``response_format`` with a JSON schema (OpenAI, vLLM, llama.cpp): an object
  ``{"ranking": [3, 1, 2]}`` with exactly n integers in 1..n. JSON Schema cannot forbid
  duplicates portably (``uniqueItems`` is not supported by strict decoders), so they are repaired.
  ``json_answer_as_ranking`` turns the answer back into ``[3] > [1] > [2]`` for the parser.

``window_fields(mode, n)`` is the extra request body for a window of ``n`` passages.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Literal

from permrank.core.errors import ConfigError

ConstrainMode = Literal["grammar", "regex", "json"]
CONSTRAIN_MODES: tuple[str, ...] = ("grammar", "regex", "json")
SEPARATOR = " > "
EXACT_GRAMMAR_MAX = 10
"""Largest window given an exact permutation grammar (2^10 = 1024 rules)."""
EXACT_REGEX_MAX = 6
"""Largest window given an exact permutation regex (6! = 720 leaves)."""
JSON_KEY = "ranking"


def _check(n: int) -> None:
    if n < 1:
        raise ConfigError(f"a window has at least one passage (got {n})")


def _identifier_alternatives(n: int) -> list[str]:
    return [str(i) for i in range(n, 0, -1)]  # longest first: "10" before "1"


def _gbnf_literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@functools.lru_cache(maxsize=64)
def permutation_grammar(n: int, *, exact_max: int = EXACT_GRAMMAR_MAX) -> str:
    """GBNF for an answer about ``n`` passages; an exact permutation when ``n <= exact_max``."""
    _check(n)
    if n <= exact_max:
        return _exact_grammar(n)
    ident = " | ".join(_gbnf_literal(f"[{i}]") for i in range(1, n + 1))
    body = (" " + _gbnf_literal(SEPARATOR) + " ").join(["id"] * n)
    return f"root ::= {body}\nid ::= {ident}\n"


def _exact_grammar(n: int) -> str:
    """One rule per non-empty set of identifiers left to write (a bit mask)."""
    full = (1 << n) - 1
    rules = [f"root ::= r{full:x}"]
    for mask in range(1, full + 1):
        alternatives = []
        for i in range(n):
            bit = 1 << i
            if not mask & bit:
                continue
            rest = mask & ~bit
            item = _gbnf_literal(f"[{i + 1}]")
            if rest:
                item += f" {_gbnf_literal(SEPARATOR)} r{rest:x}"
            alternatives.append(item)
        rules.append(f"r{mask:x} ::= " + " | ".join(alternatives))
    return "\n".join(rules) + "\n"


@functools.lru_cache(maxsize=64)
def permutation_regex(n: int, *, exact_max: int = EXACT_REGEX_MAX) -> str:
    """A regex for an answer about ``n`` passages; an exact permutation when ``n <= exact_max``."""
    _check(n)
    if n <= exact_max:
        return _exact_regex(tuple(range(1, n + 1)))
    ident = r"\[(?:" + "|".join(_identifier_alternatives(n)) + r")\]"
    return ident + "(?:" + SEPARATOR + ident + "){" + str(n - 1) + "}"


def _exact_regex(left: tuple[int, ...]) -> str:
    if len(left) == 1:
        return rf"\[{left[0]}\]"
    branches = [
        rf"\[{i}\]" + SEPARATOR + _exact_regex(tuple(j for j in left if j != i)) for i in left
    ]
    return "(?:" + "|".join(branches) + ")"


def permutation_json_schema(n: int) -> dict[str, Any]:
    """JSON Schema of ``{"ranking": [n integers in 1..n]}``."""
    _check(n)
    return {
        "type": "object",
        "properties": {
            JSON_KEY: {
                "type": "array",
                "items": {"type": "integer", "enum": list(range(1, n + 1))},
                "minItems": n,
                "maxItems": n,
            }
        },
        "required": [JSON_KEY],
        "additionalProperties": False,
    }


def window_fields(mode: str, n: int) -> dict[str, Any]:
    """The extra request fields that constrain the answer about a window of ``n`` passages."""
    if mode == "grammar":
        return {"grammar": permutation_grammar(n)}
    if mode == "regex":
        return {"structured_outputs": {"regex": permutation_regex(n)}}
    if mode == "json":
        return {
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "ranking",
                    "strict": True,
                    "schema": permutation_json_schema(n),
                },
            }
        }
    raise ConfigError(
        f"unknown constrain mode {mode!r}; choose one of {', '.join(CONSTRAIN_MODES)}"
    )


def json_answer_as_ranking(answer: str) -> str:
    """``{"ranking": [3, 1, 2]}`` -> ``[3] > [1] > [2]``; any other text is returned unchanged."""
    try:
        data = json.loads(answer)
    except ValueError:
        return answer
    ranking = data.get(JSON_KEY) if isinstance(data, dict) else data
    if not isinstance(ranking, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in ranking
    ):
        return answer
    return SEPARATOR.join(f"[{i}]" for i in ranking)


SERVER_MODES: dict[str, ConstrainMode] = {"llama.cpp": "grammar", "vllm": "regex"}


def mode_for_server(kind: str) -> ConstrainMode:
    """``--constrain auto``: a grammar for llama.cpp, a regex for vLLM, JSON schema otherwise."""
    return SERVER_MODES.get(kind, "json")


UNSUPPORTED: dict[str, set[str]] = {"llama.cpp": {"regex"}, "vllm": {"grammar"}}
"""Modes a server silently ignores (so they would constrain nothing)."""


def check_mode(mode: str, kind: str) -> None:
    """Refuse a mode the server would silently ignore."""
    if mode not in CONSTRAIN_MODES:
        raise ConfigError(
            f"unknown constrain mode {mode!r}; choose one of {', '.join(CONSTRAIN_MODES)} or auto"
        )
    if mode in UNSUPPORTED.get(kind, set()):
        raise ConfigError(
            f"--constrain {mode} is ignored by a {kind} server (it would constrain nothing); "
            f"use --constrain {mode_for_server(kind)} (or auto)"
        )
