"""A Ctrl-C is never lost: one whose KeyboardInterrupt lands in a finaliser (and is swallowed
there, "Exception ignored") still stops the command, at its next checkpoint."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from permrank.cli import interrupt


class SignalsInItsFinaliser:
    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10_000):  # the handler runs here, inside __del__: its exception is lost
            pass


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_ctrl_c_swallowed_by_a_finaliser_still_stops_the_command() -> None:
    with interrupt.watching():
        SignalsInItsFinaliser()  # collected at once; Python prints "Exception ignored"
        with pytest.raises(KeyboardInterrupt):
            interrupt.check()
        ran = []

        async def work() -> None:
            ran.append(True)

        with pytest.raises(KeyboardInterrupt):  # the next asyncio.run does not start
            interrupt.run(work())
        assert not ran
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handed back


def test_asyncio_keeps_its_own_ctrl_c_inside_a_run() -> None:
    async def handler_inside() -> object:
        await asyncio.sleep(0)
        return signal.getsignal(signal.SIGINT)

    with interrupt.watching():
        inside = interrupt.run(handler_inside())
        interrupt.check()  # nothing pressed: no stop
    # asyncio's Runner installs its handler (cancel the main task) only over the default one
    assert inside is not interrupt._on_sigint
    assert inside is not signal.default_int_handler


def test_without_watching_nothing_changes() -> None:
    interrupt.check()
    assert interrupt.run(asyncio.sleep(0, result=3)) == 3
