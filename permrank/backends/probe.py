"""What an endpoint can do, asked once at start: ``probe(base_url, model)``.

GET ``/v1/models`` (is it up? which models? vLLM's ``max_model_len``), then the server's own
routes: llama.cpp's ``/props`` (context per slot, chat template), vLLM's ``/version``. The result
sets defaults a user did not give (the context window, the server's own tokenizer, the constrain
mode) and refuses early what cannot work: an unreachable endpoint, a model it does not serve.

``endpoint(...)`` is the one way the CLI gets a model to talk to: a ``--base-url`` probed as it
is, or, without one, the embedded llama.cpp server started for the duration of the block.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from permrank.backends.client import HTTPClient, TransportError, run_sync
from permrank.backends.tokenizer import ServerTokenizer
from permrank.core.errors import EndpointUnavailable
from permrank.servers.models import model_file_identity

log = logging.getLogger(__name__)

ServerKind = Literal["llama.cpp", "vllm", "openai", "simulator", "unknown"]
LOADING_STATUS = 503
"""What llama.cpp and vLLM answer while they load a model: the probe waits for them."""


@dataclass
class ServerInfo:
    """What the probe learnt about an endpoint."""

    base_url: str
    """The OpenAI-compatible base, e.g. ``http://127.0.0.1:8000/v1``."""
    root: str
    """The server's root, where llama.cpp and vLLM put ``/tokenize``, ``/props``, ``/version``."""
    kind: ServerKind
    model: str
    served: list[str] = field(default_factory=list)
    context_window: int | None = None
    """Tokens of context per request (llama.cpp: per slot), when the server says."""
    chat: bool = True
    """Whether chat messages get a real chat template (False: llama.cpp model without one)."""
    completions: bool = True
    logprobs: bool | None = None
    """True when the server kind is known to return logprobs, None when unknown."""
    tokenize: bool = False
    """Whether ``/tokenize`` counts with the model's own tokenizer."""
    version: str | None = None
    identity: str | None = None
    """What answers do not depend on the port of: the model file of a loopback llama.cpp
    server (path, size, mtime), so the response cache finds an embedded model's answers again."""
    slots: int | None = None
    """Requests the server works on at once (llama.cpp's ``/props`` ``total_slots``)."""

    def tokenizer(self, timeout_s: float = 30.0) -> ServerTokenizer | None:
        """The served model's own tokenizer, when the server has one."""
        if not self.tokenize or self.kind not in ("llama.cpp", "vllm"):
            return None
        return ServerTokenizer(self.root, kind=self.kind, model=self.model, timeout_s=timeout_s)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model": self.model,
            "context_window": self.context_window,
            "chat_template": self.chat,
            "logprobs": self.logprobs,
            "server_tokenizer": self.tokenize,
            "version": self.version,
        }


def server_root(base_url: str) -> str:
    base = base_url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


def is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


async def _get(client: HTTPClient, url: str) -> dict[str, Any] | None:
    """GET a JSON object; None when the route is missing or answers something else."""
    try:
        status, data = await client.get(url)
    except (TransportError, TimeoutError):
        return None
    return data if status == 200 and isinstance(data, dict) else None


CLI_HINT = (
    "start the server, or check --base-url (without --base-url permrank starts its embedded model)"
)


async def _list_models(
    client: HTTPClient,
    base: str,
    *,
    wait_s: float,
    progress: Callable[[str], None] | None,
    hint: str = CLI_HINT,
) -> tuple[int, Any]:
    """``GET base/models``: its status and JSON; waits (up to ``wait_s``) while the server
    answers 503 (loading its model), saying so once every few seconds."""
    started = time.monotonic()
    said = -1.0
    while True:
        try:
            status, listing = await client.get(f"{base}/models")
        except (TransportError, TimeoutError) as exc:
            cause = exc.cause if isinstance(exc, TransportError) else exc
            raise EndpointUnavailable(
                f"cannot reach the endpoint {base} ({type(cause).__name__}: {cause}): {hint}. "
                "Nothing was sent to the model."
            ) from None
        waited = time.monotonic() - started
        if status != LOADING_STATUS or waited >= wait_s:
            if status == LOADING_STATUS:
                raise EndpointUnavailable(
                    f"{base} still answers HTTP 503 (loading its model?) after {waited:.0f} s; "
                    "wait for it to be ready, or give a longer --timeout"
                )
            return status, listing
        if said < 0 or waited - said >= 5.0:
            said = waited
            line = (
                f"waiting for {base} to load its model (HTTP 503, {waited:.0f} s of {wait_s:.0f} s)"
            )
            log.warning("%s", line)
            if progress is not None:
                progress(line)
        await asyncio.sleep(min(0.5, max(0.05, wait_s - waited)))


async def aprobe(
    base_url: str,
    model: str | None = None,
    *,
    api_key: str | None = None,
    timeout_s: float = 10.0,
    wait_s: float | None = None,
    progress: Callable[[str], None] | None = None,
    hint: str = CLI_HINT,
    strict_model: bool = True,
) -> ServerInfo:
    """Ask an endpoint what it serves and can do. Raises ``EndpointUnavailable``.

    A server answering 503 (llama.cpp and vLLM while they load a model) is asked again every
    half second for up to ``wait_s`` seconds (default ``timeout_s``), with a progress line.
    ``strict_model=False``: a model the endpoint does not list is a warning, not an error."""
    base = base_url.rstrip("/")
    root = server_root(base)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    client = HTTPClient(headers=headers, timeout_s=timeout_s, limit=2, trust_env=True)
    try:
        status, listing = await _list_models(
            client,
            base,
            wait_s=timeout_s if wait_s is None else wait_s,
            progress=progress,
            hint=hint,
        )
        if status in (401, 403):
            raise EndpointUnavailable(
                f"{base}/models refused the API key (HTTP {status}): put the right key in the "
                "environment variable named by --api-key-env (the API's api_key_env; default "
                "OPENAI_API_KEY)."
            )
        if status != 200 or not isinstance(listing, dict):
            listing = None
        entries = [e for e in (listing or {}).get("data") or [] if isinstance(e, dict)]
        served = [str(e.get("id")) for e in entries if e.get("id")]
        owners = {str(e.get("owned_by") or "") for e in entries}

        props = await _get(client, f"{root}/props") if "api.openai.com" not in base else None
        version = None
        kind: ServerKind
        if props is not None and "default_generation_settings" in props:
            kind = "llama.cpp"
            version = str(props.get("build_info") or "") or None
        elif "vllm" in owners:
            kind = "vllm"
        elif "permrank" in owners:
            kind = "simulator"
        elif "api.openai.com" in base:
            kind = "openai"
        else:
            kind = "unknown"
        if kind in ("vllm", "unknown"):
            answer = await _get(client, f"{root}/version")
            if answer is not None and "version" in answer:
                kind, version = "vllm", str(answer["version"])
    finally:
        await client.aclose()

    if not served:
        if model is None:
            raise EndpointUnavailable(
                f"{base}/models lists no model (HTTP {status}); give the model's name "
                "(the CLI's --model, the API's model)"
            )
        log.warning("%s/models lists no model; using %r as given", base, model)
    elif model is None:
        if len(served) > 1:
            raise EndpointUnavailable(
                f"{base} serves {len(served)} models; choose one with --model: " + ", ".join(served)
            )
        model = served[0]
    elif model not in served:
        if kind == "llama.cpp" or not strict_model:  # llama.cpp answers under any name
            log.warning(
                "%s (%s) serves %s; asked for %r, which it may answer as its own model",
                base,
                kind,
                ", ".join(served[:10]),
                model,
            )
        else:
            raise EndpointUnavailable(
                f"the endpoint {base} does not serve model {model!r}; it serves: "
                f"{', '.join(served[:10])}. Give one of those to --model (or leave --model out "
                "when it serves one)."
            )

    entry = next((e for e in entries if e.get("id") == model), {})
    info = ServerInfo(
        base_url=base, root=root, kind=kind, model=model, served=served, version=version
    )
    if kind == "llama.cpp":
        assert props is not None
        settings = props.get("default_generation_settings") or {}
        n_ctx = settings.get("n_ctx") or (entry.get("meta") or {}).get("n_ctx")
        info.context_window = int(n_ctx) if n_ctx else None
        info.chat = bool(props.get("chat_template"))
        info.slots = int(props["total_slots"]) if props.get("total_slots") else None
        info.logprobs = True
        info.tokenize = True
        if is_loopback(base):
            found = model_file_identity(props.get("model_path"))
            info.identity = f"llama.cpp:{found}" if found else None
    elif kind == "vllm":
        max_len = entry.get("max_model_len")
        info.context_window = int(max_len) if max_len else None
        info.logprobs = True
        info.tokenize = True
    elif kind == "openai":
        info.completions = False
        info.logprobs = True
    log.info("probed %s: %s", base, info.describe())
    return info


def probe(
    base_url: str,
    model: str | None = None,
    *,
    api_key: str | None = None,
    timeout_s: float = 10.0,
    wait_s: float | None = None,
) -> ServerInfo:
    """``aprobe`` from sync code (the CLI); a loading server's progress is logged (a warning
    every few seconds, which the CLI shows on stderr)."""
    info: ServerInfo = run_sync(
        lambda: aprobe(base_url, model, api_key=api_key, timeout_s=timeout_s, wait_s=wait_s)
    )
    return info


async def aprobe_replicas(
    base_urls: Sequence[str],
    model: str | None = None,
    *,
    dead_ok: bool = False,
    **options: Any,
) -> list[ServerInfo]:
    """Probe every endpoint of a pool at once (``options`` as ``aprobe`` takes them); refuse
    replicas that serve different models (the windows of one query may go to different
    replicas, so they must be the same model). A replica that is down is refused too, unless
    ``dead_ok``: then the pool goes on without it (it is tried again later) while one answers."""
    answers = await asyncio.gather(
        *(aprobe(url, model, **options) for url in base_urls), return_exceptions=True
    )
    infos = [a for a in answers if not isinstance(a, BaseException)]
    failures = [a for a in answers if isinstance(a, BaseException)]
    if failures and (not dead_ok or not infos):
        raise failures[0]
    for failure in failures:
        log.warning("%s", failure)
    if len({info.model for info in infos}) > 1:
        raise EndpointUnavailable(
            "the endpoints serve different models: "
            + ", ".join(f"{info.base_url} serves {info.model!r}" for info in infos)
            + ". Replicas of one run must serve the same model: give the model's name, or "
            "drop the endpoints that serve another."
        )
    return infos


def probe_replicas(
    base_urls: Sequence[str],
    model: str | None = None,
    *,
    api_key: str | None = None,
    timeout_s: float = 10.0,
    wait_s: float | None = None,
) -> list[ServerInfo]:
    """``aprobe_replicas`` from sync code (the CLI): every replica must answer."""
    infos: list[ServerInfo] = run_sync(
        lambda: aprobe_replicas(
            base_urls, model, api_key=api_key, timeout_s=timeout_s, wait_s=wait_s
        )
    )
    return infos


@dataclass
class Endpoint:
    """A model to talk to: where, which, what it can do, and the embedded server if any."""

    info: ServerInfo
    server: Any = None
    """The ``LlamaServer`` started for this run, when there was no ``--base-url``."""
    replicas: list[ServerInfo] = field(default_factory=list)
    """Every endpoint of a pool (``info`` is the first), when several were given."""

    @property
    def base_url(self) -> str:
        return self.info.base_url

    @property
    def model(self) -> str:
        return self.info.model


@contextlib.contextmanager
def endpoint(
    base_url: str | Sequence[str] | None,
    model: str | None = None,
    *,
    api_key_env: str = "OPENAI_API_KEY",
    local_model: str | None = None,
    local_parallel: int = 1,
    local_ctx: int = 4096,
    local_threads: int | None = None,
    wait_s: float | None = None,
) -> Iterator[Endpoint]:
    """A probed endpoint; without ``base_url`` the embedded llama.cpp server, stopped on exit.
    A server still loading its model (503) is waited for up to ``wait_s`` seconds (10)."""
    if base_url and not isinstance(base_url, str):
        infos = probe_replicas(base_url, model, api_key=os.environ.get(api_key_env), wait_s=wait_s)
        yield Endpoint(infos[0], replicas=infos if len(infos) > 1 else [])
        return
    if isinstance(base_url, str) and base_url:
        yield Endpoint(probe(base_url, model, api_key=os.environ.get(api_key_env), wait_s=wait_s))
        return
    from permrank.servers.llamacpp import LlamaServer

    server = LlamaServer(
        local_model,
        ctx=local_ctx,
        parallel=local_parallel,
        threads=local_threads or max(1, min(8, os.cpu_count() or 2)),
    )
    try:
        server.start()
        info = probe(server.base_url, None)
        if info.identity is None:  # a build whose /props names no model file: we know it
            found = model_file_identity(str(getattr(server, "model_path", "") or ""))
            info.identity = f"llama.cpp:{found}" if found else None
        yield Endpoint(info, server=server)
    finally:
        server.stop()
