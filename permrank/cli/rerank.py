"""``permrank rerank``: rerank a JSONL file of queries and candidates."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from permrank.cli import scaleout
from permrank.core.errors import ConfigError, PermrankError
from permrank.core.parse import echo_warning
from permrank.core.scores import rank_scores
from permrank.core.strategies import STRATEGIES, describe_strategy

# Heavy modules (aiohttp, pydantic models, ir_measures, tqdm) are imported where they are used,
# so that ``permrank --help`` and the other commands do not pay for them.
if TYPE_CHECKING:
    from permrank.backends.probe import Endpoint
    from permrank.core.types import Request, Usage
    from permrank.engine.reranker import Reranker
    from permrank.runs.store import RunStore

log = logging.getLogger(__name__)

METHOD_NAMES = ("listwise", "pointwise", "likelihood", "first", "pairwise", "score")

DEFAULT_CONTEXT_WINDOW = 8192
DEFAULT_TIMEOUT_S = 120.0
EMBEDDED_TIMEOUT_S = 900.0


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Options that say which model answers and how it is asked (shared by commands)."""
    g = parser.add_argument_group("model")
    scaleout.add_endpoint_options(g)
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
    g.add_argument(
        "--concurrency", type=int, default=8, help="requests in flight, per endpoint (8)"
    )
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
        choices=("auto", "openai", "aiohttp", "plain"),
        default="auto",
        help="HTTP client: 'aiohttp' (or 'plain': aiohttp, a fraction of the SDK's CPU per "
        "request), 'openai' (the openai SDK), 'auto' (aiohttp for http:// without a proxy, "
        "else the SDK; the default)",
    )
    g.add_argument(
        "--max-response-bytes",
        type=int,
        default=32 * 1024 * 1024,
        help="the largest answer read from the endpoint; a larger one is an error (32 MiB)",
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
        metavar="N",
        help="places guaranteed at the top: tournament and tdpart put the true top N of a "
        "perfect judge first; --method pairwise (sliding, heap) sorts the first N (10)",
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
        "--top-k",
        type=int,
        default=None,
        metavar="K",
        help="rerank only the first K candidates of each query; the others follow them in "
        "their input order. Compare --depth, which drops them (default: all)",
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

    g = parser.add_argument_group("scoring method")
    g.add_argument(
        "--method",
        default=None,
        choices=METHOD_NAMES,  # engine.methods.METHOD_NAMES (a test keeps them equal)
        help="listwise (generated permutations; the default for --base-url endpoints; a named "
        "local model uses the method measured best for it), pointwise (yes/no logprobs), "
        "likelihood (query likelihood, UPR), first (listwise from the first token's logprobs), "
        "pairwise (A-or-B comparisons, PRP), score (a learned head's scores through the "
        "endpoint's rerank API)",
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
        "--pairwise-k",
        type=int,
        dest="pairwise_k",
        help="the same as --top-n for --method pairwise (older name)",
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
    g.add_argument(
        "--score-api",
        choices=("auto", "rerank", "tei", "score"),
        help="score: the endpoint's API for a learned relevance head: rerank (Cohere/Jina/vLLM "
        "/v1/rerank), tei (TEI /rerank), score (vLLM /score); auto finds what it serves",
    )
    g.add_argument("--score-batch", type=int, help="score: passages per rerank/score request (32)")


def reranker_from_args(args: argparse.Namespace, **overrides: Any) -> Reranker:
    """A Reranker as the flags say; defaults they leave open come from ``args.endpoint``."""
    from permrank.engine.reranker import Reranker
    from permrank.servers.models import settle_args

    settle_args(args)
    endpoint: Endpoint | None = getattr(args, "endpoint", None)
    info = endpoint.info if endpoint is not None else None
    scaleout.endpoints_of(args)  # --endpoints FILE read, args.base_url its first
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
        from permrank.core.constrain import check_mode, mode_for_server

        kind = "vllm" if vllm else info.kind if info is not None else "unknown"
        constrain = mode_for_server(kind) if constrain == "auto" else constrain
        check_mode(constrain, kind)
    options: dict[str, Any] = dict(
        model=info.model if info else args.model,
        base_url=scaleout.base_url_option(args, info.base_url if info else args.base_url),
        strategy=args.strategy,
        window_size=args.window_size,
        step=args.step,
        passes=args.passes,
        top_k=args.top_k,
        top_n=None if args.method == "pairwise" else args.top_n,  # pairwise: its own
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
        max_response_bytes=getattr(args, "max_response_bytes", 32 * 1024 * 1024),
        server_info=info,
        tokenizer=tokenizer,
        constrain=constrain,
        cache=cache_path_of(args),
    )
    slots = info.slots if info is not None else None
    if (
        endpoint is not None
        and endpoint.server is None
        and slots
        and info
        and info.kind == "llama.cpp"
    ):
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


def embedded_model_file(args: argparse.Namespace) -> Path | None:
    """The GGUF the embedded server will load, when the flags say it (None when unsure)."""
    if args.base_url or getattr(args, "backend", "openai") == "vllm":
        return None
    local = getattr(args, "local_model", None)
    if local:
        return Path(local)
    if args.model:  # a local model named by --model: the server says which file it loaded
        return None
    try:
        from permrank.servers.llamacpp import default_model_path

        return default_model_path()
    except PermrankError:
        return None


def embedded_notice(args: argparse.Namespace) -> str:
    """The first line of a run without ``--base-url``: which model, that it is local, and how
    to use a real endpoint instead."""
    path = embedded_model_file(args)
    model = path.name if path is not None else (args.model or "the default local model")
    return (
        f"no --base-url: using the local model {model} on this machine (embedded llama.cpp, "
        "CPU; a small model, for trying permrank). For a real model give --base-url URL "
        "--model NAME of an OpenAI-compatible endpoint (vLLM, llama.cpp's server, OpenAI)."
    )


@contextlib.contextmanager
def model_endpoint(args: argparse.Namespace) -> Iterator[Endpoint]:
    """The probed ``--base-url``, or the embedded llama.cpp server for the block's duration."""
    from permrank.backends.probe import endpoint
    from permrank.servers.models import settle_args

    settle_args(args)
    quiet = getattr(args, "quiet", False)
    if not args.base_url and not getattr(args, "notice_shown", False):
        print(embedded_notice(args), file=sys.stderr, flush=True)  # before the slow start
        args.notice_shown = True
    with endpoint(
        scaleout.probe_target(args),
        args.model,
        api_key_env=args.api_key_env,
        local_model=getattr(args, "local_model", None),
        local_parallel=getattr(args, "local_parallel", None) or 1,
        local_ctx=getattr(args, "local_ctx", 4096),
        wait_s=getattr(args, "timeout", None),
    ) as found:
        if found.server is not None and not quiet:
            print(
                f"started llama.cpp with {found.server.model_path.name} at "
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


def check_settings(args: argparse.Namespace) -> Reranker:
    """Build a Reranker from the flags alone: no server is asked or started, no model loaded."""
    from permrank.core.tokens import ApproximateTokenizer

    if getattr(args, "backend", "openai") == "vllm":
        args = argparse.Namespace(**{**vars(args), "backend": "openai"})
    return reranker_from_args(
        args,
        base_url=args.base_url or "http://127.0.0.1:9/v1",
        model=args.model or "unchecked",
        cache=None,
        constrain=None,
        on_error=args.on_error,
        # nothing is counted here: tiktoken's tables load only if the run itself counts with them
        tokenizer=ApproximateTokenizer(),
    )


def endpoint_manifest(args: argparse.Namespace) -> dict[str, Any]:
    found: Endpoint | None = getattr(args, "endpoint", None)
    if found is None:
        return {}
    record: dict[str, Any] = {
        "endpoint": found.info.describe(),
        **scaleout.replicas_manifest(found),
    }
    if getattr(args, "method_choice", None):
        record["method_choice"] = args.method_choice
    if found.server is not None:
        record["embedded_server"] = found.server.describe()
    return record


def cache_path_of(args: argparse.Namespace) -> Path | None:
    """The response cache the flags ask for (``--cache PATH``, ``--no-cache``, or the default)."""
    from permrank.backends.cache import default_cache_path

    if getattr(args, "no_cache", False):
        return None
    path = getattr(args, "cache", None)
    return Path(path) if path else default_cache_path()


def add_run_options(parser: argparse.ArgumentParser, *, limit_help: str, skip_help: str) -> None:
    """``--limit``, ``--depth`` and ``--on-error`` of a command that reranks a file of queries;
    ``skip_help`` says what becomes of a failed query with ``--on-error skip``."""
    parser.add_argument("--limit", type=int, default=None, help=limit_help)
    parser.add_argument(
        "--depth",
        type=int,
        default=None,
        metavar="N",
        help="read only the first N candidates of each query; the others are dropped (not in "
        "the output). Compare --top-k, which keeps them (default: all)",
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
    scaleout.add_ray_options(p)
    p.set_defaults(func=run_on_endpoint)


def limited(requests: Iterator[Request], limit: int | None, depth: int | None) -> Iterator[Request]:
    for request in itertools.islice(requests, limit):
        if depth is not None:
            request.candidates = request.candidates[:depth]
        yield request


def summary_lines(totals: Usage, queries: int, seconds: float) -> list[str]:
    """The end of a run in plain words: what was asked of the model and what it answered."""
    repairs = ", ".join(f"{k} {v}" for k, v in totals.repairs.items() if v)
    in_a_row = totals.rounds / max(1, queries)
    lines = [
        # "N queries in", "N calls": the words earlier versions printed, kept for scripts
        f"{queries} queries in {seconds:.1f} s: {totals.calls} calls to the model, "
        f"{totals.cached_calls} {plural(totals.cached_calls, 'answer')} from the cache",
        f"tokens: {totals.prompt_tokens} in prompts, {totals.completion_tokens} in answers "
        f"({totals.total_tokens} in all)",
        f"window answers: {repairs or 'none'}",
        *filter(None, [echo_warning(totals.repairs, totals.calls + totals.cached_calls)]),
    ]
    if totals.rounds:
        lines.insert(
            1,
            f"per query: {in_a_row:.3g} {plural(in_a_row, 'round')} of windows, one after "
            "another (the windows of a round are asked together)",
        )
    if not queries and not totals.calls and not totals.cached_calls:
        return [f"0 queries left to rerank ({seconds:.1f} s): nothing asked of the model"]
    return lines


def plural(count: float, one: str, many: str | None = None) -> str:
    return one if count == 1 else (many or one + "s")


def constrain_line(mode: str, totals: Usage) -> str:
    windows = totals.calls + totals.cached_calls
    repaired = windows - totals.repairs.get("ok", 0)
    return f"constrained ({mode}): {repaired} of {windows} window answers still needed repair"


def check_prompt_fits(reranker: Reranker) -> None:
    """Refuse a window that cannot fit the context, before any call (not at the first window)."""
    from permrank.core.prompts import render_window

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
    from permrank.runs.io import (
        OutputWriter,
        iter_output_records,
        record_docids,
        record_qid,
        recover_output,
        trec_lines_of,
    )

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
    from permrank.runs.io import validate_requests
    from permrank.runs.store import file_sha256

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
    scaleout.check(args)
    n_queries, _ = validate_requests(args.input, args.limit)
    qrels = None
    if args.qrels:  # ir_measures is imported only when there is something to measure
        from permrank.runs.evaluate import read_qrels

        qrels = read_qrels(args.qrels)
    args.input_sha256 = file_sha256(args.input)
    reranker = check_settings(args)
    # An output made with other settings is refused now: before any server starts.
    run_store(args).check(run_fingerprint(args, reranker, resolved=False), complete=False)
    return n_queries, qrels


def run_store(args: argparse.Namespace) -> RunStore:
    """The output and the record of what made it (``OUTPUT.run.json``)."""
    from permrank.runs.store import RunStore

    store = RunStore(
        args.output, f"{args.output}.run.json", overwrite=args.overwrite, flag="--output"
    )
    store.input_path = str(Path(args.input).resolve())
    return store


def endpoint_identity(args: argparse.Namespace, resolved: bool) -> str | None:
    """Where answers come from: the endpoint's URL, or the local model file's identity (never
    the embedded server's random port); None when not known before the endpoint is."""
    from permrank.runs.store import model_file_identity

    if getattr(args, "backend", "openai") == "vllm":
        return f"vllm in this process: {args.model or '(the default model folder)'}"
    found: Endpoint | None = getattr(args, "endpoint", None)
    if resolved and found is not None:
        if found.server is not None:
            return model_file_identity(found.server.model_path)
        return found.base_url.rstrip("/")
    if args.base_url:
        return str(args.base_url).rstrip("/")
    path = embedded_model_file(args)
    return model_file_identity(path) if path is not None and path.is_file() else None


def run_fingerprint(args: argparse.Namespace, reranker: Reranker, *, resolved: bool) -> dict:
    """Every setting that decides an output's results (see ``permrank.runs.store``).

    ``resolved=False``: what the flags alone decide (before a server is started or probed);
    ``resolved=True``: also what the endpoint decided (model, context window, tokenizer)."""
    pipeline = reranker.pipeline
    budget = {k: v for k, v in vars(pipeline.budget).items() if k != "context_window"}
    sampling = pipeline.sampling
    fingerprint: dict[str, Any] = {
        "input": {"sha256": args.input_sha256},
        "depth": args.depth,
        "template": {"name": reranker.template.name, "sha256": reranker.template.sha256},
        "strategy": {
            "name": type(reranker.strategy).__name__,
            **describe_strategy(reranker.strategy),
        },
        "method": pipeline.method.describe() if pipeline.method else {"name": "listwise"},
        "sampling": {
            "temperature": sampling.temperature,
            "seed": sampling.seed,
            "max_tokens": sampling.max_tokens,
            "extra": sampling.extra,
        },
        "budget": budget,
    }
    identity = endpoint_identity(args, resolved)
    if identity is not None:
        fingerprint["endpoint"] = identity
    if resolved:
        found: Endpoint | None = getattr(args, "endpoint", None)
        fingerprint["model"] = found.model if found is not None else args.model
        fingerprint["budget"]["context_window"] = pipeline.budget.context_window
        fingerprint["tokenizer"] = pipeline.tokenizer.name
        fingerprint["constrain"] = reranker.constrain
    else:
        if args.model and (args.base_url or getattr(args, "backend", "openai") == "vllm"):
            fingerprint["model"] = args.model
        if args.context_window is not None:
            fingerprint["budget"]["context_window"] = args.context_window
        if getattr(args, "constrain", None) != "auto":
            fingerprint["constrain"] = getattr(args, "constrain", None)
    return fingerprint


def run(
    args: argparse.Namespace,
    prepared: tuple[int, dict[str, dict[str, int]] | None] | None = None,
) -> int:
    import asyncio

    from tqdm import tqdm

    from permrank.core.files import write_json_atomic
    from permrank.core.types import Usage
    from permrank.runs.io import OutputWriter, ranking_line, read_requests, trec_lines
    from permrank.runs.manifest import build_manifest, now

    n_queries, qrels = prepared if prepared is not None else precheck(args)
    reranker = reranker_from_args(args, on_error=args.on_error)
    check_prompt_fits(reranker)  # the endpoint was probed before (backends.probe)
    store = run_store(args)
    fingerprint = run_fingerprint(args, reranker, resolved=True)
    store.check(fingerprint)  # what the endpoint decided (model, context): still no call made
    done_before = prepare_outputs(args)
    store.begin(fingerprint)
    if done_before and not args.quiet:
        print(
            f"resuming: {len(done_before)} queries already in {args.output}, made with the same "
            "settings (--overwrite starts afresh)",
            file=sys.stderr,
        )
    started, t0 = now(), time.perf_counter()
    totals = Usage()  # this session's finished queries (failed ones included)
    spent = Usage()  # every answer of this session as it arrived, finished queries or not
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
            stream = scaleout.rankings(
                args, reranker, requests, reranker_from_args, on_error=args.on_error, spent=spent
            )
            async for ranking in stream:
                out.write(ranking_line(ranking))  # the JSONL first: it is what a resume reads
                if trec:
                    trec.write(trec_lines(ranking))
                    trec.flush()
                totals.add(ranking.usage)
                if ranking.error:
                    failed[ranking.query.qid] = ranking.error
                done += 1
                bar.update(1)
                bar.set_postfix(calls=spent.calls, tokens=spent.total_tokens)
                store.checkpoint(session_usage(totals, spent), time.perf_counter() - t0)
        finally:
            await reranker.aclose()

    try:
        bar.update(min(len(done_before), n_queries))
        asyncio.run(go())
    except PermrankError as exc:
        qid = getattr(exc, "qid", None)
        if qid is not None:
            failed[str(qid)] = str(exc)
            usage = getattr(exc, "usage", None)
            if usage is not None:
                totals.add(usage)
        stopped_by = str(exc)
        raise
    except KeyboardInterrupt:
        stopped_by = "interrupted"
        args.interrupted_note = (
            f"; {len(done_before) + done} queries are in {args.output} and the calls spent are "
            "counted in its manifest: run the same command again to resume"
        )
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
        session = session_usage(totals, spent)
        store.finish(session, seconds)
        manifest = build_manifest(
            command="rerank",
            parameters=reranker.manifest()
            | endpoint_manifest(args)
            | scaleout.executor_manifest(args),
            totals=store.totals(session),
            queries=len(done_before) + done,
            failed=failed,
            started=started,
            seconds=store.seconds(seconds),
            files={
                "input": args.input,
                "output": args.output,
                "trec": args.trec,
                "limit": args.limit,
                "depth": args.depth,
            },
            extra={
                "fingerprint": store.fingerprint,
                "input_sha256": args.input_sha256,
                "resumed_queries": len(done_before),
                "this_run": {
                    "queries": done,
                    "seconds": round(seconds, 3),
                    "totals": session.model_dump(),
                    "earlier_sessions": store.sessions,
                },
                "stopped_by": stopped_by,
                "complete": stopped_by is None,
            },
        )
        write_json_atomic(args.manifest or f"{args.output}.manifest.json", manifest)
    if not args.quiet:
        for line in summary_lines(session, done, seconds):
            print(line)
        if done_before:
            whole = store.totals(session)
            print(
                f"with the earlier runs of {args.output}: {len(done_before) + done} queries, "
                f"{whole.calls} calls to the model, {whole.total_tokens} tokens, "
                f"{store.seconds(seconds):.1f} s"
            )
        if reranker.constrain:
            print(constrain_line(reranker.constrain, session))
        if qrels is not None:
            from permrank.runs.evaluate import evaluate

            before_requests = limited(read_requests(args.input), args.limit, args.depth)
            before = evaluate(run_of_requests(before_requests), qrels, ["nDCG@10"])
            after = evaluate(run_of_output(args.output), qrels, ["nDCG@10"])
            print(f"nDCG@10: {before['nDCG@10']:.4f} before -> {after['nDCG@10']:.4f} after")
        if failed:
            print(f"{len(failed)} queries failed (input order kept): {', '.join(failed)}")
    return 1 if failed else 0


def session_usage(finished: Usage, spent: Usage) -> Usage:
    """A session's totals: rounds, repairs and failures of the finished queries; calls, tokens
    and latency of every answer that arrived (so an interrupted run counts what it spent)."""
    usage = finished.model_copy(deep=True)
    for name in ("calls", "cached_calls", "prompt_tokens", "completion_tokens", "latency_s"):
        setattr(usage, name, max(getattr(finished, name), getattr(spent, name)))
    return usage


def run_of_output(path: str) -> dict[str, dict[str, float]]:
    from permrank.runs.io import iter_output_records, record_docids, record_qid

    run: dict[str, dict[str, float]] = {}
    for record in iter_output_records(path):
        docids = record_docids(record)
        run[str(record_qid(record))] = dict(zip(docids, rank_scores(len(docids)), strict=True))
    return run


def run_of_requests(requests: Iterator[Request]) -> dict[str, dict[str, float]]:
    run: dict[str, dict[str, float]] = {}
    for r in requests:
        docids = [c.docid for c in r.candidates]
        run[r.query.qid] = dict(zip(docids, rank_scores(len(docids)), strict=True))
    return run


METHOD_FLAGS = {
    "yes_score": "normalisation",
    "likelihood_mode": "mode",
    "pairwise": "aggregation",
    "pairwise_k": "k",
    "top_logprobs": "top_logprobs",
    "route": "route",
    "score_api": "api",
    "score_batch": "batch",
}


def method_options_of(args: argparse.Namespace) -> dict[str, Any]:
    """The scoring-method options given on the command line (a flag the method does not take
    is refused, naming the flag)."""
    from permrank.engine.methods import METHODS

    fields = getattr(METHODS.get(args.method), "__dataclass_fields__", {})
    options = dict(getattr(args, "recipe_options", None) or {})
    top_n, pairwise_k = getattr(args, "top_n", None), getattr(args, "pairwise_k", None)
    if args.method == "pairwise" and top_n is not None:  # one word: places at the top
        if pairwise_k is not None and pairwise_k != top_n:
            raise ConfigError(
                f"--top-n {top_n} and --pairwise-k {pairwise_k} name the same thing "
                "(places sorted at the top); give one"
            )
        pairwise_k = top_n
    for flag, option in METHOD_FLAGS.items():
        value = pairwise_k if flag == "pairwise_k" else getattr(args, flag, None)
        if value is None:
            continue
        if option == "k" and "top_n" in fields:  # the method's newer name for it
            option = "top_n"
        if option not in fields:
            raise ConfigError(
                f"--{flag.replace('_', '-')} does not apply to --method {args.method}"
            )
        options[option] = value
    return options
