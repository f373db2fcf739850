"""``permrank rerank``: rerank a JSONL file of queries and candidates."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..backends.cache import default_cache_path
from ..backends.probe import Endpoint, endpoint
from ..errors import BackendError, ConfigError
from ..evaluate import evaluate, read_qrels
from ..io import (
    OutputWriter,
    iter_output_records,
    ranking_line,
    read_requests,
    record_docids,
    record_qid,
    recover_output,
    trec_lines,
    trec_lines_of,
    validate_requests,
    write_json_atomic,
)
from ..manifest import build_manifest, now
from ..parse import echo_warning
from ..prompts import render_window
from ..rerank import Reranker
from ..strategies import STRATEGIES
from ..types import Request, Usage

log = logging.getLogger(__name__)

DEFAULT_CONTEXT_WINDOW = 8192
DEFAULT_TIMEOUT_S = 120.0
EMBEDDED_TIMEOUT_S = 900.0


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Options that say which model answers and how it is asked (shared by commands)."""
    g = parser.add_argument_group("model")
    g.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    g.add_argument(
        "--model",
        help="model name the endpoint serves; without --base-url a local model name "
        "(as --local-model)",
    )
    g.add_argument(
        "--backend",
        choices=("openai", "vllm"),
        default="openai",
        help="openai: an OpenAI-compatible endpoint (default); vllm: vLLM in this process, "
        "--model being a Hugging Face model folder (default: the converted SmolLM2), every "
        "window of a round in one generate call (needs the vllm extra)",
    )
    g.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        metavar="VAR",
        help="environment variable holding the API key (default OPENAI_API_KEY); "
        "the key is never logged or written",
    )
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed sent with every request")
    g.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="answer budget per window (default: sized to a full permutation)",
    )
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight (8)")
    g.add_argument("--rps", type=float, default=None, help="requests per second at most")
    g.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds per request (120; 900 for the embedded model)",
    )
    g.add_argument(
        "--max-retries",
        type=int,
        default=5,
        help="retries of a failed request (429, 5xx, timeouts) before giving up (5)",
    )
    g.add_argument(
        "--transport",
        choices=("auto", "openai", "plain"),
        default="auto",
        help="HTTP client: 'plain' (permrank's lean HTTP/1.1 client, a fraction of the CPU per "
        "request), 'openai' (the openai SDK), 'auto' (plain for http:// without a proxy, "
        "else the SDK; the default)",
    )
    g.add_argument(
        "--cache",
        metavar="PATH",
        help="SQLite file of model answers, shared safely by several runs (default: "
        "$PERMRANK_CACHE_DIR/cache.sqlite, else ~/.cache/permrank/cache.sqlite)",
    )
    g.add_argument("--no-cache", action="store_true", help="ask the model every time")

    g = parser.add_argument_group("windows and prompts")
    g.add_argument(
        "--strategy",
        default="sliding",
        choices=sorted(STRATEGIES),
        help="how windows are planned and merged (sliding)",
    )
    g.add_argument("--window-size", type=int, default=20, help="passages per window (20)")
    g.add_argument("--step", type=int, default=None, help="sliding: how far the window moves (10)")
    g.add_argument("--passes", type=int, default=None, help="sliding: passes (1)")
    g.add_argument(
        "--early-stop",
        action="store_true",
        default=None,
        help="sliding: stop the passes when one leaves the top unchanged",
    )
    g.add_argument(
        "--top-n",
        type=int,
        default=None,
        help="tournament, tdpart: leading places guaranteed under a perfect judge (10)",
    )
    g.add_argument(
        "--shuffles",
        type=int,
        default=None,
        help="selfconsistency: orders each window is asked in (3)",
    )
    g.add_argument(
        "--aggregate",
        choices=("borda", "kemeny"),
        default=None,
        help="selfconsistency: how the shuffled answers are combined (borda)",
    )
    g.add_argument(
        "--inner",
        choices=sorted(set(STRATEGIES) - {"selfconsistency"}),
        default=None,
        help="selfconsistency: the strategy whose windows are shuffled (sliding)",
    )
    g.add_argument(
        "--top-k", type=int, default=None, help="rerank only the first K candidates (default: all)"
    )
    g.add_argument(
        "--prompt",
        default="rankgpt",
        help="template: rankgpt, rankzephyr, or a path to a TOML template",
    )
    g.add_argument(
        "--max-passage-tokens",
        type=int,
        default=None,
        help="each passage is cut to this many tokens (300; a named local model's measured "
        "cut when its method is used)",
    )
    g.add_argument(
        "--context-window",
        type=int,
        default=None,
        help="the model's context in tokens; prompts are fitted to it "
        f"(default: what the server reports, else {DEFAULT_CONTEXT_WINDOW})",
    )
    g.add_argument(
        "--tokenizer",
        choices=("auto", "server", "tiktoken"),
        default="auto",
        help="token counts for budgets: the served model's own /tokenize (llama.cpp, vLLM) or "
        "tiktoken's cl100k_base (auto: the server's when it has one)",
    )
    g.add_argument(
        "--constrain",
        choices=("grammar", "regex", "json", "auto"),
        default=None,
        help="force answers into the [i] > [j] shape: a GBNF grammar (llama.cpp), a regex "
        "(vLLM structured outputs) or a JSON schema (OpenAI-style); auto picks by server",
    )

    g = parser.add_argument_group("embedded model (used when there is no --base-url)")
    g.add_argument(
        "--local-model",
        metavar="NAME|PATH.gguf",
        help="model of the embedded llama.cpp server: qwen2.5-coder-0.5b (default), "
        "qwen2.5-coder-1.5b, smollm2-135m (see `permrank models list`) or a GGUF file",
    )
    g.add_argument(
        "--local-parallel",
        type=int,
        default=None,
        help="requests the embedded server works on at once (llama.cpp slots; 1, or what the "
        "named model's measured method uses)",
    )
    g.add_argument(
        "--local-ctx",
        type=int,
        default=4096,
        help="context per window of the embedded server in tokens (4096)",
    )

    from ..methods import METHOD_NAMES

    g = parser.add_argument_group("scoring method")
    g.add_argument(
        "--method",
        default=None,
        choices=METHOD_NAMES,
        help="listwise (generated permutations; the default for --base-url endpoints; a named "
        "local model uses the method measured best for it), pointwise (yes/no logprobs), "
        "likelihood (query likelihood, UPR), first (listwise from the first token's logprobs), "
        "pairwise (A-or-B comparisons, PRP)",
    )
    g.add_argument(
        "--yes-score",
        choices=("softmax", "logprob", "vocab"),
        help="pointwise: softmax over yes/no (default), the yes logprob, or P(yes) over the vocab",
    )
    g.add_argument(
        "--likelihood-mode",
        choices=("auto", "echo", "prompt_logprobs", "forced"),
        help="likelihood: how prompt logprobs are read (auto: echo, else llama.cpp's forced "
        "token grammar; prompt_logprobs: vLLM)",
    )
    g.add_argument(
        "--pairwise",
        choices=("allpairs", "sliding", "heap"),
        help="pairwise: how comparisons are chosen and merged (heap)",
    )
    g.add_argument(
        "--pairwise-k", type=int, help="pairwise sliding/heap: places sorted at the top (10)"
    )
    g.add_argument(
        "--top-logprobs",
        type=int,
        help="alternatives asked per answer token (pointwise/first 20, pairwise 5)",
    )
    g.add_argument(
        "--route",
        choices=("chat", "completions"),
        help="pointwise/first/pairwise: ask /chat/completions (default) or /completions "
        "(base models)",
    )


def reranker_from_args(args: argparse.Namespace, **overrides: Any) -> Reranker:
    """A Reranker as the flags say; defaults they leave open come from ``args.endpoint``."""
    from ..servers.models import settle_args

    settle_args(args)
    endpoint: Endpoint | None = getattr(args, "endpoint", None)
    info = endpoint.info if endpoint is not None else None
    vllm = getattr(args, "backend", "openai") == "vllm"
    if vllm:
        # vLLM in this process: --model is a model folder; no endpoint is probed or started.
        overrides.update(backend="vllm", model=args.model, base_url=None)
    base_url = overrides.get("base_url", args.base_url)
    if not vllm and info is None and (not base_url or not overrides.get("model", args.model)):
        raise ConfigError(
            "give --base-url and --model of an OpenAI-compatible endpoint "
            "(a vLLM server, llama.cpp's server, OpenAI), or start one with "
            "`permrank simulate --data DIR` to try permrank without a model"
        )
    context_window = getattr(args, "context_window", None)
    if context_window is None:
        context_window = (info.context_window if info else None) or DEFAULT_CONTEXT_WINDOW
    elif info is not None and info.context_window and context_window > info.context_window:
        raise ConfigError(
            f"--context-window {context_window} is more than {info.model} has at "
            f"{info.base_url} ({info.context_window} tokens); lower it or leave it out"
        )
    tokenizer = None
    choice = getattr(args, "tokenizer", "auto")
    if choice != "tiktoken" and info is not None:
        tokenizer = info.tokenizer(timeout_s=args.timeout)
    if choice == "server" and tokenizer is None:
        raise ConfigError(
            f"--tokenizer server: {args.base_url or 'the endpoint'} ({info.kind if info else '?'}) "
            "has no /tokenize route; use --tokenizer tiktoken"
        )
    constrain = overrides.get("constrain", getattr(args, "constrain", None))
    if constrain is not None:
        from ..constrain import check_mode, mode_for_server

        kind = "vllm" if vllm else info.kind if info is not None else "unknown"
        constrain = mode_for_server(kind) if constrain == "auto" else constrain
        check_mode(constrain, kind)
    options: dict[str, Any] = dict(
        model=info.model if info else args.model,
        base_url=info.base_url if info else args.base_url,
        strategy=args.strategy,
        window_size=args.window_size,
        step=args.step,
        passes=args.passes,
        top_k=args.top_k,
        top_n=args.top_n,
        strategy_options={
            key: value
            for key in ("early_stop", "shuffles", "aggregate", "inner")
            if (value := getattr(args, key)) is not None
        },
        prompt=args.prompt,
        method=args.method,
        method_options=method_options_of(args),
        temperature=args.temperature,
        seed=args.seed,
        max_tokens=args.max_tokens,
        max_passage_tokens=args.max_passage_tokens,
        context_window=context_window,
        concurrency=args.concurrency,
        rps=args.rps,
        api_key_env=args.api_key_env,
        timeout_s=args.timeout,
        max_retries=args.max_retries,
        transport=getattr(args, "transport", "auto"),
        tokenizer=tokenizer,
        constrain=constrain,
        cache=cache_path_of(args),
    )
    slots = getattr(info, "slots", None) if info is not None else None
    if endpoint is not None and endpoint.server is None and slots and info.kind == "llama.cpp":
        # A llama.cpp server answers `slots` requests at once; more only queue there, on our
        # timeout, and are sent again when it expires: send no more than it works on, and give
        # a slow (CPU) server the embedded model's patience.
        options["concurrency"] = min(args.concurrency, slots)
        if args.timeout == DEFAULT_TIMEOUT_S:
            options["timeout_s"] = EMBEDDED_TIMEOUT_S
    if endpoint is not None and endpoint.server is not None:
        # More requests than the embedded server has slots only queue there, on our timeout,
        # and a CPU can take minutes over a long prompt: no point giving up at 2 minutes.
        options["concurrency"] = min(args.concurrency, endpoint.server.parallel)
        if args.timeout == DEFAULT_TIMEOUT_S:
            options["timeout_s"] = EMBEDDED_TIMEOUT_S
    options.update(overrides)
    return Reranker(**options)


@contextlib.contextmanager
def model_endpoint(args: argparse.Namespace) -> Iterator[Endpoint]:
    """The probed ``--base-url``, or the embedded llama.cpp server for the block's duration."""
    from ..servers.models import settle_args

    settle_args(args)
    with endpoint(
        args.base_url,
        args.model,
        api_key_env=args.api_key_env,
        local_model=getattr(args, "local_model", None),
        local_parallel=getattr(args, "local_parallel", None) or 1,
        local_ctx=getattr(args, "local_ctx", 4096),
    ) as found:
        if found.server is not None and not getattr(args, "quiet", False):
            print(
                f"no --base-url: started llama.cpp with {found.server.model_path.name} at "
                f"{found.base_url} (stopped when the run ends)",
                file=sys.stderr,
            )
        yield found


def run_on_endpoint(args: argparse.Namespace) -> int:
    """``run`` with the model endpoint open (``args.endpoint``), closed however it ends.

    Input, flags and template are checked first: nothing is refused after a server started."""
    prepared = precheck(args)
    if getattr(args, "backend", "openai") == "vllm":
        return run(args, prepared)  # vLLM in this process: no endpoint to probe or start
    with model_endpoint(args) as args.endpoint:
        return run(args, prepared)


def check_settings(args: argparse.Namespace) -> None:
    """Build (and drop) a Reranker from the flags alone: no server is asked or started."""
    reranker_from_args(
        args,
        base_url=args.base_url or "http://127.0.0.1:9/v1",
        model=args.model or "unchecked",
        cache=None,
        constrain=None,
        on_error=args.on_error,
    )


def endpoint_manifest(args: argparse.Namespace) -> dict[str, Any]:
    found: Endpoint | None = getattr(args, "endpoint", None)
    if found is None:
        return {}
    record: dict[str, Any] = {"endpoint": found.info.describe()}
    if getattr(args, "method_choice", None):
        record["method_choice"] = args.method_choice
    if found.server is not None:
        record["embedded_server"] = found.server.describe()
    return record


def cache_path_of(args: argparse.Namespace) -> Path | None:
    """The response cache the flags ask for (``--cache PATH``, ``--no-cache``, or the default)."""
    if getattr(args, "no_cache", False):
        return None
    path = getattr(args, "cache", None)
    return Path(path) if path else default_cache_path()


def add_run_options(parser: argparse.ArgumentParser, *, limit_help: str, skip_help: str) -> None:
    """``--limit``, ``--depth`` and ``--on-error`` of a command that reranks a file of queries;
    ``skip_help`` says what becomes of a failed query with ``--on-error skip``."""
    parser.add_argument("--limit", type=int, default=None, help=limit_help)
    parser.add_argument(
        "--depth", type=int, default=None, help="keep only the first N candidates of each query"
    )
    parser.add_argument(
        "--on-error",
        choices=("fail", "skip"),
        default="fail",
        help="a query that fails after retries stops the run (fail, default) or is "
        f"{skip_help} (skip)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rerank",
        help="rerank a JSONL file of queries and candidates",
        description="Rerank first-stage candidates with an LLM. Input: JSONL, one query a line, "
        'ours ({"qid","query","candidates":[{"docid","text",...}]}) or rank_llm\'s Request '
        "layout, plain or .gz. Output: the same layout in the new order, a TREC run (--trec), "
        "and a run manifest (OUTPUT.manifest.json).",
    )
    p.add_argument("--input", required=True, help="JSONL (or .jsonl.gz) of queries + candidates")
    p.add_argument("--output", required=True, help="reranked JSONL (same layout as the input)")
    p.add_argument("--trec", help="also write a TREC run file here")
    p.add_argument("--manifest", help="run manifest path (default: OUTPUT.manifest.json)")
    p.add_argument("--qrels", help="TREC qrels: print nDCG@10 before and after")
    add_run_options(
        p,
        limit_help="rerank only the first N queries",
        skip_help="written in its input order with the reason",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh; by default a run whose output exists resumes it (queries already "
        "written are kept, failed ones are asked again)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    add_model_options(p)
    p.set_defaults(func=run_on_endpoint)


def limited(requests: Iterator[Request], limit: int | None, depth: int | None) -> Iterator[Request]:
    for request in itertools.islice(requests, limit):
        if depth is not None:
            request.candidates = request.candidates[:depth]
        yield request


def summary_lines(totals: Usage, queries: int, seconds: float) -> list[str]:
    repairs = ", ".join(f"{k} {v}" for k, v in totals.repairs.items() if v)
    return [
        f"{queries} queries in {seconds:.1f} s: {totals.calls} calls "
        f"({totals.cached_calls} from cache), "
        f"{totals.rounds / max(1, queries):.1f} sequential rounds per query",
        f"tokens: {totals.prompt_tokens} prompt + {totals.completion_tokens} completion "
        f"= {totals.total_tokens}",
        f"window answers: {repairs or 'none'}",
        *filter(None, [echo_warning(totals.repairs, totals.calls + totals.cached_calls)]),
    ]


def constrain_line(mode: str, totals: Usage) -> str:
    windows = totals.calls + totals.cached_calls
    repaired = windows - totals.repairs.get("ok", 0)
    return f"constrained ({mode}): {repaired} of {windows} window answers still needed repair"


def check_prompt_fits(reranker: Reranker) -> None:
    """Refuse a window that cannot fit the context, before any call (not at the first window)."""
    pipeline = reranker.pipeline
    size = int(getattr(reranker.strategy, "window_size", 20) or 20)
    render_window(
        pipeline.template,
        "query",
        [("passage", None)] * size,
        budget=pipeline.budget,
        tokenizer=pipeline.tokenizer,
        max_tokens=pipeline.sampling.max_tokens,
    )


def prepare_outputs(args: argparse.Namespace) -> set[str]:
    """Start afresh (``--overwrite``, or no output yet) or repair a killed run's output; the
    qids already done. The TREC run is rebuilt from the JSONL, so the two always agree."""
    out_path = Path(args.output)
    if args.trec and out_path.resolve() == Path(args.trec).resolve():
        raise ConfigError(f"--output {args.output} is also --trec: give another --trec path")
    for path in (args.output, args.trec, args.manifest):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    done: set[str] = set()
    if out_path.exists() and not args.overwrite:
        done, dropped = recover_output(out_path)
        if dropped:
            log.warning(
                "%s: removed %d incomplete or failed line(s) left by an earlier run",
                out_path,
                dropped,
            )
    else:
        OutputWriter(out_path, overwrite=True).close()
    if args.trec:
        tmp = f"{args.trec}.tmp.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as trec:
            if done:
                for record in iter_output_records(out_path):
                    trec.write(trec_lines_of(str(record_qid(record)), record_docids(record)))
        os.replace(tmp, args.trec)
    return done


def precheck(args: argparse.Namespace) -> tuple[int, dict[str, dict[str, int]] | None]:
    """Refuse bad flags and bad input before any model call; the query count and the qrels."""
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be at least 1 (got {args.limit})")
    if args.depth is not None and args.depth < 1:
        raise ConfigError(f"--depth must be at least 1 (got {args.depth})")
    # Everything that can be refused is refused before the first model call.
    if Path(args.output).resolve() == Path(args.input).resolve():
        raise ConfigError(
            f"--output {args.output} is the input file: writing it would destroy the input "
            "while it is read; choose another output path"
        )
    n_queries, _ = validate_requests(args.input, args.limit)
    qrels = read_qrels(args.qrels) if args.qrels else None
    if getattr(args, "endpoint", None) is None and getattr(args, "backend", "openai") != "vllm":
        check_settings(args)
    return n_queries, qrels


def run(
    args: argparse.Namespace,
    prepared: tuple[int, dict[str, dict[str, int]] | None] | None = None,
) -> int:
    n_queries, qrels = prepared if prepared is not None else precheck(args)
    reranker = reranker_from_args(args, on_error=args.on_error)
    check_prompt_fits(reranker)  # the endpoint was probed before (backends.probe)
    done_before = prepare_outputs(args)
    if done_before and not args.quiet:
        print(
            f"resuming: {len(done_before)} queries already in {args.output} "
            "(--overwrite starts afresh)",
            file=sys.stderr,
        )
    started, t0 = now(), time.perf_counter()
    totals = Usage()
    failed: dict[str, str] = {}
    stopped_by: str | None = None
    done = 0
    out = OutputWriter(args.output)
    trec = open(args.trec, "a", encoding="utf-8") if args.trec else None
    bar = tqdm(total=n_queries, unit="query", disable=args.quiet, file=sys.stderr, desc="rerank")
    requests = (
        r
        for r in limited(read_requests(args.input), args.limit, args.depth)
        if r.query.qid not in done_before
    )

    async def go() -> None:
        nonlocal done
        try:
            async for ranking in reranker.astream(requests):
                out.write(ranking_line(ranking))  # the JSONL first: it is what a resume reads
                if trec:
                    trec.write(trec_lines(ranking))
                    trec.flush()
                totals.add(ranking.usage)
                if ranking.error:
                    failed[ranking.query.qid] = ranking.error
                done += 1
                bar.update(1)
                bar.set_postfix(calls=totals.calls, tokens=totals.total_tokens)
        finally:
            await reranker.aclose()

    try:
        bar.update(min(len(done_before), n_queries))
        asyncio.run(go())
    except BackendError as exc:
        qid = getattr(exc, "qid", None)
        if qid is not None:
            failed[str(qid)] = str(exc)
        stopped_by = str(exc)
        raise
    except KeyboardInterrupt:
        stopped_by = "interrupted"
        raise
    except BaseException as exc:
        stopped_by = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        bar.close()
        out.close()
        if trec:
            trec.close()
        seconds = time.perf_counter() - t0
        manifest = build_manifest(
            command="rerank",
            parameters=reranker.manifest() | endpoint_manifest(args),
            totals=totals,
            queries=done,
            failed=failed,
            started=started,
            seconds=seconds,
            files={
                "input": args.input,
                "output": args.output,
                "trec": args.trec,
                "limit": args.limit,
                "depth": args.depth,
            },
            extra={
                "resumed_queries": len(done_before),
                "stopped_by": stopped_by,
                "complete": stopped_by is None,
            },
        )
        write_json_atomic(args.manifest or f"{args.output}.manifest.json", manifest)
    if not args.quiet:
        for line in summary_lines(totals, done, seconds):
            print(line)
        if reranker.constrain:
            print(constrain_line(reranker.constrain, totals))
        if qrels is not None:
            before_requests = limited(read_requests(args.input), args.limit, args.depth)
            before = evaluate(run_of_requests(before_requests), qrels, ["nDCG@10"])
            after = evaluate(run_of_output(args.output), qrels, ["nDCG@10"])
            print(f"nDCG@10: {before['nDCG@10']:.4f} before -> {after['nDCG@10']:.4f} after")
        if failed:
            print(f"{len(failed)} queries failed (input order kept): {', '.join(failed)}")
    return 1 if failed else 0


def run_of_output(path: str) -> dict[str, dict[str, float]]:
    run: dict[str, dict[str, float]] = {}
    for record in iter_output_records(path):
        docids = record_docids(record)
        run[str(record_qid(record))] = {d: float(len(docids) - i) for i, d in enumerate(docids)}
    return run


def run_of_requests(requests: Iterator[Request]) -> dict[str, dict[str, float]]:
    run: dict[str, dict[str, float]] = {}
    for r in requests:
        n = len(r.candidates)
        run[r.query.qid] = {c.docid: float(n - i) for i, c in enumerate(r.candidates)}
    return run


METHOD_FLAGS = {
    "yes_score": "normalisation",
    "likelihood_mode": "mode",
    "pairwise": "aggregation",
    "pairwise_k": "k",
    "top_logprobs": "top_logprobs",
    "route": "route",
}


def method_options_of(args: argparse.Namespace) -> dict[str, Any]:
    """The scoring-method options given on the command line (a flag the method does not take
    is refused, naming the flag)."""
    from ..methods import METHODS

    fields = getattr(METHODS.get(args.method), "__dataclass_fields__", {})
    options = dict(getattr(args, "recipe_options", None) or {})
    for flag, option in METHOD_FLAGS.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        if option not in fields:
            raise ConfigError(
                f"--{flag.replace('_', '-')} does not apply to --method {args.method}"
            )
        options[option] = value
    return options
