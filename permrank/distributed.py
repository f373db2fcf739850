"""Reranking on a Ray cluster (the ``ray`` extra): Ray brings the machines, the placement and the
retries; permrank brings the work.

Two ways in:

- ``stream_on_ray(factory, requests, ...)``: what ``permrank rerank --ray`` and
  ``permrank distill --ray`` use. The driver reads the input as a stream of query blocks and
  hands each block to one of a few actors, each holding its own ``Reranker`` (built by
  ``factory`` on the worker: its own endpoints and limits, or one in-process vLLM engine per
  GPU); an actor reranks its blocks with the usual concurrency. Rankings come back in input
  order, with at most a few blocks in flight per actor (bounded memory), and the driver writes
  them exactly as a local run does. An actor whose worker dies is restarted by Ray and its
  blocks are redone; each block's result is consumed once, so the output holds each query once.
- ``rerank_dataset(ds, **reranker_options) -> ray.data.Dataset``: for users who already hold a
  Ray Dataset of queries (rows in permrank's JSONL layout: ``qid``, ``query``, ``candidates``);
  ``map_batches`` over an actor pool, each actor a ``Reranker(**reranker_options)``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from permrank.core.errors import BackendError, ConfigError
from permrank.core.types import Ranking, Request

log = logging.getLogger(__name__)

BLOCKS_PER_ACTOR = 4
"""Blocks in flight per actor: one being finished while the next ones start."""
ACTOR_RESTARTS = 4


def require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "--ray needs Ray: pip install 'permrank[ray]' (Ray 2.x with Ray Data)"
        ) from None
    return ray


@contextlib.contextmanager
def ray_session(address: str) -> Iterator[str]:
    """Connected to Ray for the block: ``local`` starts a local instance (stopped on exit),
    ``auto`` joins the cluster this machine belongs to, anything else is a cluster's address
    (``ray://head:10001`` or ``head:6379``). An already connected process keeps its session."""
    ray = require_ray()
    if ray.is_initialized():
        yield str(ray.get_runtime_context().gcs_address)
        return
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    options["address"] = address  # "local" starts a new instance whatever RAY_ADDRESS says
    if address == "local":
        options["num_cpus"] = max(2, os.cpu_count() or 2)
    try:
        ray.init(**options)
    except ConnectionError as exc:
        raise ConfigError(
            f"--ray {address}: cannot join a Ray cluster ({exc}). Start one (`ray start "
            "--head`), give its address, or use --ray local for a Ray instance of this run."
        ) from None
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()


@dataclass
class BlockResult:
    """One block's rankings, in order; ``error`` when a query failed and stopped the block."""

    rankings: list[Ranking]
    error: str | None = None
    error_qid: str | None = None
    pid: int = field(default_factory=os.getpid)


class BlockReranker:
    """A Ray actor (``ray.remote(BlockReranker)``) holding one Reranker for its life."""

    def __init__(self, factory: Callable[[], Any]):
        self.reranker = factory()

    async def rerank(self, block: list[Request]) -> BlockResult:
        rankings: list[Ranking] = []
        try:
            async for ranking in self.reranker.astream(block):
                rankings.append(ranking)
        except BackendError as exc:  # what was done before the failure is kept
            return BlockResult(rankings, str(exc), getattr(exc, "qid", None))
        return BlockResult(rankings)

    async def describe(self) -> dict[str, Any]:
        import resource

        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {
            "pid": os.getpid(),
            "peak_rss_mb": round(peak_mb, 1),
            **self.reranker.backend.describe(),
        }

    def pid(self) -> int:
        return os.getpid()

    async def close(self) -> None:
        await self.reranker.aclose()


def start_actors(factory: Callable[[], Any], actors: int, *, gpus: bool = False) -> list[Any]:
    """``actors`` BlockReranker actors, restarted (and their blocks redone) when a worker dies."""
    ray = require_ray()
    if actors < 1:
        raise ConfigError(f"--ray-actors must be at least 1 (got {actors})")
    cpus = float(ray.cluster_resources().get("CPU", 1))
    options: dict[str, Any] = {
        # An actor mostly waits on its endpoints: half a CPU (one with an engine of its own).
        "num_cpus": min(1.0 if gpus else 0.5, cpus / actors),
        "max_restarts": ACTOR_RESTARTS,
        "max_task_retries": ACTOR_RESTARTS,
        "scheduling_strategy": "SPREAD",
    }
    if gpus:
        options["num_gpus"] = 1
    remote = ray.remote(BlockReranker).options(**options)
    return [remote.remote(factory) for _ in range(actors)]


async def stream_on_ray(
    actors: list[Any],
    requests: Iterable[Request],
    *,
    block_size: int,
    blocks_per_actor: int = BLOCKS_PER_ACTOR,
) -> AsyncIterator[Ranking]:
    """The rankings of ``requests`` in input order, reranked block by block by ``actors``.

    A query that fails stops the stream with ``BackendError`` (``qid`` set) after the rankings
    before it, as a local run does with ``on_error="fail"``."""
    if block_size < 1:
        raise ConfigError(f"--ray-block-size must be at least 1 (got {block_size})")
    ray = require_ray()
    from ray.exceptions import RayError

    source = iter(requests)
    pending: deque[tuple[int, Any]] = deque()
    load = [0] * len(actors)
    exhausted = False
    try:
        while True:
            while not exhausted and len(pending) < blocks_per_actor * len(actors):
                block = list(itertools.islice(source, block_size))
                if not block:
                    exhausted = True
                    break
                index = min(range(len(actors)), key=lambda i: load[i])
                load[index] += 1
                pending.append((index, actors[index].rerank.remote(block)))
            if not pending:
                return
            index, ref = pending.popleft()
            try:
                result: BlockResult = await ref
            except RayError as exc:  # the actor could not be built, or kept dying
                cause = str(exc).strip().splitlines()
                raise BackendError(
                    f"a Ray worker failed ({type(exc).__name__}: {cause[-1] if cause else exc}). "
                    "The queries written so far stand: run again to resume."
                ) from None
            load[index] -= 1
            for ranking in result.rankings:
                yield ranking
            if result.error is not None:
                failure = BackendError(result.error)
                failure.qid = result.error_qid  # type: ignore[attr-defined]
                raise failure
    finally:
        for _, ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref)


def describe_actors(actors: list[Any]) -> list[dict[str, Any]]:
    """What each actor's backend did (calls, tokens, failures per endpoint), for the manifest."""
    ray = require_ray()
    out = []
    for actor in actors:
        try:
            out.append(ray.get(actor.describe.remote(), timeout=30))
        except Exception as exc:  # a dead actor: say so, keep the rest
            out.append({"error": f"{type(exc).__name__}: {exc}"[:300]})
    return out


def stop_actors(actors: list[Any]) -> None:
    ray = require_ray()
    with contextlib.suppress(Exception):
        ray.get([a.close.remote() for a in actors], timeout=30)
    for actor in actors:
        with contextlib.suppress(Exception):
            ray.kill(actor)


def endpoint_totals(described: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per endpoint, the sum over actors of calls, tokens, failures and time."""
    totals: dict[str, dict[str, Any]] = {}
    keys = ("calls", "prompt_tokens", "completion_tokens", "failures", "seconds")
    for actor in described:
        for member in actor.get("endpoints") or []:
            url = member.get("endpoint", "?")
            entry = totals.setdefault(url, {"endpoint": url, **{k: 0 for k in keys}})
            for key in keys:
                entry[key] += member.get(key) or 0
    for entry in totals.values():
        entry["seconds"] = round(entry["seconds"], 3)
    return list(totals.values())


# -- Ray Data ----------------------------------------------------------------------------------


class DatasetReranker:
    """``map_batches`` callable: a batch of query rows -> the same rows reranked."""

    def __init__(self, options: dict[str, Any]):
        from permrank.engine.reranker import Reranker

        self.reranker = Reranker(**options)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from permrank.runs.io import parse_request, ranking_record

        columns = list(batch)
        size = len(batch[columns[0]]) if columns else 0
        requests = []
        for i in range(size):
            row = {column: plain(batch[column][i]) for column in columns}
            requests.append(parse_request(row, path="<ray dataset>", line=i + 1))
        rankings = self.reranker.rerank_batch(requests)
        records = [ranking_record(r) for r in rankings]
        out: dict[str, list[Any]] = {"qid": [], "query": [], "candidates": [], "error": []}
        for ranking, record in zip(rankings, records, strict=True):
            out["qid"].append(ranking.query.qid)
            out["query"].append(ranking.query.text)
            out["candidates"].append(record.get("candidates", record.get("retrieved_results")))
            out["error"].append(ranking.error)
        return out


def plain(value: Any) -> Any:
    """A value of a Ray batch as plain Python (numpy arrays and scalars to lists and numbers)."""
    if hasattr(value, "tolist") and not isinstance(value, str | bytes):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def rerank_dataset(
    ds: Any, *, actors: int = 1, block_size: int = 16, **reranker_options: Any
) -> Any:
    """``ds`` (rows ``qid``, ``query``, ``candidates``: permrank's JSONL layout) reranked by an
    actor pool of ``actors`` Rerankers built as ``Reranker(**reranker_options)``; a lazy
    ``ray.data.Dataset`` of rows ``qid``, ``query``, ``candidates`` (most relevant first, with
    their rank scores) and ``error`` (None unless a query failed with ``on_error="skip"``)."""
    require_ray()
    if actors < 1 or block_size < 1:
        raise ConfigError("actors and block_size must be at least 1")
    return ds.map_batches(
        DatasetReranker,
        fn_constructor_kwargs={"options": reranker_options},
        batch_size=block_size,
        batch_format="numpy",
        concurrency=actors,
        num_cpus=0.5,
    )
