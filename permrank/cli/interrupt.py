"""Ctrl-C that a command cannot lose.

Python turns SIGINT into a ``KeyboardInterrupt`` raised in whatever Python code runs at that
moment. When that code is an object's finaliser (``__del__``: asyncio's transports of a closed
event loop are collected now and then), the exception is printed as "Exception ignored" and the
command goes on, to finish with exit status 0 as if never interrupted. While a command runs, the
handler here also sets a flag, and the command's checkpoints (``run`` below, and the end of
``main``) stop it there. Inside ``asyncio.run`` asyncio's own handler is kept: it cancels the
main task, which nothing swallows.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, TypeVar

T = TypeVar("T")

_requested = False


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    global _requested
    _requested = True
    signal.default_int_handler(signum, frame)


def _ours() -> bool:
    return (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is _on_sigint
    )


@contextmanager
def watching() -> Iterator[None]:
    """Around a command: a Ctrl-C is remembered even where its exception is swallowed. Only
    in the main thread, and only in place of Python's default handler (a host's is kept)."""
    global _requested
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    _requested = False
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def check() -> None:
    """Raise ``KeyboardInterrupt`` if Ctrl-C was pressed while watching (its exception lost)."""
    if _requested and _ours():
        raise KeyboardInterrupt


def run(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` at a checkpoint: a Ctrl-C pressed before stops here, and during it
    asyncio's handler (cancel the main task) is in place, as with no watching at all."""
    if not _ours():
        return asyncio.run(coro)
    if _requested:
        coro.close()  # never started: no "coroutine was never awaited" warning
        raise KeyboardInterrupt
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = asyncio.run(coro)
    finally:
        signal.signal(signal.SIGINT, _on_sigint)
    check()
    return result
