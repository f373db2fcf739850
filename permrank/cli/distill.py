"""``permrank distill``: a teacher's rankings as training labels (listwise, pairwise, grouped)."""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from permrank.cli import interrupt, scaleout
from permrank.cli.rerank import (
    add_model_options,
    add_run_options,
    limited,
    reranker_from_args,
    run_fingerprint,
    session_usage,
    summary_lines,
)
from permrank.core.errors import ConfigError
from permrank.distill.labels import (
    CONFIG,
    FORMATS,
    JOURNAL,
    PAIR_RULES,
    STATS,
    GroupSampling,
    LabelOptions,
    PairSampling,
    teacher_requests,
)

if TYPE_CHECKING:  # heavy modules are imported where used (``permrank --help`` stays light)
    from permrank.core.types import Ranking, Request
    from permrank.engine.reranker import Reranker
    from permrank.runs.store import RunStore

RUN_RECORD = "run.json"
MANIFEST = "manifest.json"


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill",
        help="make training labels from a teacher's rankings (listwise, pairwise, grouped)",
        description="A teacher LLM reranks every query (in its input order and in --augment "
        "seeded shuffled orders); its rankings are written to DIR as sharded JSONL: "
        "listwise-*.jsonl (teacher order + every window's permutation), pairwise-*.jsonl "
        "(query, pos, neg, rank gap) and grouped-*.jsonl (FlagEmbedding's reranker layout: "
        '{"query", "pos": [...], "neg": [...]}), with stats.json. A killed run resumes where '
        "it stopped: run the same command again.",
    )
    p.add_argument("--input", required=True, help="JSONL (or .jsonl.gz) of queries + candidates")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument(
        "--formats",
        default=",".join(FORMATS),
        help=f"comma-separated formats to write (default: {','.join(FORMATS)})",
    )
    p.add_argument("--shard-size", type=int, default=10_000, help="records per shard file (10000)")
    p.add_argument(
        "--augment",
        "--input-shuffles",
        dest="augment",
        type=int,
        default=0,
        metavar="K",
        help="also rank K seeded shuffles of each query's input order (permutation "
        "augmentation); every teacher run is recorded (0)",
    )
    p.add_argument(
        "--label-seed",
        type=int,
        default=0,
        help="seed of the shuffles and of pair/negative sampling (0)",
    )
    p.add_argument("--qrels", help="TREC qrels: stats report the labels' agreement with them")
    add_run_options(
        p,
        limit_help="only the first N queries",
        skip_help="left out and retried by the next run",
        overwrite_help="start afresh (removes the labels in DIR); by default a run onto a "
        "folder of labels resumes it, when it was made with the same teacher and options",
    )
    g = p.add_argument_group("pairwise sampling (ranks are the teacher's, 1-based)")
    g.add_argument(
        "--pairs",
        default="top",
        help=f"comma-separated rules among {', '.join(PAIR_RULES)}: top = every pair among the "
        "top M; adjacent = each candidate and the next; random = each of the top M against "
        "--pair-samples random candidates below rank R (default: top)",
    )
    g.add_argument(
        "--pair-top", type=int, default=10, metavar="M", help="the top M of the rules (10)"
    )
    g.add_argument(
        "--pair-below",
        type=int,
        default=20,
        metavar="R",
        help="random negatives come from below rank R (20)",
    )
    g.add_argument(
        "--pair-samples", type=int, default=5, help="random negatives per top candidate (5)"
    )
    g = p.add_argument_group("grouped (FlagEmbedding) sampling")
    g.add_argument(
        "--group-positives", type=int, default=1, metavar="P", help="the teacher's top P (1)"
    )
    g.add_argument(
        "--group-negatives", type=int, default=15, metavar="N", help="hard negatives (15)"
    )
    g.add_argument(
        "--group-negatives-below",
        type=int,
        default=None,
        metavar="R",
        help="negatives are drawn from the candidates ranked below R (default: below the "
        "positives)",
    )
    g.add_argument("--group-prompt", default=None, help="FlagEmbedding's optional prompt field")
    g.add_argument(
        "--group-scores",
        action="store_true",
        help="also write pos_scores/neg_scores (teacher rank scores: n for the first, 1 for the "
        "last) for FlagEmbedding's knowledge distillation",
    )
    add_model_options(p)
    scaleout.add_ray_options(p)
    if "--method" not in p._option_string_actions:
        p.add_argument(
            "--method",
            default="listwise",
            help="how the teacher ranks (listwise; other methods where the reranker has them)",
        )
    p.set_defaults(func=run)


def options_from_args(args: argparse.Namespace) -> LabelOptions:
    options = LabelOptions(
        formats=_names(args.formats),
        shard_size=args.shard_size,
        augment=args.augment,
        seed=args.label_seed,
        pairs=PairSampling(
            rules=_names(args.pairs),
            top=args.pair_top,
            below=args.pair_below,
            samples=args.pair_samples,
        ),
        groups=GroupSampling(
            positives=args.group_positives,
            negatives=args.group_negatives,
            negatives_below=args.group_negatives_below,
            prompt=args.group_prompt,
            scores=args.group_scores,
        ),
    )
    options.check()
    return options


def teacher_from_args(args: argparse.Namespace) -> Reranker:
    """The teacher; ``--method`` is passed on when the reranker takes one."""
    from permrank.engine.reranker import Reranker

    overrides: dict[str, Any] = {"on_error": args.on_error}
    method = getattr(args, "method", None)
    if "method" in inspect.signature(Reranker.__init__).parameters:
        if method is not None:
            overrides["method"] = method
    elif method not in (None, "listwise"):
        raise ConfigError(f"--method {method}: this version of permrank ranks listwise only")
    return reranker_from_args(args, **overrides)


def expand(requests: Iterator[Request], options: LabelOptions, done: set[str]) -> Iterator[Request]:
    """Each query not done yet, as its teacher runs (input order, then the shuffles)."""
    for request in requests:
        if request.query.qid in done:
            continue
        yield from teacher_requests(request, options.augment, options.seed)


def label_store(args: argparse.Namespace) -> RunStore:
    """The folder of labels and the record of what made it (``DIR/run.json``)."""
    from permrank.runs.store import RunStore

    out = Path(args.out)
    journal = out / JOURNAL
    store = RunStore(
        out,
        out / RUN_RECORD,
        overwrite=args.overwrite,
        flag="--out",
        has_results=journal.is_file() and journal.stat().st_size > 0,
    )
    store.input_path = str(Path(args.input).resolve())
    return store


def clear_labels(out: Path) -> None:
    """``--overwrite``: remove what an earlier run wrote in ``out`` (and nothing else)."""
    if not out.is_dir():
        return
    names = {JOURNAL, CONFIG, STATS, RUN_RECORD, MANIFEST}
    for path in out.iterdir():
        ours = path.name in names or (
            path.suffix == ".jsonl" and path.name.split("-")[0] in FORMATS
        )
        if ours and path.is_file():
            path.unlink()


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from permrank.core.files import write_json_atomic
    from permrank.core.types import Usage
    from permrank.distill.labels import LabelStore, query_labels
    from permrank.runs.io import read_requests, validate_requests
    from permrank.runs.manifest import build_manifest, now
    from permrank.runs.store import file_sha256

    for flag, value in (("--limit", args.limit), ("--depth", args.depth)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1 (got {value})")
    options = options_from_args(args)
    scaleout.check(args)
    # Everything that can be refused is refused before the first model call.
    n_queries, _ = validate_requests(args.input)
    if args.limit is not None:
        n_queries = min(n_queries, args.limit)
    qrels = None
    if args.qrels:  # ir_measures only when there are qrels
        from permrank.runs.evaluate import read_qrels

        qrels = read_qrels(args.qrels)
    teacher = teacher_from_args(args)
    args.input_sha256 = file_sha256(args.input)
    fingerprint = {
        **run_fingerprint(args, teacher, resolved=True),
        "labels": options.describe(),
    }
    record = label_store(args)
    record.check(fingerprint)  # other teacher or options: refused, the folder untouched
    if args.overwrite:
        clear_labels(Path(args.out))
    store = LabelStore.open(args.out, options)
    record.begin(fingerprint)
    already = sum(
        1
        for r in limited(read_requests(args.input), args.limit, args.depth)
        if r.query.qid in store.done
    )
    started, t0 = now(), time.perf_counter()
    totals = Usage()
    spent = Usage()
    failed: dict[str, str] = {}
    runs_per_query = options.augment + 1
    done_now = 0
    bar = tqdm(
        total=n_queries,
        initial=already,
        unit="query",
        disable=args.quiet,
        file=sys.stderr,
        desc="distill",
    )

    async def go() -> None:
        nonlocal done_now
        runs: list[Ranking] = []
        shown: list[list[str]] = []
        requests = expand(
            limited(read_requests(args.input), args.limit, args.depth), options, store.done
        )
        # The input order each run was shown is the order of the request sent; keep it beside.
        sent: deque[list[str]] = deque()

        def remember(stream: Iterator[Request]) -> Iterator[Request]:
            for request in stream:
                sent.append([c.docid for c in request.candidates])
                yield request

        try:
            stream = scaleout.rankings(
                args, teacher, remember(requests), teacher_from_args, spent=spent
            )
            async for ranking in stream:
                totals.add(ranking.usage)
                runs.append(ranking)
                shown.append(sent.popleft())
                if len(runs) < runs_per_query:
                    continue
                qid = ranking.query.qid
                errors = [r.error for r in runs if r.error]
                if errors:
                    failed[qid] = errors[0] or "failed"
                else:
                    grades = qrels.get(qid) if qrels is not None else None
                    store.commit(query_labels(runs, shown, options, grades))
                    done_now += 1
                runs, shown = [], []
                bar.update(1)
                bar.set_postfix(calls=spent.calls, failed=len(failed))
                record.checkpoint(session_usage(totals, spent), time.perf_counter() - t0)
        finally:
            await teacher.aclose()

    try:
        interrupt.run(go())
    except KeyboardInterrupt:
        args.interrupted_note = (
            f"; {already + done_now} queries are in {args.out}: run the same command again "
            "to resume"
        )
        raise
    finally:
        bar.close()
        seconds = time.perf_counter() - t0
        stats = store.write_stats(input_queries=n_queries, failed=sorted(failed))
        store.close()
        session = session_usage(totals, spent)
        record.finish(session, seconds)
        manifest = build_manifest(
            command="distill",
            parameters={"teacher": teacher.manifest(), "labels": options.describe()}
            | scaleout.executor_manifest(args),
            totals=record.totals(session),
            queries=already + done_now,
            failed=failed,
            started=started,
            seconds=record.seconds(seconds),
            files={
                "input": args.input,
                "out": args.out,
                "qrels": args.qrels,
                "limit": args.limit,
                "depth": args.depth,
            },
            extra={
                "fingerprint": record.fingerprint,
                "resumed_queries": already,
                "this_run": {
                    "queries": done_now,
                    "seconds": round(seconds, 3),
                    "totals": session.model_dump(),
                    "earlier_sessions": record.sessions,
                },
            },
        )
        write_json_atomic(Path(args.out) / MANIFEST, manifest)
    if not args.quiet:
        for line in summary_lines(session, done_now, seconds):
            print(line)
        records = ", ".join(f"{fmt} {count}" for fmt, count in stats["records"].items())
        print(
            f"labels in {args.out}: {stats['queries']} of {n_queries} queries "
            f"({already} from an earlier run), {stats['teacher_runs']} teacher runs; "
            f"records: {records}"
        )
        agreement = stats.get("qrels_agreement")
        for kind in ("pairs", "groups"):
            if agreement and kind in agreement and agreement[kind]["share"] is not None:
                print(
                    f"agreement with qrels ({kind}): {agreement[kind]['share']:.3f} of "
                    f"{agreement[kind]['judged']} judged (better, worse) pairs"
                )
        if failed:
            print(f"{len(failed)} queries failed (rerun to retry them): {', '.join(failed)}")
    return 1 if failed else 0
