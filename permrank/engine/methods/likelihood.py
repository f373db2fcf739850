"""Query likelihood (UPR, Sachan et al. 2022): how likely the model finds the query after the
passage. The score is the mean log-probability of the query's tokens given
"Passage: ... Please write a question based on this passage." It needs the logprobs of tokens
the model did not choose, which servers give in one of three ways (``mode``):

- ``echo``: ``/v1/completions`` with ``echo: true`` and ``logprobs``; the answer lists the
  prompt's own tokens (OpenAI's legacy completions, vLLM).
- ``prompt_logprobs``: vLLM's ``prompt_logprobs: 0`` on ``/v1/completions``.
- ``forced``: llama.cpp's server ignores ``echo`` and ``prompt_logprobs``, but it honours a
  grammar of token ids (``root ::= <[id1]> <[id2]> ...``) and reports each forced token's logprob
  before the grammar is applied: exact teacher forcing. The query's token ids come from its
  ``/tokenize`` route. One request per passage, generating as many tokens as the query has.
- ``auto`` (default): ``echo`` first; if the server does not echo, ``forced``.

``normalise`` turns the query tokens' logprobs into one score: ``mean`` (UPR's average, the
default) or ``sum`` (the query's log-likelihood; the same order within a query, since every
passage is scored on the same query, but a different scale when fused). ``interpolate`` fuses
the score with the first-stage score: both are min-max normalised within the query and mixed
as ``w * model + (1 - w) * first_stage`` (``w = interpolate``); candidates without a
first-stage score are given one from their rank (``-rank``), so the order of the input counts.
``capitalise`` upper-cases the query's first letter, as a question is written after "Question:"
(MS MARCO's queries are all lower-case).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from permrank.core.errors import BackendError, ConfigError
from permrank.core.logprobs import (
    LogprobsUnavailable,
    TokenLogprob,
    generated_tokens,
    prompt_logprobs_tokens,
)
from permrank.core.types import Candidate, Query, Ranking, Request, WindowTrace
from permrank.engine.methods.base import (
    Call,
    PassageScorer,
    call,
    check_choice,
    check_top_k,
    cut,
    ranking_of,
    send,
    trace_of,
)

if TYPE_CHECKING:
    from permrank.engine.pipeline import Pipeline

log = logging.getLogger(__name__)

UPR_PROMPT = "Passage: {passage}\nPlease write a question based on this passage.\nQuestion:"
CHAT_UPR_PROMPT = (
    "<|im_start|>user\nPassage: {passage}\nWrite a question that this passage answers."
    "<|im_end|>\n<|im_start|>assistant\nQuestion:"
)
"""UPR in a ChatML turn (Qwen, SmolLM2): the instruction-tuned models' own format."""
PROMPTS = {"upr": UPR_PROMPT, "chat-upr": CHAT_UPR_PROMPT}
MODES = ("auto", "echo", "prompt_logprobs", "forced")
NORMALISE = ("mean", "sum")


def min_max(values: list[float]) -> list[float]:
    low, high = min(values), max(values)
    if high - low <= 0:
        return [0.0 for _ in values]
    return [(v - low) / (high - low) for v in values]


def fuse(scores: list[float], candidates: list[Candidate], weight: float | None) -> list[float]:
    """``weight * model + (1 - weight) * first stage``, both min-max normalised in the query;
    the first stage's score is ``-rank`` where a candidate has none. ``None``: the scores."""
    if weight is None or not scores:
        return scores
    first = [c.score for c in candidates]
    if any(v is None for v in first):
        first = [-float(i) for i in range(len(candidates))]
    model_n = min_max(scores)
    first_n = min_max([float(v) for v in first])  # type: ignore[arg-type]
    return [weight * m + (1.0 - weight) * f for m, f in zip(model_n, first_n, strict=True)]


def check_weight(weight: float | None) -> None:
    if weight is not None and not 0.0 <= weight <= 1.0:
        raise ConfigError(f"interpolate must be between 0 and 1 (got {weight})")


async def rerank_fused(
    scorer: PassageScorer, pipeline: Pipeline, request: Request, weight: float | None
) -> Ranking:
    """Score the first ``top_k`` candidates at once, fuse with the first stage (``weight``),
    order by the result (ties keep input order); the rest follow in input order."""
    started = time.perf_counter()
    n = len(request.candidates)
    m = n if scorer.top_k is None else min(scorer.top_k, n)
    results = await asyncio.gather(
        *(scorer.score(pipeline, request.query, c) for c in request.candidates[:m])
    )
    scores = fuse([s for s, _ in results], request.candidates[:m], weight)
    order = sorted(range(m), key=lambda i: (-scores[i], i)) + list(range(m, n))
    trace = [t for _, traces in results for t in traces]
    return ranking_of(request, order, trace, 1 if m else 0, started)


def tail_logprobs(tokens: list[TokenLogprob], chars: int) -> list[float]:
    """Logprobs of the last tokens that together spell the last ``chars`` characters."""
    out: list[float] = []
    covered = 0
    for token in reversed(tokens):
        if covered >= chars:
            break
        if token.logprob is None:
            break
        out.append(token.logprob)
        covered += len(token.token)
    if covered < chars:
        return []
    return out[::-1]


def echoed(tokens: list[TokenLogprob], prompt: str) -> bool:
    """Whether ``tokens`` start with the prompt (the server honoured ``echo``)."""
    head = "".join(t.token for t in tokens[:8])
    probe = min(len(head), len(prompt), 12)
    return probe > 0 and prompt.startswith(head[:probe])


def server_root(endpoint: str) -> str:
    return endpoint[: -len("/v1")] if endpoint.endswith("/v1") else endpoint


@dataclass
class Likelihood:
    mode: str = "auto"
    prompt: str = UPR_PROMPT
    top_k: int | None = None
    normalise: str = "mean"
    interpolate: float | None = None
    capitalise: bool = False
    name: str = "likelihood"
    _resolved: str | None = field(default=None, repr=False, compare=False)
    _lock: asyncio.Lock | None = field(default=None, repr=False, compare=False)
    _token_ids: dict[str, list[int]] = field(default_factory=dict, repr=False, compare=False)
    _tokenizing: dict[str, asyncio.Future[list[int]]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        check_choice(self.mode, MODES, "mode")
        check_choice(self.normalise, NORMALISE, "normalise")
        check_top_k(self.top_k)
        check_weight(self.interpolate)
        self.prompt = PROMPTS.get(self.prompt, self.prompt)
        if self.mode != "auto":
            self._resolved = self.mode

    async def score(
        self, pipeline: Pipeline, query: Query, candidate: Candidate
    ) -> tuple[float, list[WindowTrace]]:
        prefix = self.prompt.format(passage=cut(pipeline, candidate.text, candidate.title))
        target = " " + query.text.strip()
        if self.capitalise:
            target = " " + target[1:2].upper() + target[2:]
        calls: list[Call] = []
        if self._resolved is None:
            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                if self._resolved is None:
                    values = await self._echo(pipeline, prefix, target, calls)
                    self._resolved = "echo" if values else "forced"
                    log.info("likelihood: the endpoint answers mode %s", self._resolved)
                    if values:
                        return self._finish(values, calls, candidate)
        mode = self._resolved
        if mode == "echo":
            values = await self._echo(pipeline, prefix, target, calls)
        elif mode == "prompt_logprobs":
            values = await self._prompt_logprobs(pipeline, prefix, target, calls)
        else:
            values = await self._forced(pipeline, prefix, target, calls)
        if not values:
            raise LogprobsUnavailable(
                f"{getattr(pipeline.backend, 'endpoint', '')}/completions: no logprobs for the "
                f"query's tokens with likelihood mode {mode!r}. echo works on OpenAI's and "
                "vLLM's /v1/completions, prompt_logprobs on vLLM, forced on llama.cpp's server; "
                "choose another --likelihood-mode, or another --method."
            )
        return self._finish(values, calls, candidate)

    def _finish(
        self, values: list[float], calls: list[Call], candidate: Candidate
    ) -> tuple[float, list[WindowTrace]]:
        score = sum(values) if self.normalise == "sum" else sum(values) / len(values)
        traces = [
            trace_of(
                c,
                round_index=0,
                docids=[candidate.docid],
                answer=(
                    f"{len(values)} query tokens, {self.normalise} logprob {score:.4f}"
                    f" (each: {' '.join(f'{v:.4f}' for v in values)})"
                ),
                permutation=[0],
                score=score if c is calls[-1] else None,
            )
            for c in calls
        ]
        return score, traces

    async def _echo(
        self, pipeline: Pipeline, prefix: str, target: str, calls: list[Call]
    ) -> list[float]:
        prompt = prefix + target
        c = await call(
            pipeline,
            "/completions",
            {"prompt": prompt, "max_tokens": 1, "logprobs": 1, "echo": True},
        )
        calls.append(c)
        tokens = generated_tokens(c.choice)
        if not echoed(tokens, prompt):
            return []
        if c.completion_tokens and len(tokens) > c.completion_tokens:
            tokens = tokens[: len(tokens) - c.completion_tokens]
        return tail_logprobs(tokens, len(target))

    async def _prompt_logprobs(
        self, pipeline: Pipeline, prefix: str, target: str, calls: list[Call]
    ) -> list[float]:
        c = await call(
            pipeline,
            "/completions",
            {"prompt": prefix + target, "max_tokens": 1, "prompt_logprobs": 0},
        )
        calls.append(c)
        return tail_logprobs(prompt_logprobs_tokens(c.choice), len(target))

    async def _forced(
        self, pipeline: Pipeline, prefix: str, target: str, calls: list[Call]
    ) -> list[float]:
        root = server_root(getattr(pipeline.backend, "endpoint", ""))
        ids = self._token_ids.get(target)
        if ids is None:
            # a query's passages are scored at once: the first asks, the others wait for it
            asking = self._tokenizing.get(target)
            if asking is None:
                asking = asyncio.ensure_future(self._tokenize(pipeline, root, target))
                self._tokenizing[target] = asking
                asking.add_done_callback(lambda _: self._tokenizing.pop(target, None))
            ids = await asking
        grammar = "root ::= " + " ".join(f"<[{i}]>" for i in ids)
        c = await call(
            pipeline,
            "/completions",
            {"prompt": prefix, "max_tokens": len(ids), "logprobs": 1, "grammar": grammar},
        )
        calls.append(c)
        tokens = generated_tokens(c.choice)[: len(ids)]
        got = [t.token_id for t in tokens]
        if got != ids:
            raise LogprobsUnavailable(
                f"{root}: the server did not follow the token grammar (asked {ids}, got {got}); "
                "forced likelihood needs llama.cpp's server. Use --likelihood-mode echo or "
                "prompt_logprobs with vLLM."
            )
        return [t.logprob for t in tokens if t.logprob is not None]

    async def _tokenize(self, pipeline: Pipeline, root: str, target: str) -> list[int]:
        answer, _, _ = await send(pipeline, f"{root}/tokenize", {"content": target})
        ids = [t["id"] if isinstance(t, dict) else int(t) for t in answer.get("tokens") or []]
        if not ids:
            raise BackendError(f"{root}/tokenize returned no tokens for {target!r}")
        self._token_ids[target] = ids
        return ids

    async def rerank(self, pipeline: Pipeline, request: Request) -> Ranking:
        return await rerank_fused(self, pipeline, request, self.interpolate)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mode": self.mode,
            "resolved_mode": self._resolved,
            "prompt": self.prompt,
            "normalise": self.normalise,
            "interpolate": self.interpolate,
            "capitalise": self.capitalise,
            "top_k": self.top_k,
        }
