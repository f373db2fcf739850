"""vLLM in this process (``--backend vllm``): every window of a round, across all queries, in one
``LLM.chat`` call.

The driver runs one coroutine per query; each asks its windows through ``complete()`` as usual.
Here those calls are not sent one by one: they are collected until every coroutine that is about
to ask has asked (the event loop has gone quiet), and the whole batch goes to vLLM in a single
``llm.chat(conversations, [SamplingParams...])`` call, which applies the model's chat template
and schedules the sequences together (continuous batching, shared prefixes cached). The call runs
in one worker thread, so the event loop stays free; the answers are fanned back to the waiting
coroutines. Windows asked while a batch is running form the next batch.

vllm is imported only here, and only when the engine starts. vLLM runs its engine in a spawned
process: a script that builds a Reranker with this backend at import time needs the
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import queue
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from permrank.core.errors import BackendError, ConfigError, PermrankError
from permrank.core.types import Completion

log = logging.getLogger(__name__)

EXTRA_FIELDS = ("structured_outputs", "response_format", "grammar")
"""Extra request fields this backend understands (constrained decoding)."""


@dataclass
class _Window:
    messages: list[dict[str, str]]
    sampling: dict[str, Any]
    future: asyncio.Future[Completion]


@dataclass
class BatchRecord:
    """One ``llm.chat`` call: how many windows it carried and what it cost."""

    windows: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float


class HfTokenizer:
    """The model folder's own tokenizer (transformers), for prompt budgets."""

    def __init__(self, model_dir: Path):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(model_dir))
        self.name = f"hf:{model_dir.name}"

    def count(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False))

    def truncate(self, text: str, max_tokens: int) -> str:
        ids = self._tok.encode(text, add_special_tokens=False)
        if len(ids) <= max_tokens:
            return text
        return str(self._tok.decode(ids[: max(0, max_tokens)])).rstrip("\ufffd")


def structured_outputs_of(extra: dict[str, Any]) -> dict[str, Any] | None:
    """Map OpenAI-style extra fields to vLLM's ``StructuredOutputsParams`` arguments."""
    unknown = sorted(set(extra) - set(EXTRA_FIELDS))
    if unknown:
        raise ConfigError(
            f"--backend vllm cannot send request field(s) {', '.join(unknown)}; "
            f"it understands {', '.join(EXTRA_FIELDS)}"
        )
    if "structured_outputs" in extra:
        return dict(extra["structured_outputs"])
    if "response_format" in extra:
        response_format = extra["response_format"]
        if response_format.get("type") == "json_schema":
            return {"json": response_format["json_schema"]["schema"]}
        if response_format.get("type") == "json_object":
            return {"json_object": True}
        raise ConfigError(f"--backend vllm: unsupported response_format {response_format!r}")
    if "grammar" in extra:
        return {"grammar": extra["grammar"]}
    return None


class VllmInProcessBackend:
    """``vllm.LLM`` on a Hugging Face model folder; windows batched per round.

    ``max_model_len`` is the context in tokens; ``kv_cache_gb`` the KV cache on a CPU (set as
    ``VLLM_CPU_KVCACHE_SPACE`` unless already set); ``engine_options`` go to ``vllm.LLM`` as
    they are (they override what is set here). ``settle_s`` is how long the batcher waits with no
    new window before it sends a batch.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        max_model_len: int = 4096,
        kv_cache_gb: int = 2,
        served_model_name: str | None = None,
        engine_options: dict[str, Any] | None = None,
        settle_s: float = 0.005,
        quiet_iterations: int = 20,
    ):
        from permrank.servers.vllm import check_model_dir, require_vllm, stop_at_exit

        require_vllm()  # refused before any work, not at the first window
        self.model_dir = check_model_dir(model_dir)
        self.model = served_model_name or self.model_dir.resolve().name
        self.endpoint = f"vllm-inprocess:{self.model_dir}"
        self.max_model_len = max_model_len
        self.kv_cache_gb = kv_cache_gb
        self.engine_options = dict(engine_options or {})
        self.settle_s = settle_s
        self.quiet_iterations = quiet_iterations
        self.batches: list[BatchRecord] = []
        """Every ``llm.chat`` call made, in order."""
        self.load_s: float | None = None
        self._llm: Any = None
        self._start_lock = threading.Lock()
        self._pending: list[_Window] = []
        self._wakeup: asyncio.Event | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._reaper: subprocess.Popen[bytes] | None = None
        # Here, not in start() (which may run in a worker thread): signal hooks need the main one.
        stop_at_exit(self)

    # -- the engine --------------------------------------------------------------------------
    def start(self) -> VllmInProcessBackend:
        """Load the model into vLLM (blocking; ~20 s for SmolLM2 on an idle CPU)."""
        with self._start_lock:
            if self._llm is not None:
                return self
            from permrank.servers.vllm import (
                cuda_available,
                descendants,
                require_vllm,
                start_reaper,
                stop_at_exit,
                vllm_environment,
            )

            require_vllm()
            cuda = cuda_available()
            for key, value in vllm_environment(cuda=cuda, kv_cache_gb=self.kv_cache_gb).items():
                os.environ.setdefault(key, value)
            from vllm import LLM

            options: dict[str, Any] = dict(
                model=str(self.model_dir),
                served_model_name=self.model,
                max_model_len=self.max_model_len,
                enable_prefix_caching=True,
                enforce_eager=not cuda,
            )
            options.update(self.engine_options)
            started = time.perf_counter()
            log.info("loading %s into vLLM (%s)", self.model_dir, "CUDA" if cuda else "CPU")
            before = set(descendants(os.getpid()))
            stop_at_exit(self)
            try:
                self._llm = LLM(**options)
            except Exception as exc:
                raise BackendError(
                    f"vLLM could not load {self.model_dir}: {type(exc).__name__}: {exc}"
                ) from exc
            finally:
                # vLLM's engine processes do not die with us: a reaper kills them if we do.
                engine = [p for p in descendants(os.getpid()) if p not in before]
                self._reaper = start_reaper(engine)
            self.load_s = time.perf_counter() - started
            log.info("vLLM loaded %s in %.1f s", self.model, self.load_s)
        return self

    def tokenizer(self) -> HfTokenizer:
        return HfTokenizer(self.model_dir)

    def _run_worker(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job()

    def _in_worker(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        """Run ``fn`` in the worker thread (daemon: never holds up interpreter exit)."""
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(
                target=self._run_worker, name="permrank-vllm", daemon=True
            )
            self._worker.start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def settle(result: Any, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        def job() -> None:
            try:
                result, error = fn(), None
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                result, error = None, exc
            if not loop.is_closed():
                loop.call_soon_threadsafe(settle, result, error)

        self._jobs.put(job)
        return future

    # -- batching ----------------------------------------------------------------------------
    async def complete(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Completion:
        sampling: dict[str, Any] = dict(temperature=temperature, max_tokens=max_tokens, seed=seed)
        structured = structured_outputs_of(extra or {})
        if structured is not None:
            sampling["structured_outputs"] = structured
        loop = asyncio.get_running_loop()
        window = _Window(messages, sampling, loop.create_future())
        self._pending.append(window)
        if self._flusher is None or self._flusher.done():
            self._wakeup = asyncio.Event()
            self._flusher = loop.create_task(self._flush_forever())
        assert self._wakeup is not None
        self._wakeup.set()
        return await window.future

    async def _settle(self) -> None:
        """Wait until no coroutine that is about to ask a window is still on its way."""
        while True:
            before = len(self._pending)
            for _ in range(self.quiet_iterations):
                await asyncio.sleep(0)
            await asyncio.sleep(self.settle_s)
            if len(self._pending) == before:
                return

    async def _flush_forever(self) -> None:
        assert self._wakeup is not None
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await self._settle()
            batch, self._pending = self._pending, []
            batch = [w for w in batch if not w.future.cancelled()]
            if not batch:
                continue
            if self._llm is None:
                try:
                    await self._in_worker(self.start)
                except BaseException as exc:
                    self._fail(batch, exc)
                    raise
            try:
                completions = await self._in_worker(functools.partial(self._generate, batch))
            except asyncio.CancelledError:
                self._fail(batch, BackendError("cancelled"))
                raise
            except Exception as exc:  # noqa: BLE001 - reported to every window of the batch
                self._fail(batch, exc)
                continue
            for w, completion in zip(batch, completions, strict=True):
                if not w.future.done():
                    w.future.set_result(completion)

    @staticmethod
    def _fail(batch: list[_Window], exc: BaseException) -> None:
        error = exc if isinstance(exc, PermrankError) else None
        for w in batch:
            if not w.future.done():
                w.future.set_exception(
                    error
                    or BackendError(
                        f"vLLM failed on a batch of {len(batch)} windows: "
                        f"{type(exc).__name__}: {exc}"
                    )
                )

    def _generate(self, batch: list[_Window]) -> list[Completion]:
        """One ``llm.chat`` call for the whole batch (in the worker thread)."""
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        params = []
        for w in batch:
            options = dict(w.sampling)
            if "structured_outputs" in options:
                options["structured_outputs"] = StructuredOutputsParams(
                    **options["structured_outputs"]
                )
            params.append(SamplingParams(**options))
        started = time.perf_counter()
        outputs = self._llm.chat([w.messages for w in batch], params, use_tqdm=False)
        seconds = time.perf_counter() - started
        completions = []
        for output in outputs:
            answer = output.outputs[0]
            completions.append(
                Completion(
                    text=answer.text,
                    prompt_tokens=len(output.prompt_token_ids or []),
                    completion_tokens=len(answer.token_ids),
                    latency_s=seconds,
                    finish_reason=answer.finish_reason,
                )
            )
        record = BatchRecord(
            windows=len(batch),
            prompt_tokens=sum(c.prompt_tokens for c in completions),
            completion_tokens=sum(c.completion_tokens for c in completions),
            seconds=seconds,
        )
        self.batches.append(record)
        log.info(
            "vLLM batch of %d windows: %d prompt + %d completion tokens in %.2f s",
            record.windows,
            record.prompt_tokens,
            record.completion_tokens,
            seconds,
        )
        return completions

    # -- the Backend protocol ----------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {
            "backend": "vllm-inprocess",
            "model_dir": str(self.model_dir),
            "model": self.model,
            "max_model_len": self.max_model_len,
            "prefix_caching": True,
            "engine_options": self.engine_options,
            "load_s": self.load_s,
            "generate_calls": len(self.batches),
            "batch_windows": [b.windows for b in self.batches],
            "prompt_tokens": sum(b.prompt_tokens for b in self.batches),
            "completion_tokens": sum(b.completion_tokens for b in self.batches),
            "generate_s": sum(b.seconds for b in self.batches),
        }

    async def aclose(self) -> None:
        """Stop the batcher and vLLM's engine process."""
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
        self.shutdown()

    def shutdown(self) -> None:
        """Stop vLLM's engine processes and the worker thread (a batch in flight then fails)."""
        from permrank.servers.vllm import forget_at_exit, stop_reaper

        forget_at_exit(self)
        if self._worker is not None:
            self._jobs.put(None)
            self._worker = None
        llm, self._llm = self._llm, None
        engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            try:
                engine_core.shutdown(timeout=10)
            except Exception as exc:  # noqa: BLE001 - best effort at exit
                log.warning("vLLM engine shutdown: %s", exc)
        # Whatever of the engine is still alive (a busy engine ignores SIGTERM) is killed.
        stop_reaper(self._reaper)
        self._reaper = None

    stop = shutdown
