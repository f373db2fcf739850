"""The run store: an output and the record of what made it, shared by ``rerank`` and ``distill``.

Beside every output (a reranked JSONL file, a folder of labels) lives its record
(``OUTPUT.run.json``; ``DIR/run.json``): the run's *fingerprint* (every setting that decides its
results: the input's content hash, the model and endpoint, the template's SHA-256, the strategy
and method with all their options, sampling, depth, ...) and the totals of every session that
wrote to it.

A run onto an existing output resumes it only when the fingerprint is the same. Otherwise it is
refused before any model call (``SettingsChanged``), naming each setting that differs and what
to do, and nothing is written: the output stays byte for byte as it was. A resumed run's totals
include every earlier session's (``RunStore.totals``).

The fingerprint is a flat mapping ``setting -> JSON value`` (nested settings get dotted names,
``strategy.window_size``), so a difference names itself. It can be checked in two steps: the
settings the flags decide before any server is started or probed, then the ones the endpoint
decides (the served model, its context window, its tokenizer); only the keys given are compared.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from permrank.core.errors import ConfigError
from permrank.core.files import write_json_atomic
from permrank.core.types import Usage

log = logging.getLogger(__name__)

RECORD_VERSION = 1
MISSING = "(not recorded)"

RENAMED = {"labels.shuffles": "labels.augment"}
"""Settings renamed since a record was written: old name -> new (records are read as new)."""


class SettingsChanged(ConfigError):
    """An output was made with other settings than the run asked to resume it with."""

    def __init__(self, message: str, differences: dict[str, tuple[Any, Any]]):
        super().__init__(message)
        self.differences = differences


# -- fingerprints -------------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """``value`` as plain JSON data (dataclasses and objects as their fields), for comparing."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [plain(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, set | frozenset) else items
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"kind": type(value).__name__, **fields}
    if hasattr(value, "__dict__") and not callable(value):
        return {"kind": type(value).__name__, **plain(vars(value))}
    return repr(value)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level with dotted keys (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        value = plain(value)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def differences(
    old: Mapping[str, Any], new: Mapping[str, Any], *, only_new_keys: bool = False
) -> dict[str, tuple[Any, Any]]:
    """Each setting whose value differs: name -> (old, new); a missing one is ``MISSING``."""
    keys = list(new) if only_new_keys else list(dict.fromkeys([*old, *new]))
    return {
        key: (old.get(key, MISSING), new.get(key, MISSING))
        for key in keys
        if old.get(key, MISSING) != new.get(key, MISSING)
    }


def _shown(value: Any) -> str:
    text = value if value == MISSING else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


# -- the store ----------------------------------------------------------------------------------


class RunStore:
    """An output (``output``: a file or folder) and its record (``record_path``).

    ``check(fingerprint)`` refuses other settings (callable before anything is started);
    ``begin(fingerprint)`` writes the record before the first model call; ``checkpoint`` and
    ``finish`` add this session's totals to the earlier sessions' ones.
    """

    def __init__(
        self,
        output: str | Path,
        record_path: str | Path,
        *,
        overwrite: bool = False,
        flag: str = "--output",
        has_results: bool | None = None,
    ):
        self.output = Path(output)
        self.record_path = Path(record_path)
        self.overwrite = overwrite
        self.flag = flag
        self._has_results = has_results
        self._existed = self.output.exists() if has_results is None else has_results
        """Whether the output was there before this run (its record's totals carry over)."""
        self.earlier = Usage()
        """The totals of the earlier sessions of this output (zero when starting afresh)."""
        self.earlier_seconds = 0.0
        self.sessions = 0
        self.fingerprint: dict[str, Any] = {}
        self.input_path: str | None = None
        self._last_checkpoint = 0.0

    @property
    def resuming(self) -> bool:
        """Whether the output holds results of an earlier run that this run will keep."""
        if self.overwrite:
            return False
        if self._has_results is not None:
            return self._has_results
        return self.output.is_file() and self.output.stat().st_size > 0

    def read(self) -> dict[str, Any] | None:
        """The stored record, or None when there is none."""
        if not self.record_path.exists():
            return None
        try:
            record = json.loads(self.record_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(
                f"{self.record_path} (the record of what made {self.output}) cannot be read "
                f"({exc}): give --overwrite to start afresh, or another {self.flag}"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("fingerprint"), dict):
            raise ConfigError(
                f"{self.record_path} is not a permrank run record: give --overwrite to start "
                f"afresh, or another {self.flag}"
            )
        fingerprint = record["fingerprint"]
        for before, after in RENAMED.items():
            if before in fingerprint and after not in fingerprint:
                fingerprint[after] = fingerprint.pop(before)
        return record

    def check(self, fingerprint: Mapping[str, Any], *, complete: bool = True) -> None:
        """Refuse to resume an output made with other settings (nothing is written).

        ``complete=False`` compares only the settings given (a first check before the endpoint
        is known); ``complete=True`` also refuses a setting the record has and the run lacks.
        """
        if not self.resuming:
            return
        record = self.read()
        if record is None:
            raise SettingsChanged(
                f"{self.output} exists but has no record of the settings that made it "
                f"({self.record_path.name} is missing: written by an older permrank or by "
                "another tool), so resuming it could mix results of different settings. "
                f"Give --overwrite to start afresh, or another {self.flag}",
                {},
            )
        found = flatten(fingerprint)
        diff = differences(record["fingerprint"], found, only_new_keys=not complete)
        if diff:
            lines = "\n".join(
                f"  {name}: {_shown(old)} -> {_shown(new)}" for name, (old, new) in diff.items()
            )
            raise SettingsChanged(
                f"{self.output} was made with other settings; resuming it would mix results of "
                f"both. Changed ({len(diff)}):\n{lines}\n"
                f"Run with the earlier settings to resume it, give --overwrite to start afresh, "
                f"or write to another {self.flag}.",
                diff,
            )
        if record.get("input_path") and record.get("input_path") != self.input_path:
            log.info(
                "%s was made from %s; resuming with %s (the same content)",
                self.output,
                record.get("input_path"),
                self.input_path,
            )

    def begin(self, fingerprint: Mapping[str, Any], *, input_path: str | None = None) -> None:
        """Check once more and write the record: from here on the output is this run's."""
        if input_path is not None:
            self.input_path = input_path
        self.check(fingerprint)
        self.fingerprint = flatten(fingerprint)
        record = None
        if not self.overwrite and self._existed:
            record = self.read()
        if record is not None and not differences(record["fingerprint"], self.fingerprint):
            totals = dict(record.get("totals") or {})
            self.earlier = Usage.model_validate(totals)
            self.earlier_seconds = float(record.get("seconds") or 0.0)
            self.sessions = int(record.get("sessions") or 0)
        self._write(Usage(), 0.0, finished=False)

    def totals(self, session: Usage) -> Usage:
        """The earlier sessions' totals and this one's."""
        total = self.earlier.model_copy(deep=True)
        total.add(session)
        return total

    def seconds(self, session_seconds: float) -> float:
        return self.earlier_seconds + session_seconds

    def checkpoint(self, session: Usage, seconds: float, *, every_s: float = 1.0) -> None:
        """Keep this session's totals so far (at most every ``every_s`` seconds), so that even
        a killed run's record counts most of what it spent."""
        now = time.monotonic()
        if now - self._last_checkpoint >= every_s:
            self._last_checkpoint = now
            self._write(session, seconds, finished=False)

    def finish(self, session: Usage, seconds: float) -> None:
        self._write(session, seconds, finished=True)

    def _write(self, session: Usage, seconds: float, *, finished: bool) -> None:
        totals = self.totals(session)
        write_json_atomic(
            self.record_path,
            {
                "version": RECORD_VERSION,
                "output": str(self.output),
                "input_path": self.input_path,
                "fingerprint": self.fingerprint,
                "sessions": self.sessions + 1,
                "seconds": round(self.seconds(seconds), 3),
                "totals": totals.model_dump(),
                "last_session_finished": finished,
            },
        )
