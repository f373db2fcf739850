"""``permrank serve ...``: start a model server and keep it running for repeated use.

Each server kind registers its own sub-command from its module (``permrank.servers.*``);
``permrank serve api`` serves permrank itself as a rerank API (``permrank.service``).
"""

from __future__ import annotations

import argparse
import importlib

SERVER_MODULES = ("permrank.servers.llamacpp", "permrank.servers.vllm")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="start a local model server and print its base URL")
    kinds = p.add_subparsers(dest="server", metavar="KIND")
    kinds.required = True
    for name in SERVER_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register_serve(kinds)
    register_api(kinds)


# -- permrank serve api ---------------------------------------------------------------------------
def register_api(kinds: argparse._SubParsersAction) -> None:
    from permrank.cli.options import add_model_options

    p = kinds.add_parser(
        "api",
        help="a rerank API (Cohere, Jina, TEI shapes) over any permrank pipeline",
        description="Serve permrank over HTTP: POST /v1/rerank and /v2/rerank (Cohere's and "
        "Jina's shapes), /rerank (TEI's), GET /v1/models, /health, /docs (OpenAPI), and a page "
        "at / to try it. The model options are those of `permrank rerank`; without --base-url "
        "the embedded llama.cpp server is started (and stopped with this server). Needs the "
        "server extra (pip install 'permrank[server]').",
        conflict_handler="resolve",
    )
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (8080; 0: a free one)")
    p.add_argument(
        "--api-key-env",
        default=None,
        metavar="VAR",
        help="environment variable holding the key clients must send as 'Authorization: "
        "Bearer KEY' (default: no key asked)",
    )
    p.add_argument(
        "--upstream-api-key-env",
        default="OPENAI_API_KEY",
        metavar="VAR",
        help="environment variable holding the model endpoint's API key (OPENAI_API_KEY)",
    )
    p.add_argument(
        "--served-model-name",
        action="append",
        default=[],
        metavar="NAME",
        help="another name clients may give as `model` (repeatable; the endpoint's model name "
        "and 'permrank' are always accepted)",
    )
    p.add_argument(
        "--max-documents", type=int, default=1000, help="documents per request at most (1000)"
    )
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=2_000_000,
        help="request body size at most, in bytes (2000000)",
    )
    p.add_argument("--no-page", action="store_true", help="no page at /")
    p.set_defaults(func=serve_api)


def serve_api(args: argparse.Namespace) -> int:
    import copy
    import os
    import signal
    import sys
    import threading

    from permrank.cli.endpoint import check_settings, model_endpoint, reranker_from_args
    from permrank.core.errors import ConfigError
    from permrank.servers.process import free_port

    try:
        import uvicorn

        from permrank.service import ServiceOptions, create_app
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"permrank serve api needs the server extra ({exc.name} is missing): "
            "pip install 'permrank[server]'"
        ) from None
    if args.api_key_env and not os.environ.get(args.api_key_env):
        raise ConfigError(
            f"--api-key-env {args.api_key_env}: that environment variable is empty; set it to "
            "the key clients must send, or leave the flag out for no key"
        )
    for flag in ("max_documents", "max_request_bytes"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1")
    upstream = copy.copy(args)
    upstream.api_key_env = args.upstream_api_key_env
    upstream.on_error = "fail"
    if getattr(args, "backend", "openai") != "vllm" and args.base_url:
        check_settings(upstream)  # bad flags refused before anything is started
    options = ServiceOptions(
        model_names=list(args.served_model_name),
        max_documents=args.max_documents,
        max_request_bytes=args.max_request_bytes,
        api_key_env=args.api_key_env,
        page=not args.no_page,
    )
    port = args.port or free_port(args.host)

    def stop(signum: int, frame: object) -> None:
        # uvicorn handles SIGTERM while it serves (requests in flight finish) and raises it
        # again once stopped; then, or before it serves, it ends the run here: the embedded
        # server (if any) is stopped as the `with` below unwinds, and the exit status is 0.
        raise SystemExit(0)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)

    def run(endpoint: object | None) -> None:
        upstream.endpoint = endpoint
        reranker = reranker_from_args(upstream)  # probed and checked before listening
        app = create_app(lambda: reranker, options)
        model = reranker.pipeline.backend.model
        print(
            f"permrank serve api: http://{args.host}:{port} (model {model}, "
            f"strategy {args.strategy}, method {args.method}); docs at /docs; Ctrl-C or "
            "SIGTERM stops it",
            file=sys.stderr,
            flush=True,
        )
        config = uvicorn.Config(
            app, host=args.host, port=port, log_level="warning", timeout_graceful_shutdown=10
        )
        uvicorn.Server(config).run()

    if getattr(args, "backend", "openai") == "vllm":
        run(None)
        return 0
    with model_endpoint(upstream) as found:
        run(found)
    return 0
