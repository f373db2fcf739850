"""Start-up: what the ``permrank`` command costs before it does anything, against bare Python.

Whole processes, timed from launch:

- ``python -c pass``: the floor (the interpreter and site-packages);
- ``python -c "import permrank"``: the package;
- ``python -m permrank --help``: the parser of every command;
- ``python -m permrank rerank ...``: launch to the first HTTP request a stub endpoint receives
  (the probe of ``/models``) and to the first model call (``/chat/completions``).

The stub endpoint is a stdlib HTTP server in this process (a thread), so it costs the command
nothing; it answers the probe and every window with the identity permutation. Each figure is the
minimum and the median of ``--repeats`` runs (the machine may be shared: read the minimum), as
milliseconds and as the delta over ``python -c pass``. The budget is a delta of 500 ms.

    PYTHONPATH=. python bench/bench_startup.py
    PYTHONPATH=. python bench/bench_startup.py --repeats 9 --importtime

Not a test: pytest does not collect bench/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BUDGET_MS = 500.0


class Stub(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that notes when its first requests arrive."""

    first: dict[str, float] = {}

    def log_message(self, *_: Any) -> None:
        pass

    def _note(self, kind: str) -> None:
        now = time.perf_counter()
        Stub.first.setdefault("any", now)
        Stub.first.setdefault(kind, now)

    def _send(self, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._note("get")
        if self.path.rstrip("/").endswith("/models"):
            self._send({"object": "list", "data": [{"id": "stub", "object": "model"}]})
        else:
            self.send_error(404)

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        if not self.path.endswith("/chat/completions"):
            self._note("post")
            self.send_error(404)
            return
        self._note("model")
        prompt = json.dumps(body.get("messages", []))
        shown = sorted({int(n) for n in re.findall(r"\[(\d+)\]", prompt)})
        answer = " > ".join(f"[{n}]" for n in shown) or "[1]"
        self._send(
            {
                "id": "stub",
                "object": "chat.completion",
                "model": "stub",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110},
            }
        )


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=environment(), cwd=REPO, stdout=subprocess.DEVNULL, check=True)
    return 1000 * (time.perf_counter() - started)


def rerank_first_request(base_url: str, workdir: Path) -> tuple[float, float, float]:
    """Milliseconds from launch to the first request, to the first model call, and to exit."""
    request = {
        "qid": "1",
        "query": "what is a flea",
        "candidates": [{"docid": f"d{i}", "text": f"passage {i} about fleas"} for i in range(4)],
    }
    inp = workdir / "in.jsonl"
    inp.write_text(json.dumps(request) + "\n")
    out = workdir / "out.jsonl"
    for stale in workdir.glob("out*"):
        stale.unlink()
    Stub.first = {}
    argv = [sys.executable, "-m", "permrank", "rerank", "--base-url", base_url]
    argv += ["--model", "stub", "--input", str(inp), "--output", str(out), "--no-cache"]
    started = time.perf_counter()
    proc = subprocess.run(argv, env=environment(), cwd=REPO, capture_output=True, text=True)
    ended = time.perf_counter()
    if proc.returncode != 0 or "any" not in Stub.first:
        sys.exit(f"permrank rerank failed ({proc.returncode}):\n{proc.stderr}")
    first = 1000 * (Stub.first["any"] - started)
    model = 1000 * (Stub.first.get("model", ended) - started)
    return first, model, 1000 * (ended - started)


def row(name: str, values: list[float], floor: float) -> str:
    best, median = min(values), statistics.median(values)
    delta = best - floor
    verdict = "ok" if delta <= BUDGET_MS else "OVER"
    return (
        f"{name:<34} {best:8.0f} {median:8.0f} {delta:+8.0f} {best / floor:6.1f}x  {verdict}"
        if floor
        else f"{name:<34} {best:8.0f} {median:8.0f}"
    )


def importtime(module: str) -> list[tuple[int, str]]:
    """The slowest top-level imports of ``module`` (cumulative microseconds, name)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        env=environment(),
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    out = []
    for line in proc.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            name = parts[2]
            if len(name) - len(name.lstrip()) <= 1:  # top-level imports only
                out.append((int(parts[1]), name.strip()))
    return sorted(out, reverse=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of each (5)")
    parser.add_argument(
        "--importtime", action="store_true", help="also list the slowest imports (python -X)"
    )
    args = parser.parse_args()
    py = sys.executable
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"

    bare = [timed([py, "-c", "pass"]) for _ in range(args.repeats)]
    imp = [timed([py, "-c", "import permrank"]) for _ in range(args.repeats)]
    cli = [timed([py, "-c", "import permrank.cli.main"]) for _ in range(args.repeats)]
    helps = [timed([py, "-m", "permrank", "--help"]) for _ in range(args.repeats)]
    firsts, models, whole = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            first, model, total = rerank_first_request(base_url, Path(tmp))
            firsts.append(first)
            models.append(model)
            whole.append(total)
    server.shutdown()

    floor = min(bare)
    print(f"{'whole process, ms':<34} {'min':>8} {'median':>8} {'delta':>8} {'ratio':>7}")
    print(row("python -c pass", bare, 0))
    print(row("import permrank", imp, floor))
    print(row("import permrank.cli.main", cli, floor))
    print(row("permrank --help", helps, floor))
    print(row("rerank: launch -> first request", firsts, floor))
    print(row("rerank: launch -> first model call", models, floor))
    print(row("rerank: whole run (1 query)", whole, floor))
    if args.importtime:
        for module in ("permrank", "permrank.cli.main"):
            print(f"\nslowest imports of {module} (python -X importtime, ms):")
            for us, name in importtime(module)[:8]:
                print(f"  {us / 1000:7.1f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
