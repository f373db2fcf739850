"""The backend protocol: send chat messages, get a Completion back. All network I/O lives here."""

from __future__ import annotations

from typing import Any, Protocol

from permrank.core.types import Completion, Exchange

__all__ = ["Backend", "Exchange"]


class Backend(Protocol):
    model: str
    endpoint: str

    async def complete(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Completion: ...

    def describe(self) -> dict[str, Any]:
        """What a run manifest records of this backend (never a secret)."""
        ...

    async def aclose(self) -> None: ...
