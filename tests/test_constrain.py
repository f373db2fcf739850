"""The constrain builders: the languages their grammars, regexes and schemas accept."""

from __future__ import annotations

import itertools
import json
import re

import pytest

from permrank.core.constrain import (
    EXACT_GRAMMAR_MAX,
    EXACT_REGEX_MAX,
    check_mode,
    json_answer_as_ranking,
    mode_for_server,
    permutation_grammar,
    permutation_json_schema,
    permutation_regex,
    window_fields,
)
from permrank.core.errors import ConfigError
from permrank.core.parse import parse_permutation


def gbnf_language(grammar: str) -> set[str]:
    """Every string a (finite, literal-only) GBNF grammar of the form we build derives."""
    rules: dict[str, list[list[str]]] = {}
    for line in grammar.strip().splitlines():
        name, body = line.split(" ::= ")
        rules[name] = [re.findall(r'"(?:[^"\\]|\\.)*"|[\w-]+', alt) for alt in body.split(" | ")]

    def derive(symbol: str) -> set[str]:
        out: set[str] = set()
        for alternative in rules[symbol]:
            strings = {""}
            for part in alternative:
                if part.startswith('"'):
                    pieces = {json.loads(part)}
                else:
                    pieces = derive(part)
                strings = {s + p for s in strings for p in pieces}
            out |= strings
        return out

    return derive("root")


def answer(order: tuple[int, ...] | list[int]) -> str:
    return " > ".join(f"[{i}]" for i in order)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_exact_grammar_derives_exactly_the_permutations(n: int) -> None:
    language = gbnf_language(permutation_grammar(n))
    assert language == {answer(p) for p in itertools.permutations(range(1, n + 1))}


def test_exact_grammar_size_grows_as_two_to_the_n() -> None:
    lines = permutation_grammar(EXACT_GRAMMAR_MAX).strip().splitlines()
    assert len(lines) == 2**EXACT_GRAMMAR_MAX  # root + one rule per non-empty subset


def test_format_grammar_above_the_exact_limit_forces_n_identifiers_in_range() -> None:
    n = 3
    language = gbnf_language(permutation_grammar(n, exact_max=2))
    assert language == {answer(p) for p in itertools.product(range(1, n + 1), repeat=n)}
    big = permutation_grammar(20)
    assert big.count('"[') == 20 and '"[21]"' not in big
    assert big.splitlines()[0].count("id") == 20


@pytest.mark.parametrize("n", [1, 3, 4])
def test_exact_regex_accepts_permutations_only(n: int) -> None:
    pattern = re.compile(permutation_regex(n))
    for length in (n - 1, n, n + 1):
        for seq in itertools.product(range(1, n + 2), repeat=length):
            is_permutation = sorted(seq) == list(range(1, n + 1))
            assert bool(pattern.fullmatch(answer(seq))) == is_permutation, seq


def test_regex_above_the_exact_limit_forces_the_format_not_uniqueness() -> None:
    n = 12
    assert n > EXACT_REGEX_MAX
    pattern = re.compile(permutation_regex(n))
    assert pattern.fullmatch(answer(range(12, 0, -1)))
    assert pattern.fullmatch(answer([10] * 12))  # duplicates: left to the parser's repair
    assert not pattern.fullmatch(answer(range(1, 12)))  # 11 identifiers
    assert not pattern.fullmatch(answer([13] + list(range(1, 12))))
    assert not pattern.fullmatch("[1]>[2]" + "".join(f" > [{i}]" for i in range(3, 13)))


def test_json_schema_describes_n_identifiers_and_answers_parse_cleanly() -> None:
    schema = permutation_json_schema(4)
    ranking = schema["properties"]["ranking"]
    assert ranking["minItems"] == ranking["maxItems"] == 4
    assert ranking["items"]["enum"] == [1, 2, 3, 4]
    assert schema["required"] == ["ranking"] and schema["additionalProperties"] is False
    text = json_answer_as_ranking('{\n  "ranking": [3, 1, 4, 2]\n}')
    assert text == "[3] > [1] > [4] > [2]"
    order, report = parse_permutation(text, 4)
    assert order == [2, 0, 3, 1] and report.ok
    _, report = parse_permutation(json_answer_as_ranking('{"ranking": [2, 2, 1, 3]}'), 4)
    assert report.repetition == 1 and report.missing == 1


@pytest.mark.parametrize("text", ["[2] > [1]", "not json", '{"ranking": ["a"]}', "[true, 1]"])
def test_json_answer_conversion_leaves_other_text_alone(text: str) -> None:
    assert json_answer_as_ranking(text) == text


def test_window_fields_per_mode() -> None:
    assert window_fields("grammar", 3) == {"grammar": permutation_grammar(3)}
    assert window_fields("regex", 3) == {"structured_outputs": {"regex": permutation_regex(3)}}
    fmt = window_fields("json", 3)["response_format"]
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"]["schema"] == permutation_json_schema(3)
    with pytest.raises(ConfigError, match="unknown constrain mode"):
        window_fields("ebnf", 3)
    with pytest.raises(ConfigError, match="at least one passage"):
        permutation_grammar(0)


def test_modes_by_server_kind() -> None:
    assert mode_for_server("llama.cpp") == "grammar"
    assert mode_for_server("vllm") == "regex"
    assert mode_for_server("openai") == "json"
    assert mode_for_server("unknown") == "json"
    check_mode("json", "vllm")
    with pytest.raises(ConfigError, match="ignored by a vllm server"):
        check_mode("grammar", "vllm")
    with pytest.raises(ConfigError, match="use --constrain grammar"):
        check_mode("regex", "llama.cpp")
