"""The simulator's answers for the scoring methods: logprobs from the qrels, with seeded noise.

``permrank.sim.server`` hands a request here when it asks for logprobs (``logprobs`` /
``top_logprobs``, ``echo`` or ``prompt_logprobs``). The query and passages are found in the
prompt by text, as for listwise prompts; what is answered depends on what was asked:

- ``echo`` or ``prompt_logprobs`` (query likelihood): the prompt's tokens with logprobs; the query
  tokens at the end get ``-3.5 + 0.75 * r``, every other token ``-2``;
- one passage (pointwise yes/no): first token "Yes" or "No", with P(yes) = sigmoid(2r - 3)
  spread over the variants "Yes", " yes", "YES" / "No", " no";
- two passages and "Passage B" in the prompt (pairwise): "Passage A" or "Passage B", the second
  token's alternatives " A" / " B" with P(A) = sigmoid(2 (r_A - r_B));
- more passages (a listwise window): the judge's permutation, the first token's alternatives the
  identifiers (``[A]`` letters if the prompt shows them, else numbers) with logprobs falling
  with the judge's rank (FIRST). With ``max_tokens=1`` only the first identifier is answered.

``r`` is the passage's qrels grade plus Gaussian noise whose size follows the simulator's
``Noise.swap``: two passages one grade apart are misordered with probability ``swap``. Every
draw is seeded by the noise seed and the prompt, so answers repeat exactly. A listwise window
is ordered by the simulator's own ``judge_order`` (with every noise model it has), so FIRST and
the generated permutation agree when noiseless; the other noise models (position bias, missed
passages, limited attention) apply to windows only.
Chat routes answer in the chat shape (``logprobs.content``), ``/v1/completions`` in the legacy
shape (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``), as vLLM does.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import time
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

from permrank.sim.noise import judge_order
from permrank.sim.state import _norm, find_passages, prompt_text

if TYPE_CHECKING:
    from permrank.sim.noise import Noise
    from permrank.sim.state import SimulatorState

Token = tuple[str, float, list[tuple[str, float]]]
"""(token, logprob, alternatives best first)."""

_WORD = re.compile(r"\s*\S+")


def logit_sd(noise: Noise) -> float:
    """Noise on a grade so that grades one apart are misordered with probability ``swap``."""
    swap = float(getattr(noise, "swap", 0.0) or 0.0)
    if swap <= 0.0:
        return 0.0
    if swap >= 0.5:
        return 1e6
    return 1.0 / (math.sqrt(2.0) * NormalDist().inv_cdf(1.0 - swap))


def relevance(grade: int, noise: Noise, key: str) -> float:
    sd = logit_sd(noise)
    if sd == 0.0:
        return float(grade)
    return grade + random.Random(f"{getattr(noise, 'seed', 0)}:{key}").gauss(0.0, sd)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _log(p: float) -> float:
    return math.log(max(p, 1e-12))


def wants_logprobs(body: dict[str, Any]) -> bool:
    logprobs = body.get("logprobs")
    return bool(
        logprobs is True
        or (isinstance(logprobs, int) and not isinstance(logprobs, bool))
        or body.get("echo")
        or body.get("prompt_logprobs") is not None
    )


def yes_no_tokens(r: float) -> list[Token]:
    p = _sigmoid(2.0 * r - 3.0)
    top = [
        ("Yes", _log(0.8 * p)),
        (" yes", _log(0.15 * p)),
        ("YES", _log(0.05 * p)),
        ("No", _log(0.85 * (1 - p))),
        (" no", _log(0.15 * (1 - p))),
    ]
    top.sort(key=lambda t: -t[1])
    return [(top[0][0], top[0][1], top)]


def pair_tokens(r_a: float, r_b: float) -> list[Token]:
    p = _sigmoid(2.0 * (r_a - r_b))
    top = sorted([(" A", _log(p)), (" B", _log(1 - p))], key=lambda t: -t[1])
    return [("Passage", -0.05, [("Passage", -0.05)]), (top[0][0], top[0][1], top)]


def window_tokens(labels: list[str], order: list[int], max_tokens: int | None) -> list[Token]:
    """The permutation's identifiers, the first with every identifier as an alternative."""
    norm = math.log(sum(math.exp(-r) for r in range(len(order))))
    top = [(labels[i], -r - norm) for r, i in enumerate(order)]
    tokens: list[Token] = [(labels[order[0]], top[0][1], top)]
    if max_tokens is None or max_tokens > 1:
        rest = " > " + " > ".join(labels[i] for i in order[1:]) if len(order) > 1 else ""
        tokens.append((rest, 0.0, [(rest, 0.0)]))
    return tokens


def _tokens_text(tokens: list[Token]) -> str:
    return "".join(t for t, _, _ in tokens)


def _logprobs_payload(tokens: list[Token], k: int, chat: bool, start: int = 0) -> dict[str, Any]:
    if chat:
        return {
            "content": [
                {
                    "token": token,
                    "logprob": lp,
                    "bytes": list(token.encode()),
                    "top_logprobs": [
                        {"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top[:k]
                    ],
                }
                for token, lp, top in tokens
            ]
        }
    offsets, pos = [], start
    for token, _, _ in tokens:
        offsets.append(pos)
        pos += len(token)
    return {
        "tokens": [t for t, _, _ in tokens],
        "token_logprobs": [lp for _, lp, _ in tokens],
        "top_logprobs": [dict(top[:k]) if top else None for _, _, top in tokens],
        "text_offset": offsets,
    }


def _likelihood(
    raw: str, query_text: str, r: float, body: dict[str, Any]
) -> tuple[dict[str, Any], int]:
    """The choice for an echo / prompt_logprobs request, and its prompt tokens."""
    words = _WORD.findall(raw)
    n_query = len(query_text.split())
    prompt: list[Token] = []
    for i, w in enumerate(words):
        lp = -3.5 + 0.75 * r if i >= len(words) - n_query else -2.0
        prompt.append((w, lp, [(w, lp)]))
    generated: list[Token] = [("?", -0.5, [("?", -0.5)])]
    if body.get("prompt_logprobs") is not None:
        entries: list[Any] = [None] + [
            {str(1000 + i): {"logprob": lp, "rank": 1, "decoded_token": t}}
            for i, (t, lp, _) in enumerate(prompt[1:], 1)
        ]
        choice: dict[str, Any] = {"text": "?", "logprobs": None, "prompt_logprobs": entries}
    else:
        k = max(1, int(body.get("logprobs") or 1))
        payload = _logprobs_payload(prompt + generated, k, chat=False)
        payload["token_logprobs"][0] = None  # nothing precedes the first token
        payload["top_logprobs"][0] = None
        choice = {"text": raw + "?", "logprobs": payload}
    return choice, len(prompt)


def respond(state: SimulatorState, body: dict[str, Any], path: str) -> dict[str, Any] | None:
    """A full answer for a request that asks for logprobs; None to leave it to the listwise
    simulator (no logprobs asked, or no known query in the prompt)."""
    if not wants_logprobs(body):
        return None
    raw = prompt_text(body)
    prompt = _norm(raw)
    query = state.corpus.find_query(prompt)
    if query is None:
        return None
    shown = find_passages(prompt, query)
    with state.lock:
        state.requests += 1
        state.temperatures[str(body.get("temperature"))] += 1
        state.per_query[query.qid] += 1
        state.passages_shown += len(shown)
    if not shown:
        return None
    noise = state.noise
    key = hashlib.sha256(prompt.encode()).hexdigest()
    grades = [query.passages[i][2] for i in shown]
    chat = path.endswith("chat/completions")
    max_tokens = body.get("max_tokens")
    k = int(body.get("top_logprobs") or 1) if chat else max(1, int(body.get("logprobs") or 1))
    prompt_tokens = state_tokens(raw, body)
    if body.get("echo") or body.get("prompt_logprobs") is not None:
        choice, prompt_tokens = _likelihood(raw, query.text, relevance(grades[0], noise, key), body)
        choice.update({"index": 0, "finish_reason": "length"})
        tokens: list[Token] = [("?", -0.5, [])]
    else:
        if len(shown) == 1:
            tokens = yes_no_tokens(relevance(grades[0], noise, key))
        elif len(shown) == 2 and "Passage B" in raw:
            tokens = pair_tokens(
                relevance(grades[0], noise, key + ":A"), relevance(grades[1], noise, key + ":B")
            )
        else:
            letters = "[A]" in raw and len(shown) <= 26
            labels = [chr(65 + i) if letters else f"[{i + 1}]" for i in range(len(shown))]
            tokens = window_tokens(labels, judge_order(grades, noise, key), max_tokens)
        if isinstance(max_tokens, int) and max_tokens > 0:
            tokens = tokens[:max_tokens]
        text = _tokens_text(tokens)
        logprobs = _logprobs_payload(tokens, k, chat)
        if chat:
            choice = {"message": {"role": "assistant", "content": text}, "logprobs": logprobs}
        else:
            choice = {"text": text, "logprobs": logprobs}
        choice.update({"index": 0, "finish_reason": "stop"})
    completion_tokens = len(tokens)
    return {
        "id": f"sim-{state.requests}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": body.get("model", state.model),
        "choices": [choice],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def state_tokens(raw: str, body: dict[str, Any]) -> int:
    from permrank.core.tokens import default_tokenizer

    return default_tokenizer().count(raw) + 4 * len(body.get("messages") or [])
