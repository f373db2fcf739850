"""``permrank rerank``: rerank a JSONL file of queries and candidates.

Longer than most modules (~470 lines) because it is one command's whole flow, read top to
bottom: its flags, the checks before any model call, the run store, the run loop and its summary.
The options shared with other commands are in ``options.py``, the model endpoint in
``endpoint.py``.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from permrank.cli import interrupt, scaleout
from permrank.core.errors import ConfigError, PermrankError
from permrank.core.scores import rank_scores
from permrank.core.strategies import describe_strategy

# Heavy modules (aiohttp, pydantic models, ir_measures, tqdm) are imported where they are used,
# so that ``permrank --help`` and the other commands do not pay for them.
if TYPE_CHECKING:
    from permrank.backends.probe import Endpoint
    from permrank.core.types import Request, Usage
    from permrank.engine.reranker import Reranker
    from permrank.runs.store import RunStore

# The names below were defined here before options and endpoints had their own modules; they stay
# importable from here (permrank.cli.rerank, formerly permrank.commands.rerank).
from permrank.cli.endpoint import (  # noqa: F401
    check_settings,
    embedded_model_file,
    embedded_notice,
    endpoint_manifest,
    model_endpoint,
    reranker_from_args,
)
from permrank.cli.options import (  # noqa: F401
    DEFAULT_CONTEXT_WINDOW,
    DEFAULT_TIMEOUT_S,
    EMBEDDED_TIMEOUT_S,
    METHOD_FLAGS,
    METHOD_NAMES,
    add_model_options,
    add_run_options,
    cache_path_of,
    method_options_of,
)

log = logging.getLogger(__name__)


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
        overwrite_help="start afresh; by default a run whose output exists resumes it (queries "
        "already written are kept, failed ones are asked again)",
    )
    add_model_options(p)
    scaleout.add_ray_options(p)
    p.set_defaults(func=run_on_endpoint)


def run_on_endpoint(args: argparse.Namespace) -> int:
    """``run`` with the model endpoint open (``args.endpoint``), closed however it ends.

    Input, flags and template are checked first: nothing is refused after a server started."""
    prepared = precheck(args)
    if getattr(args, "backend", "openai") == "vllm":
        return run(args, prepared)  # vLLM in this process: no endpoint to probe or start
    with model_endpoint(args) as args.endpoint:
        return run(args, prepared)


def limited(requests: Iterator[Request], limit: int | None, depth: int | None) -> Iterator[Request]:
    for request in itertools.islice(requests, limit):
        if depth is not None:
            request.candidates = request.candidates[:depth]
        yield request


def summary_lines(totals: Usage, queries: int, seconds: float) -> list[str]:
    """The end of a run in plain words: what was asked of the model and what it answered."""
    from permrank.core.parse import echo_warning  # here: parse loads the pydantic types

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
    # an echo (the shown order given back) is a complete, valid answer: no repair was needed
    repaired = windows - totals.repairs.get("ok", 0) - totals.repairs.get("echo", 0)
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
    from permrank.servers.models import model_file_identity

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
    return model_file_identity(path)


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
        interrupt.run(go())
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
