"""The served model's own tokenizer over HTTP (llama.cpp's and vLLM's ``/tokenize``), beside
the offline counters of ``permrank.core.tokens``."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from permrank.core.errors import BackendError
from permrank.core.tokens import DEFAULT_MEMO_BYTES, ByteBoundedMemo, size_of

log = logging.getLogger(__name__)


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
        from permrank.backends.client import HTTPClient

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
        from permrank.backends.client import (
            HTTPStatusError,
            ResponseTooLarge,
            TransportError,
            lost_on_a_closed_connection,
        )

        url = f"{self.root}{route}"
        for attempt in (1, 2):
            try:
                data = await (client or self._client).post_json(url, body)
                break
            except (HTTPStatusError, TransportError, ResponseTooLarge, TimeoutError) as exc:
                # Tokenizing is idempotent: a request lost on a kept-alive connection the
                # server closed while idle (llama.cpp's, during a long answer) is sent again.
                if attempt == 1 and lost_on_a_closed_connection(exc):
                    log.debug("%s: lost on a closed connection; sending it again", url)
                    continue
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
        from permrank.backends.client import HTTPClient, run_sync

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
        from permrank.backends.client import abandon

        session = self._client._session
        self._client._session = None
        if session is not None:
            abandon(session)
