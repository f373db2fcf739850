"""Parsing and repairing window answers: messy answers of the shapes real models give."""

from __future__ import annotations

import time

import pytest

from permrank.core.parse import extract_identifiers, final_answer, parse_permutation
from permrank.core.types import RepairReport


def report(
    *,
    wrong_format: bool = False,
    repetition: int = 0,
    missing: int = 0,
    out_of_range: int = 0,
    refusal: bool = False,
) -> RepairReport:
    ok = not (wrong_format or repetition or missing or out_of_range or refusal)
    return RepairReport(
        ok=ok,
        wrong_format=wrong_format,
        repetition=repetition,
        missing=missing,
        out_of_range=out_of_range,
        refusal=refusal,
    )


ARABIC_INDIC = "٠١٢٣٤٥٦٧٨٩"
FULL_WIDTH = "０１２３４５６７８９"
DEVANAGARI = "०१२३४५६७८९"

CASES = [
    # --- clean answers
    ("clean", "[2] > [1] > [3]", 3, [1, 0, 2], report()),
    ("clean no spaces", "[2]>[3]>[1]", 3, [1, 2, 0], report()),
    ("clean padded", "  [1] > [3] > [2]\n", 3, [0, 2, 1], report()),
    ("clean single", "[1]", 1, [0], report()),
    (
        "clean twenty",
        " > ".join(f"[{i}]" for i in [20, *range(1, 20)]),
        20,
        [19, *range(19)],
        report(),
    ),
    # --- chatter around the answer
    (
        "count in chatter must not rank first",
        "Here is the ranking of the 5 passages: [2] > [1] > [3] > [5] > [4]",
        5,
        [1, 0, 2, 4, 3],
        report(wrong_format=True),
    ),
    (
        "chatter before and after",
        "Sure! Based on relevance:\n[3] > [1] > [2]\nI hope this helps.",
        3,
        [2, 0, 1],
        report(wrong_format=True),
    ),
    (
        "brackets in the explanation after the ranking",
        "Ranking: [2] > [1] > [3]. Note that [3] mentions [1] twice.",
        3,
        [1, 0, 2],
        report(wrong_format=True),
    ),
    (
        "a lone bracket in chatter before the chain",
        "Passage [5] is off-topic. [2] > [1] > [3] > [4]",
        5,
        [1, 0, 2, 3, 4],
        report(wrong_format=True, missing=1),
    ),
    (
        "bare chain inside a sentence",
        "The ranking of the 3 passages is 3 > 1 > 2.",
        3,
        [2, 0, 1],
        report(wrong_format=True),
    ),
    (
        "bare chain after a count in chatter",
        "Here is the ranking of the 5 passages: 2 > 1 > 3 > 5 > 4",
        5,
        [1, 0, 2, 4, 3],
        report(wrong_format=True),
    ),
    ("code fence", "```\n[2] > [1] > [3]\n```", 3, [1, 0, 2], report(wrong_format=True)),
    ("markdown bold", "**[3] > [2] > [1]**", 3, [2, 1, 0], report(wrong_format=True)),
    (
        "an example chain in the chatter is shorter than the answer",
        "Format like [1] > [2]. My answer: [4] > [2] > [3] > [1]",
        4,
        [3, 1, 2, 0],
        report(wrong_format=True),
    ),
    # --- reasoning models
    (
        "think block with a fake ranking",
        "<think>Maybe [3] > [2] > [1]? No, passage 1 is better.</think>\n[1] > [3] > [2]",
        3,
        [0, 2, 1],
        report(),
    ),
    (
        "two think blocks: only the text after the last counts",
        "<think>a [2]</think> hmm <think>b [3] > [1]</think>\n[2] > [3] > [1]",
        3,
        [1, 2, 0],
        report(),
    ),
    (
        "unclosed think block has no answer",
        "<think>I think [2] > [1] > [3] but let me check passage",
        3,
        [0, 1, 2],
        report(wrong_format=True, missing=3),
    ),
    ("upper-case think tags", "<THINK>[1] > [2]</THINK>[2] > [1]", 2, [1, 0], report()),
    (
        "closing tag only (the template opened it)",
        "passage 2 talks about fleas [2]</think>[2] > [1]",
        2,
        [1, 0],
        report(),
    ),
    # --- repetition, missing, out of range
    ("duplicate", "[2] > [2] > [1] > [3]", 3, [1, 0, 2], report(repetition=1)),
    (
        "the model loops",
        "[2] > [1] > [3] > [2] > [1] > [3] > [2]",
        3,
        [1, 0, 2],
        report(repetition=4),
    ),
    ("missing appended in shown order", "[4] > [2]", 5, [3, 1, 0, 2, 4], report(missing=3)),
    ("out of range dropped", "[2] > [7] > [1] > [3]", 3, [1, 0, 2], report(out_of_range=1)),
    (
        "zero is out of range",
        "[0] > [2] > [1]",
        3,
        [1, 0, 2],
        report(out_of_range=1, missing=1),
    ),
    (
        "everything at once",
        "[3] > [9] > [3] > [1]",
        4,
        [2, 0, 1, 3],
        report(repetition=1, out_of_range=1, missing=2),
    ),
    (
        "answer cut by max_tokens",
        "[10] > [2] > [1] > [",
        10,
        [9, 1, 0, 2, 3, 4, 5, 6, 7, 8],
        report(wrong_format=True, missing=7),
    ),
    # --- unicode digits and brackets
    (
        "Arabic-Indic digits",
        f"[{ARABIC_INDIC[3]}] > [{ARABIC_INDIC[1]}] > [{ARABIC_INDIC[2]}]",
        3,
        [2, 0, 1],
        report(wrong_format=True),
    ),
    (
        "full-width digits",
        f"[{FULL_WIDTH[3]}] > [{FULL_WIDTH[1]}] > [{FULL_WIDTH[2]}]",
        3,
        [2, 0, 1],
        report(wrong_format=True),
    ),
    (
        "two-digit Devanagari",
        f"[{DEVANAGARI[1]}{DEVANAGARI[2]}] > [{DEVANAGARI[1]}]",
        12,
        [11, 0, *range(1, 11)],
        report(wrong_format=True, missing=10),
    ),
    ("lenticular brackets", "【3】 > 【1】 > 【2】", 3, [2, 0, 1], report(wrong_format=True)),
    ("full-width brackets", "［2］>［3］>［1］", 3, [1, 2, 0], report(wrong_format=True)),
    ("spaces inside brackets", "[ 2 ] > [ 3 ] > [ 1 ]", 3, [1, 2, 0], report(wrong_format=True)),
    # --- other separators and layouts
    ("double arrows", "[2] >> [1] >> [3]", 3, [1, 0, 2], report(wrong_format=True)),
    ("unicode arrows", "[2] → [1] → [3]", 3, [1, 0, 2], report(wrong_format=True)),
    ("commas", "[3], [1], [2]", 3, [2, 0, 1], report(wrong_format=True)),
    ("spaces only", "[2] [3] [1]", 3, [1, 2, 0], report(wrong_format=True)),
    ("newlines between ids", "[3]\n[1]\n[2]", 3, [2, 0, 1], report(wrong_format=True)),
    (
        "numbered list of bracketed ids",
        "1. [3]\n2. [1]\n3. [2]",
        3,
        [2, 0, 1],
        report(wrong_format=True),
    ),
    (
        "numbered list with passage words",
        "Ranking:\n1. Passage [2] (most relevant)\n2. Passage [3]\n3. Passage [1]",
        3,
        [1, 2, 0],
        report(wrong_format=True),
    ),
    ("bare numbers", "3 > 1 > 2", 3, [2, 0, 1], report(wrong_format=True)),
    ("bare numbers with commas", "3, 1, 2", 3, [2, 0, 1], report(wrong_format=True)),
    (
        "bare Arabic-Indic numbers",
        f"{ARABIC_INDIC[3]} > {ARABIC_INDIC[1]} > {ARABIC_INDIC[2]}",
        3,
        [2, 0, 1],
        report(wrong_format=True),
    ),
    # --- nothing usable
    ("empty answer", "", 4, [0, 1, 2, 3], report(wrong_format=True, missing=4)),
    ("whitespace answer", " \n\t ", 2, [0, 1], report(wrong_format=True, missing=2)),
    (
        "refusal",
        "I'm sorry, but I cannot rank these passages.",
        3,
        [0, 1, 2],
        report(refusal=True, missing=3),
    ),
    (
        "refusal as an AI",
        "As an AI language model, I can't determine relevance here.",
        3,
        [0, 1, 2],
        report(refusal=True, missing=3),
    ),
    (
        "chatter with loose numbers is not a ranking",
        "Passage 3 is the most relevant, then 1.",
        3,
        [0, 1, 2],
        report(wrong_format=True, missing=3),
    ),
]


@pytest.mark.parametrize(
    ("answer", "n", "order", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_messy_answers(answer: str, n: int, order: list[int], expected: RepairReport) -> None:
    got_order, got_report = parse_permutation(answer, n)
    assert got_order == order
    assert got_report == expected
    assert sorted(got_order) == list(range(n))


def test_there_are_at_least_thirty_cases() -> None:
    assert len(CASES) >= 30


def test_report_kinds_name_each_repair() -> None:
    _, ok = parse_permutation("[1] > [2]", 2)
    assert ok.kinds() == ["ok"]
    _, messy = parse_permutation("Sure: [3] > [9] > [3]", 4)
    assert messy.kinds() == ["wrong_format", "repetition", "missing", "out_of_range"]
    _, refused = parse_permutation("I cannot help with that.", 2)
    assert "refusal" in refused.kinds() and "wrong_format" not in refused.kinds()


def test_final_answer_is_after_the_last_closing_think() -> None:
    assert final_answer("<think>x</think> A <think>y</think> B") == " B"
    assert final_answer("before <think> never closed [1]") == "before "
    assert final_answer("[1] > [2]") == "[1] > [2]"


def test_extract_identifiers_keeps_duplicates_and_out_of_range() -> None:
    assert extract_identifiers("[3] > [3] > [99]") == ([3, 3, 99], True)
    assert extract_identifiers("Answer: [3] > [1]") == ([3, 1], False)


def test_window_of_zero_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one passage"):
        parse_permutation("[1]", 0)


@pytest.mark.parametrize(
    "answer",
    [
        "[1] > " * 50_000,
        "[" * 200_000,
        "[1" * 100_000,
        "3 > " * 50_000,
        "<think>" * 50_000,
        "1, " * 50_000,
    ],
    ids=["long chain", "brackets", "unclosed", "bare chain", "think tags", "commas"],
)
def test_pathological_answers_parse_in_linear_time(answer: str) -> None:
    started = time.perf_counter()
    order, _ = parse_permutation(answer, 20)
    assert sorted(order) == list(range(20))
    assert time.perf_counter() - started < 2.0


def test_identity_answer_is_an_echo_not_ok() -> None:
    order, report = parse_permutation(" > ".join(f"[{i}]" for i in range(1, 21)), 20)
    assert order == list(range(20))
    assert not report.ok and report.kinds() == ["echo"]
    # A partial identity with the rest appended is an echo too (and missing passages).
    _, report = parse_permutation("[1] > [2] > [3]", 10)
    assert report.echo and report.missing == 7
    # Two in the shown order is too likely a real answer to name; a real ranking is ok.
    assert not parse_permutation("[1] > [2]", 2)[1].echo
    assert parse_permutation("[2] > [1] > [3]", 3)[1].ok


def test_format_example_copy_is_named() -> None:
    order, report = parse_permutation("[] > [1]", 20)
    assert report.format_example and not report.ok and not report.echo
    assert "format_example" in report.kinds() and order == list(range(20))
    assert parse_permutation("[] > []", 5)[1].kinds() == ["missing", "format_example"]


def test_echo_warning_when_most_windows_echo() -> None:
    from permrank.core.parse import echo_warning

    warning = echo_warning({"ok": 0, "echo": 10}, 10)
    assert warning is not None
    assert "returned the input order for 10 of 10 windows: it is not ranking" in warning
    assert echo_warning({"ok": 9, "echo": 1}, 10) is None
    mixed = echo_warning({"echo": 3, "format_example": 4}, 10)
    assert mixed is not None and "format example (4)" in mixed
