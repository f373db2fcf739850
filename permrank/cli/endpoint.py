"""Which model answers, from the flags: the Reranker they describe, the probed endpoint or the
embedded llama.cpp server (started and stopped around the run), and what the manifest says of it."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from permrank.cli import scaleout
from permrank.cli.options import (
    DEFAULT_CONTEXT_WINDOW,
    DEFAULT_TIMEOUT_S,
    EMBEDDED_TIMEOUT_S,
    cache_path_of,
    method_options_of,
)
from permrank.core.errors import ConfigError, PermrankError

# Heavy modules (aiohttp, pydantic models, ir_measures, tqdm) are imported where they are used,
# so that ``permrank --help`` and the other commands do not pay for them.
if TYPE_CHECKING:
    from permrank.backends.probe import Endpoint
    from permrank.engine.reranker import Reranker

log = logging.getLogger(__name__)


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
    from permrank.servers.models import DEFAULT_SLOT_CONTEXT, settle_args

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
        local_ctx=getattr(args, "local_ctx", None) or DEFAULT_SLOT_CONTEXT,
        wait_s=getattr(args, "timeout", None),
    ) as found:
        if found.server is not None and not quiet:
            amx = getattr(found.server, "amx", None)
            kernels = {True: ", AMX kernels", False: ", without AMX kernels (they crash here)"}
            print(
                f"started llama.cpp with {found.server.model_path.name} at "
                f"{found.base_url}{kernels.get(amx, '') if amx is not None else ''} "
                "(stopped when the run ends)",
                file=sys.stderr,
            )
        yield found


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
