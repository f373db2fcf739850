"""Scale-out flags shared by ``rerank`` and ``distill``: several endpoints (``--base-url`` given
several times, ``--endpoints FILE``) and a Ray cluster (``--ray``).

The commands call three hooks and keep their own reading, resuming and writing:
``endpoints_of(args)`` (what to probe and send to), ``rankings(args, reranker, requests,
factory)`` (the rankings of the queries still to do, in input order: from the local engine, or
from actors on Ray) and ``executor_manifest(args)`` (what the manifest says ran them).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any

from permrank.core.errors import ConfigError

if TYPE_CHECKING:  # imported where used: the parsers are built without aiohttp or pydantic
    from permrank.core.types import Ranking, Request, Usage


class BaseUrlAction(argparse.Action):
    """``--base-url`` may be given several times: ``args.base_urls`` keeps them all and
    ``args.base_url`` the first (what single-endpoint code reads)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        urls = [*(getattr(namespace, "base_urls", None) or []), str(values)]
        namespace.base_urls = urls
        namespace.base_url = urls[0]


def add_endpoint_options(group: Any) -> None:
    group.add_argument(
        "--base-url",
        action=BaseUrlAction,
        help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1; give it several times "
        "for replicas of one model (windows go to the least busy; --concurrency is per endpoint)",
    )
    group.add_argument(
        "--endpoints",
        metavar="FILE",
        help="replicas of one model: one base URL a line, optionally followed by a weight "
        "(e.g. 'http://gpu2:8000/v1 2'); # comments allowed; adds to --base-url",
    )


def add_ray_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Ray (the ray extra)")
    g.add_argument(
        "--ray",
        metavar="auto|local|ADDRESS",
        help="run on a Ray cluster: 'auto' (the cluster of this machine), 'local' (a Ray "
        "instance started and stopped for this run) or a cluster address (ray://head:10001); "
        "same output files as a local run",
    )
    g.add_argument(
        "--ray-actors",
        type=int,
        default=None,
        help="actors reranking blocks of queries, each with every endpoint and its share of "
        "--concurrency (default: one per endpoint; with --backend vllm one per GPU)",
    )
    g.add_argument(
        "--ray-block-size",
        type=int,
        default=None,
        help="queries per block sent to an actor (default: the actor's requests in flight)",
    )


def endpoints_of(args: argparse.Namespace) -> list[tuple[str, float]]:
    """Every endpoint given (``--base-url`` s, then ``--endpoints``), as ``(url, weight)``;
    sets ``args.base_url`` to the first. Read once per run."""
    cached = getattr(args, "_endpoint_specs", None)
    if cached is not None:
        return cached
    urls = getattr(args, "base_urls", None) or ([args.base_url] if args.base_url else [])
    specs = [(url, 1.0) for url in urls]
    if getattr(args, "endpoints", None):
        from permrank.backends.pool import read_endpoints

        specs += read_endpoints(args.endpoints)
    seen = [url.rstrip("/") for url, _ in specs]
    repeated = {url for url in seen if seen.count(url) > 1}
    if repeated:
        raise ConfigError(f"endpoint given twice: {', '.join(sorted(repeated))}")
    if specs:
        args.base_url = specs[0][0]
    args._endpoint_specs = specs
    return specs


def probe_target(args: argparse.Namespace) -> str | list[str] | None:
    """What to probe: the one ``--base-url``, or every replica."""
    specs = endpoints_of(args)
    return [url for url, _ in specs] if len(specs) > 1 else args.base_url


def base_url_option(args: argparse.Namespace, probed_url: str | None) -> Any:
    """``Reranker(base_url=...)``: the probed URL, or every replica with its weight."""
    specs = endpoints_of(args)
    return specs if len(specs) > 1 else probed_url


def replicas_manifest(endpoint: Any) -> dict[str, Any]:
    replicas = getattr(endpoint, "replicas", None) or []
    if len(replicas) < 2:
        return {}
    return {"endpoints": [{"base_url": r.base_url, **r.describe()} for r in replicas]}


# -- Ray ---------------------------------------------------------------------------------------


def _worker_args(args: argparse.Namespace, concurrency: int) -> argparse.Namespace:
    """The flags as an actor needs them: no embedded server, no function, its share of the
    concurrency."""
    worker = copy.copy(args)
    for name in ("func", "executor"):
        if hasattr(worker, name):
            delattr(worker, name)
    worker.concurrency = concurrency
    worker.ray = None
    return worker


def check(args: argparse.Namespace) -> None:
    """Refuse ``--ray`` flags that cannot work, before any server is started or asked."""
    if not getattr(args, "ray", None):
        return
    from permrank.distributed import require_ray

    require_ray()
    for flag in ("ray_actors", "ray_block_size"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1 (got {value})")
    if getattr(args, "backend", "openai") != "vllm" and not endpoints_of(args):
        raise ConfigError(
            "--ray needs --base-url or --endpoints: the embedded model runs in this process "
            "only (or use --backend vllm for one vLLM engine per GPU)"
        )


async def rankings(
    args: argparse.Namespace,
    reranker: Any,
    requests: Iterable[Request],
    factory: Callable[..., Any],
    *,
    spent: Usage | None = None,
    **overrides: Any,
) -> AsyncIterator[Ranking]:
    """The rankings of ``requests`` in input order: ``reranker.astream`` here, or with
    ``--ray`` actors each holding ``factory(args, **overrides)`` (built on its worker)."""
    address = getattr(args, "ray", None)
    if not address:
        async for ranking in reranker.astream(requests, spent=spent):
            yield ranking
        return
    from permrank import distributed

    check(args)
    vllm = getattr(args, "backend", "openai") == "vllm"
    specs = endpoints_of(args)
    started = time.perf_counter()
    with distributed.ray_session(address) as cluster:
        ray = distributed.require_ray()
        gpus = int(ray.cluster_resources().get("GPU", 0)) if vllm else 0
        actors = args.ray_actors or (max(1, gpus) if vllm else max(1, len(specs)))
        per_actor = max(1, math.ceil(args.concurrency / actors))
        block_size = args.ray_block_size or per_actor * max(1, len(specs))
        worker = _worker_args(args, per_actor)
        pool = distributed.start_actors(
            functools.partial(factory, worker, **overrides), actors, gpus=gpus > 0
        )
        args.executor = {
            "name": "ray",
            "address": cluster,
            "workers": actors,
            "block_size": block_size,
            "concurrency_per_actor": per_actor,
        }
        try:
            # Ray's start-up (joining or starting it, the actors built), apart from the run.
            args.executor["worker_pids"] = [await ref for ref in [a.pid.remote() for a in pool]]
            args.executor["startup_s"] = round(time.perf_counter() - started, 3)
            async for ranking in distributed.stream_on_ray(pool, requests, block_size=block_size):
                if spent is not None:  # an actor's answers arrive with its finished block
                    spent.add(ranking.usage)
                yield ranking
        finally:
            with contextlib.suppress(Exception):
                described = distributed.describe_actors(pool)
                args.executor["actors"] = described
                args.executor["endpoints"] = distributed.endpoint_totals(described)
                absorb(reranker.backend, args.executor["endpoints"])
            distributed.stop_actors(pool)


def absorb(backend: Any, totals: list[dict[str, Any]]) -> None:
    """Add what the actors' endpoints did to the driver's pool, whose ``describe()`` the
    manifest records (the driver itself sends nothing)."""
    members = getattr(getattr(backend, "inner", backend), "members", None) or []
    by_url = {entry["endpoint"]: entry for entry in totals}
    for member in members:
        entry = by_url.get(member.backend.endpoint)
        if entry is not None:
            member.calls += entry["calls"]
            member.prompt_tokens += entry["prompt_tokens"]
            member.completion_tokens += entry["completion_tokens"]
            member.failures += entry["failures"]
            member.seconds += entry["seconds"]


def executor_manifest(args: argparse.Namespace) -> dict[str, Any]:
    """``{"executor": ...}``: local, or Ray with its address, workers and per-endpoint totals."""
    return {"executor": getattr(args, "executor", None) or {"name": "local"}}
