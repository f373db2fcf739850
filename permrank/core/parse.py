"""Turn a model's answer into a window permutation, and say what had to be repaired.

Pure: no I/O. ``parse_permutation("[2] > [1]", 3)`` returns ``[1, 0, 2]`` (0-based positions,
most relevant first) with a report that one passage was missing.

Rules, in order:
1. Only the final answer counts: text after the last closing ``</think>`` (a reasoning model's
   thoughts are not the answer). An unclosed ``<think>`` block with no answer after it is empty.
2. Bracketed identifiers (``[3]``, ``【3】``, ``[ 3 ]``, full-width or other Unicode digits) are the
   answer when there are any; numbers in the surrounding chatter ("the 5 passages") are then
   ignored. Only when there is no bracketed identifier at all are bare numbers read, and only
   from a line that looks like a ranking (``3 > 1 > 2``, ``3, 1, 2``), which is a format repair.
3. The first of duplicate identifiers is kept; identifiers outside ``1..n`` are dropped; the
   missing ones are appended in their current (shown) order.
4. An answer with no identifier at all is a refusal or a wrong format; the window keeps its
   shown order.
5. Answers that parse but do not rank are named: ``echo`` when the identifiers given (three or
   more) are the window in the order it was shown, ``format_example`` when the answer copies
   the prompt's format example (the empty brackets of ``[] > []``; ``[] > [1]`` is what
   Qwen2.5-Coder-0.5B answers). Neither is ``ok``. ``echo_warning`` turns their
   counts into the run summary's warning.
"""

from __future__ import annotations

import re
import unicodedata

from permrank.core.types import RepairReport

_THINK_CLOSE = re.compile(r"</think\s*>", re.IGNORECASE)
_THINK_OPEN = re.compile(r"<think\s*>", re.IGNORECASE)
_OPEN = r"[\[【［〔]"
_CLOSE = r"[\]】］〕]"
_BRACKETED = re.compile(_OPEN + r"\s*(\d{1,4})\s*" + _CLOSE)
_SEPARATOR = r"\s*(?:>>?|≻|›|→|->|,|;)\s*"
_ONE = _OPEN + r"\s*\d{1,4}\s*" + _CLOSE
_CHAIN = re.compile(_ONE + "(?:" + _SEPARATOR + _ONE + ")+")
_STRICT = re.compile(r"^\s*\[[0-9]+\](\s*>\s*\[[0-9]+\])*\s*$")
_BARE_LINE = re.compile(r"^\s*\d{1,4}(\s*(?:>|,|>>|→|->|;)\s*\d{1,4})+\s*\.?\s*$")
_BARE_CHAIN = re.compile(r"(?<!\d)\d{1,4}(?:\s*(?:>>?|≻|›|→|->)\s*\d{1,4})+(?!\d)")
_NUMBER = re.compile(r"\d{1,4}")
_EMPTY_BRACKETS = re.compile(_OPEN + r"\s*" + _CLOSE)
ECHO_MIN = 3
"""An identity order of fewer identifiers is too likely to be a real answer to name."""
_REFUSAL = re.compile(
    r"\b(i\s*(?:can(?:no|')t|am\s+(?:not\s+able|unable)|won't|will\s+not)|"
    r"as\s+an\s+ai|i'm\s+(?:sorry|unable|not\s+able)|sorry,?\s+(?:but\s+)?i|unable\s+to\s+"
    r"(?:rank|help|comply|provide))",
    re.IGNORECASE,
)


def final_answer(text: str) -> str:
    """The part of ``text`` that is the answer: after the last ``</think>``, if any."""
    closes = list(_THINK_CLOSE.finditer(text))
    if closes:
        return text[closes[-1].end() :]
    opened = _THINK_OPEN.search(text)
    if opened:  # thinking never finished: nothing after it is an answer
        return text[: opened.start()]
    return text


def _ascii_digits(text: str) -> str:
    """Map every Unicode decimal digit (Arabic-Indic, full-width, ...) to its ASCII digit."""
    if text.isascii():
        return text
    out = []
    for ch in text:
        if ch.isdigit() and not ch.isascii():
            try:
                out.append(str(unicodedata.decimal(ch)))
                continue
            except ValueError:
                pass
        out.append(ch)
    return "".join(out)


def extract_identifiers(answer: str) -> tuple[list[int], bool]:
    """The identifiers in an answer, in order, and whether they were read from a clean format.

    Returns 1-based identifiers as written (duplicates and out-of-range ones included).
    """
    raw = final_answer(answer)
    text = _ascii_digits(raw)
    chains = [m.group(0) for m in _CHAIN.finditer(text)]
    if chains:  # the longest chain "[a] > [b] > ..." is the answer; brackets elsewhere are chatter
        chain = max(chains, key=len)
        return [int(m.group(1)) for m in _BRACKETED.finditer(chain)], bool(_STRICT.match(raw))
    bracketed = [int(m.group(1)) for m in _BRACKETED.finditer(text)]
    if bracketed:
        return bracketed, bool(_STRICT.match(raw))
    for line in text.splitlines():
        if _BARE_LINE.match(line):
            return [int(n) for n in _NUMBER.findall(line)], False
    bare_chains = [m.group(0) for m in _BARE_CHAIN.finditer(text)]
    if bare_chains:  # "The ranking is 3 > 1 > 2.": the chain, not the chatter's numbers
        return [int(n) for n in _NUMBER.findall(max(bare_chains, key=len))], False
    return [], False


def parse_permutation(answer: str, n: int) -> tuple[list[int], RepairReport]:
    """Parse an answer about a window of ``n`` passages.

    Returns a permutation of ``range(n)`` (0-based, most relevant first) and its repair report.
    """
    if n < 1:
        raise ValueError(f"a window has at least one passage, got n={n}")
    identifiers, clean = extract_identifiers(answer)
    seen: set[int] = set()
    order: list[int] = []
    repetition = out_of_range = 0
    for ident in identifiers:
        if not 1 <= ident <= n:
            out_of_range += 1
        elif ident in seen:
            repetition += 1
        else:
            seen.add(ident)
            order.append(ident - 1)
    missing = [i for i in range(n) if i + 1 not in seen]
    order.extend(missing)
    refusal = not identifiers and bool(_REFUSAL.search(final_answer(answer)))
    given = order[: len(seen)]
    example = bool(_EMPTY_BRACKETS.search(final_answer(answer)))
    echo = not example and len(given) >= ECHO_MIN and given == list(range(len(given)))
    report = RepairReport(
        wrong_format=not clean and not refusal and not example,
        repetition=repetition,
        missing=len(missing),
        out_of_range=out_of_range,
        refusal=refusal,
        echo=echo,
        format_example=example,
    )
    report.ok = not (
        report.wrong_format
        or repetition
        or report.missing
        or out_of_range
        or refusal
        or echo
        or example
    )
    return order, report


def echo_warning(repairs: dict[str, int], windows: int) -> str | None:
    """The run summary's warning when most window answers were echoes or format examples."""
    if windows <= 0:
        return None
    echoes = repairs.get("echo", 0)
    examples = repairs.get("format_example", 0)
    if echoes * 2 > windows:
        return (
            f"warning: the model returned the input order for {echoes} of {windows} windows: "
            "it is not ranking (try a larger model, or a scoring --method such as likelihood)"
        )
    if (echoes + examples) * 2 > windows:
        return (
            f"warning: {echoes + examples} of {windows} window answers were the input order "
            f"({echoes}) or the prompt's format example ({examples}): the model is not ranking"
        )
    return None
