"""What the simulator knows and how it answers: the corpus (queries, passages, qrels), finding a
prompt's query and passages by their text, token counts, and the shapes of its answers."""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from permrank.core.errors import InputError
from permrank.core.prompts import as_data
from permrank.core.tokens import default_tokenizer
from permrank.runs.evaluate import read_qrels
from permrank.runs.io import read_requests
from permrank.sim.noise import Noise, judge_order

log = logging.getLogger(__name__)


PREFIX_CHARS = 40
"""Characters of a passage's start that identify it in a prompt (passages may be truncated)."""


def _norm(text: str) -> str:
    return " ".join(text.split())


@dataclass
class SimQuery:
    qid: str
    text: str
    passages: list[tuple[str, str, int]]
    """(docid, normalised text, grade) of each candidate."""
    by_prefix: dict[str, list[int]] = field(default_factory=dict)
    """Indices of the passages by their first ``PREFIX_CHARS`` characters (set by Corpus)."""
    prefix_words: dict[str, str] = field(default_factory=dict)
    """A word each prefix holds whole (spaces around it), so must be a word of a prompt that
    shows the prefix: a cheap test before searching for the prefix (set by Corpus)."""


class Corpus:
    """Queries, their candidates and grades, indexed to be found in a prompt quickly."""

    def __init__(self, queries: Iterable[SimQuery]):
        self.queries: dict[str, SimQuery] = {}
        for q in queries:
            if q.qid in self.queries:
                continue
            # Texts as templates show them (passages are inserted as data, see prompts.as_data).
            q.text = _norm(as_data(q.text))
            q.passages = [(d, _norm(as_data(t)), g) for d, t, g in q.passages]
            q.by_prefix = {}
            for i, (_, text, _) in enumerate(q.passages):
                if text:
                    q.by_prefix.setdefault(text[:PREFIX_CHARS], []).append(i)
            for prefix in q.by_prefix:
                words = prefix.split(" ")
                if len(words) >= 3:
                    q.prefix_words[prefix] = max(words[1:-1], key=len)
            self.queries[q.qid] = q
        self._longest_first = sorted(
            (q for q in self.queries.values() if q.text), key=lambda q: -len(q.text)
        )

    @classmethod
    def from_dir(cls, data: str | Path) -> Corpus:
        data = Path(data)
        cands = next(
            (p for p in (data / "candidates.jsonl", data / "candidates.jsonl.gz") if p.exists()),
            None,
        )
        if cands is None or not (data / "qrels.txt").exists():
            raise InputError(
                "a simulator data folder holds candidates.jsonl[.gz] and qrels.txt "
                "(see ../shared/data)",
                path=str(data),
            )
        return cls.from_files(cands, data / "qrels.txt")

    @classmethod
    def from_files(cls, candidates: str | Path, qrels: str | Path) -> Corpus:
        grades = read_qrels(qrels)
        queries = []
        for request in read_requests(candidates):
            g = grades.get(request.query.qid, {})
            queries.append(
                SimQuery(
                    qid=request.query.qid,
                    text=_norm(request.query.text),
                    passages=[
                        (c.docid, _norm(c.text), g.get(c.docid, 0)) for c in request.candidates
                    ],
                )
            )
        return cls(queries)

    def find_query(self, prompt: str) -> SimQuery | None:
        """The longest known query whose text is in the (normalised) prompt at a word start
        (anywhere, if none is: a query glued to punctuation)."""
        glued: SimQuery | None = None
        for q in self._longest_first:
            position = prompt.find(q.text)
            if position != -1 and glued is None:
                glued = q
            while position != -1:
                if position == 0 or prompt[position - 1] == " ":
                    return q
                position = prompt.find(q.text, position + 1)
        return glued


def _common_prefix(prompt: str, position: int, text: str) -> int:
    """How many characters of ``text`` stand in ``prompt`` at ``position`` (binary search)."""
    if prompt.startswith(text, position):
        return len(text)  # shown whole, the usual case
    lo, hi = 0, min(len(text), len(prompt) - position)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if prompt.startswith(text[:mid], position):
            lo = mid
        else:
            hi = mid - 1
    return lo


def find_passages(prompt: str, query: SimQuery) -> list[int]:
    """Indices into ``query.passages`` of the passages shown in the prompt, in order shown.

    Each occurrence of a passage's first characters is given to the candidate whose text matches
    longest there; occurrences inside a passage already found are skipped (MS MARCO passages
    repeat text); identical texts go to twins not yet shown.
    """
    hits: list[tuple[int, int, list[int]]] = []  # (position, -matched length, candidates)
    words = set(prompt.split(" "))
    for prefix, indices in query.by_prefix.items():
        word = query.prefix_words.get(prefix)
        if word is not None and word not in words:
            continue  # the prefix holds a whole word the prompt does not have
        position = prompt.find(prefix)
        while position != -1:
            lengths = {i: _common_prefix(prompt, position, query.passages[i][1]) for i in indices}
            longest = max(lengths.values())
            # A text shown whole beats a longer one that only runs on by chance (a space, a
            # period) past where the shown text ends.
            close = [i for i in indices if lengths[i] >= longest - 3]
            whole = [i for i in close if lengths[i] == len(query.passages[i][1])]
            if whole:
                best = max(lengths[i] for i in whole)
                chosen = [i for i in whole if lengths[i] == best]
            else:
                best = longest
                chosen = [i for i in indices if lengths[i] == best]
            hits.append((position, -best, chosen))
            position = prompt.find(prefix, position + 1)
    hits.sort()
    shown: list[int] = []
    used: set[int] = set()
    covered_to = -1
    for position, neg_length, indices in hits:
        if position < covered_to:
            continue
        free = [i for i in indices if i not in used]
        if not free:
            continue
        used.add(free[0])
        shown.append(free[0])
        covered_to = position - neg_length
    return shown


@functools.lru_cache(maxsize=65536)
def _piece_tokens(piece: str) -> int:
    return default_tokenizer().count(piece)


def count_prompt_tokens(text: str) -> int:
    """``default_tokenizer().count(text)``, counted piece by piece with the pieces remembered.

    Prompts repeat their lines (a passage is shown in several windows, instructions in all).
    cl100k_base never lets a pre-token (the unit its BPE merges within) run from a newline into
    a following non-space character, nor from a ``]`` into a following space, so the text is cut
    at those places (a line's first ``] ``: after the identifier) and the pieces' counts add up
    to the whole's exactly. Another tokenizer counts the whole text.
    """
    if default_tokenizer().name != "cl100k_base":
        return default_tokenizer().count(text)
    lines = text.split("\n")
    pieces = [lines[0]]
    for line in lines[1:]:
        if line and not line[0].isspace():
            pieces[-1] += "\n"
            pieces.append(line)
        else:  # an empty line, or one starting with a space: kept with the line before
            pieces[-1] += "\n" + line
    total = 0
    for piece in pieces:
        head, sep, tail = piece.partition("] ")
        if sep:
            total += _piece_tokens(head + "]") + _piece_tokens(" " + tail)
        else:
            total += _piece_tokens(piece)
    return total


def message_text(messages: list[Any]) -> str:
    """The text of chat messages (or Responses API input items), content parts joined."""
    parts = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else m
        if isinstance(content, list):  # content parts
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        parts.append(str(content or ""))
    return "\n".join(parts)


def prompt_text(body: dict[str, Any]) -> str:
    if "messages" in body:
        return message_text(body.get("messages") or [])
    prompt = body.get("prompt", body.get("input", ""))
    if isinstance(prompt, list):
        prompt = message_text(prompt)
    instructions = body.get("instructions")  # the Responses API's system message
    return f"{instructions}\n{prompt}" if instructions else str(prompt)


@dataclass
class SimulatorState:
    corpus: Corpus
    noise: Noise = field(default_factory=Noise)
    latency_s: float = 0.0
    model: str = "permrank-simulator"
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: int = 0
    per_query: Counter = field(default_factory=Counter)
    temperatures: Counter = field(default_factory=Counter)
    unmatched: int = 0
    passages_shown: int = 0
    faults: Any = None
    """Fault injection (see the reliability work): an object whose ``intercept(handler, body,
    path)`` may answer a request itself (an error, a cut connection, ...) and return True."""

    def answer(self, body: dict[str, Any]) -> tuple[str, int, int]:
        """(answer text, prompt tokens, completion tokens) for one request body."""
        raw = prompt_text(body)
        prompt = _norm(raw)
        query = self.corpus.find_query(prompt)
        tokenizer = default_tokenizer()
        with self.lock:
            self.requests += 1
            self.temperatures[str(body.get("temperature"))] += 1
            if query is not None:
                self.per_query[query.qid] += 1
            else:
                self.unmatched += 1
        if query is None:
            text = "I could not find a known query in this prompt."
        else:
            shown = find_passages(prompt, query)
            with self.lock:
                self.passages_shown += len(shown)
            grades = [query.passages[i][2] for i in shown]
            key = hashlib.sha256(prompt.encode()).hexdigest()
            order = judge_order(grades, self.noise, key)
            text = " > ".join(f"[{i + 1}]" for i in order)
        messages = body.get("messages") or []
        prompt_tokens = count_prompt_tokens(raw) + 4 * len(messages)
        return text, prompt_tokens, tokenizer.count(text)

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests": self.requests,
                "per_query": dict(self.per_query),
                "temperatures": dict(self.temperatures),
                "unmatched": self.unmatched,
                "passages_shown": self.passages_shown,
                "noise": self.noise.describe(),
                "latency_s": self.latency_s,
                "faults": self.faults.describe() if self.faults is not None else None,
            }


def completion_payload(
    state: SimulatorState,
    body: dict[str, Any],
    path: str,
    text: str,
    prompt_tokens: int,
    completion_tokens: int,
    finish_reason: str = "stop",
) -> dict[str, Any]:
    """An OpenAI-style answer (chat or text completion, as ``path`` asks) carrying ``text``."""
    if path.endswith("responses"):
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        return responses_payload(state, body, text, usage, int(time.time()))
    if path.endswith("chat/completions"):
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": finish_reason,
            "message": {"role": "assistant", "content": text},
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "finish_reason": finish_reason, "text": text}
        obj = "text_completion"
    return {
        "id": f"sim-{state.requests}",
        "object": obj,
        "created": int(time.time()),
        "model": body.get("model", state.model),
        "choices": [choice],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def responses_payload(
    state: SimulatorState, body: dict[str, Any], text: str, usage: dict[str, int], created: int
) -> dict[str, Any]:
    """An answer in the shape of OpenAI's Responses API (``POST /v1/responses``)."""
    return {
        "id": f"resp_sim{state.requests}",
        "object": "response",
        "created_at": created,
        "status": "completed",
        "model": body.get("model", state.model),
        "output": [
            {
                "type": "message",
                "id": f"msg_sim{state.requests}",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "parallel_tool_calls": False,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["total_tokens"],
        },
    }
