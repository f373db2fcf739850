"""Running the rerank API app on loopback for tests (``tests/test_service*.py``)."""

from __future__ import annotations

import threading
import time

import uvicorn

from permrank.engine.reranker import Reranker
from permrank.servers.process import free_port
from permrank.service import ServiceOptions, create_app

MODEL = "permrank-simulator"


class Running:
    """A uvicorn server for ``app`` in a thread, on a free loopback port."""

    def __init__(self, app):
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Running:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "the API server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


def serve(base_url: str, options: ServiceOptions | None = None, **reranker_options) -> Running:
    reranker_options.setdefault("transport", "plain")
    return Running(create_app(lambda: Reranker(MODEL, base_url, **reranker_options), options))
