"""Logprobs from any OpenAI-compatible answer, in one shape.

Servers return token logprobs in two shapes, and this is the one place that reads them:
- chat-style (OpenAI chat, vLLM chat, llama.cpp's server on both routes):
  ``choice.logprobs.content[i] = {token, logprob, top_logprobs: [{token, logprob}, ...]}``;
- legacy completions (OpenAI completions, vLLM and llama-cpp-python on ``/v1/completions``):
  ``choice.logprobs = {tokens, token_logprobs, top_logprobs: [{token: logprob}, ...],
  text_offset}`` (with ``echo`` it covers the prompt's tokens too).
vLLM's ``prompt_logprobs`` (a list aligned with the prompt's tokens, ``None`` first, then
``{token_id: {logprob, rank, decoded_token}}``) is read by ``prompt_logprobs_tokens``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from permrank.core.errors import ConfigError


class LogprobsUnavailable(ConfigError):
    """The endpoint answered without the logprobs a scoring method needs."""


@dataclass(frozen=True)
class TokenLogprob:
    """One token of an answer (or of an echoed prompt) and the alternatives the server listed."""

    token: str
    logprob: float | None
    top: list[tuple[str, float]] = field(default_factory=list)
    token_id: int | None = None
    offset: int | None = None
    """Character offset in the echoed text, when the server gives it (legacy ``text_offset``)."""


def generated_tokens(choice: dict[str, Any]) -> list[TokenLogprob]:
    """The tokens of ``choice``'s logprobs, whichever shape they come in (``[]`` if none)."""
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        return []
    if isinstance(logprobs.get("content"), list):
        return [
            TokenLogprob(
                token=str(entry.get("token", "")),
                logprob=_float(entry.get("logprob")),
                top=[
                    (str(alt.get("token", "")), float(alt["logprob"]))
                    for alt in entry.get("top_logprobs") or []
                    if alt.get("logprob") is not None
                ],
                token_id=entry.get("id"),
            )
            for entry in logprobs["content"]
        ]
    tokens = logprobs.get("tokens") or []
    values = logprobs.get("token_logprobs") or [None] * len(tokens)
    tops = logprobs.get("top_logprobs") or [None] * len(tokens)
    offsets = logprobs.get("text_offset") or [None] * len(tokens)
    return [
        TokenLogprob(
            token=str(token),
            logprob=_float(value),
            top=[(str(t), float(v)) for t, v in (top or {}).items() if v is not None],
            offset=offset,
        )
        for token, value, top, offset in zip(tokens, values, tops, offsets, strict=False)
    ]


def prompt_logprobs_tokens(choice: dict[str, Any]) -> list[TokenLogprob]:
    """vLLM's ``prompt_logprobs`` (asked with ``prompt_logprobs: 0``) as tokens; ``[]`` if none."""
    out = []
    for entry in choice.get("prompt_logprobs") or []:
        if not entry:
            out.append(TokenLogprob(token="", logprob=None))
            continue
        # With prompt_logprobs=0 the entry holds the prompt's own token only; with more, the
        # prompt token is the first key vLLM writes.
        token_id, info = next(iter(entry.items()))
        out.append(
            TokenLogprob(
                token=str(info.get("decoded_token") or ""),
                logprob=_float(info.get("logprob")),
                token_id=int(token_id) if str(token_id).isdigit() else None,
            )
        )
    return out


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def normalise_token(token: str) -> str:
    """A token as compared with answer words: no spaces, markers or brackets, case-folded.

    ``"Yes"``, ``" yes"``, ``"YES"``, ``"▁Yes"``, ``"ĠYes"`` all become ``"yes"``;
    ``"[C"``, ``" C"`` and ``"C]"`` become ``"c"``.
    """
    return token.replace("▁", " ").replace("Ġ", " ").strip().strip("[]().:,*\"'").casefold()


def logsumexp(values: Iterable[float]) -> float | None:
    values = list(values)
    if not values:
        return None
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def merged_logprob(top: Sequence[tuple[str, float]], word: str) -> float | None:
    """Log of the summed probability of every listed variant of ``word`` (None if none listed)."""
    return logsumexp(lp for token, lp in top if normalise_token(token) == word)


def best_logprob(top: Sequence[tuple[str, float]], word: str) -> float | None:
    """The logprob of the single most likely listed variant of ``word`` (None if none)."""
    found = [lp for token, lp in top if normalise_token(token) == word]
    return max(found) if found else None


def floor_logprob(top: Sequence[tuple[str, float]]) -> float:
    """An upper bound for any token the server did not list: the smallest listed logprob."""
    return min((lp for _, lp in top), default=math.log(1e-6))


def answer_position(
    tokens: Sequence[TokenLogprob], is_answer: Callable[[str], bool]
) -> TokenLogprob | None:
    """The token position that carries the answer word.

    The first generated token that is an answer word (``"A"`` of ``"Passage A"``); failing
    that, the first position whose alternatives list one (a model that began with ``"["``).
    """
    for token in tokens:
        if is_answer(normalise_token(token.token)):
            return token
    for token in tokens:
        if any(is_answer(normalise_token(t)) for t, _ in token.top):
            return token
    return None


def require_logprobs(
    tokens: Sequence[TokenLogprob], *, endpoint: str, route: str, method: str
) -> None:
    if not tokens or all(not t.top and t.logprob is None for t in tokens):
        raise LogprobsUnavailable(
            f"{endpoint}{route} answered without logprobs: method {method!r} scores from "
            "token logprobs (logprobs/top_logprobs), which this endpoint did not return. Use an "
            "endpoint that returns them (vLLM, llama.cpp's server, OpenAI chat), or "
            "--method listwise, which needs only text."
        )
