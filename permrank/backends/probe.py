"""What an endpoint can do, asked once at start: ``probe(base_url, model)``.

GET ``/v1/models`` (is it up? which models? vLLM's ``max_model_len``), then the server's own
routes: llama.cpp's ``/props`` (context per slot, chat template), vLLM's ``/version``. The result
sets defaults a user did not give (the context window, the server's own tokenizer, the constrain
mode) and refuses early what cannot work: an unreachable endpoint, a model it does not serve.

``endpoint(...)`` is the one way the CLI gets a model to talk to: a ``--base-url`` probed as it
is, or, without one, the embedded llama.cpp server started for the duration of the block.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from ..errors import EndpointUnavailable
from ..tokens import ServerTokenizer

log = logging.getLogger(__name__)

ServerKind = Literal["llama.cpp", "vllm", "openai", "simulator", "unknown"]


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


def _get(client: httpx.Client, url: str) -> dict[str, Any] | None:
    """GET a JSON object; None when the route is missing or answers something else."""
    try:
        response = client.get(url)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    try:
        data = response.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def probe(
    base_url: str,
    model: str | None = None,
    *,
    api_key: str | None = None,
    timeout_s: float = 10.0,
) -> ServerInfo:
    """Ask an endpoint what it serves and can do. Raises ``EndpointUnavailable``."""
    base = base_url.rstrip("/")
    root = server_root(base)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(timeout=timeout_s, headers=headers) as client:
        try:
            response = client.get(f"{base}/models")
        except httpx.HTTPError as exc:
            raise EndpointUnavailable(
                f"cannot reach the endpoint {base} ({type(exc).__name__}: {exc}): start the "
                "server, or check --base-url (without --base-url permrank starts its embedded "
                "model). Nothing was sent to the model."
            ) from None
        if response.status_code in (401, 403):
            raise EndpointUnavailable(
                f"{base}/models refused the API key (HTTP {response.status_code}): put the right "
                "key in the environment variable named by --api-key-env (default OPENAI_API_KEY)."
            )
        listing = None
        if response.status_code == 200:
            with contextlib.suppress(ValueError):
                listing = response.json()
        entries = [e for e in (listing or {}).get("data") or [] if isinstance(e, dict)]
        served = [str(e.get("id")) for e in entries if e.get("id")]
        owners = {str(e.get("owned_by") or "") for e in entries}

        props = _get(client, f"{root}/props") if "api.openai.com" not in base else None
        version = None
        if props is not None and "default_generation_settings" in props:
            kind: ServerKind = "llama.cpp"
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
            answer = _get(client, f"{root}/version")
            if answer is not None and "version" in answer:
                kind, version = "vllm", str(answer["version"])

    if not served:
        if model is None:
            raise EndpointUnavailable(
                f"{base}/models lists no model (HTTP {response.status_code}); give --model"
            )
        log.warning("%s/models lists no model; using %r as given", base, model)
    elif model is None:
        if len(served) > 1:
            raise EndpointUnavailable(
                f"{base} serves {len(served)} models; choose one with --model: " + ", ".join(served)
            )
        model = served[0]
    elif model not in served:
        if kind == "llamacpp":  # llama.cpp's server answers under any model name
            log.warning("%s serves %s; asked for %r", base, served[0], model)
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


@dataclass
class Endpoint:
    """A model to talk to: where, which, what it can do, and the embedded server if any."""

    info: ServerInfo
    server: Any = None
    """The ``LlamaServer`` started for this run, when there was no ``--base-url``."""

    @property
    def base_url(self) -> str:
        return self.info.base_url

    @property
    def model(self) -> str:
        return self.info.model


@contextlib.contextmanager
def endpoint(
    base_url: str | None,
    model: str | None = None,
    *,
    api_key_env: str = "OPENAI_API_KEY",
    local_model: str | None = None,
    local_parallel: int = 1,
    local_ctx: int = 4096,
    local_threads: int | None = None,
) -> Iterator[Endpoint]:
    """A probed endpoint; without ``base_url`` the embedded llama.cpp server, stopped on exit."""
    if base_url:
        yield Endpoint(probe(base_url, model, api_key=os.environ.get(api_key_env)))
        return
    from ..servers.llamacpp import LlamaServer

    server = LlamaServer(
        local_model,
        ctx=local_ctx,
        parallel=local_parallel,
        threads=local_threads or max(1, min(8, os.cpu_count() or 2)),
    )
    try:
        server.start()
        yield Endpoint(probe(server.base_url, None), server=server)
    finally:
        server.stop()
