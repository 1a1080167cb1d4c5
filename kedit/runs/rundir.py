"""The run directory: ids, atomic writes, resolved config, per-case log.

Layout of ``runs/<id>/`` (the schema other tools may rely on)::

    config.yaml        everything resolved: model (path, fingerprint), method, hparams, seed,
                       device, dtype, versions, command line, cases file and hash
    cases.jsonl        the cases, in kedit's layout
    results.jsonl      one line per case: {"case_id", "pre": {...}, "post": {...}, "time": {...}, ...}
    metrics.json       {"n", "pre": {name: mean}, "post": {...}, "stderr": {"pre", "post"}, "count": ...}
    generations.md / generations.jsonl   before/after greedy continuations
    edit.safetensors  the weight change (see runner: per case or one for the whole run)
    log.txt            what happened, with times

``kedit edit`` builds the directory under a hidden temporary name and renames it when
complete, so an interrupted run leaves nothing that looks finished.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from kedit.util.atomic import refused_as, write_text


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_yaml(path: Path, data: Any) -> None:
    write_text(path, yaml.safe_dump(_plain(data), sort_keys=False, allow_unicode=True))


def _json_default(o: Any) -> Any:
    if isinstance(o, (Path,)):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def _plain(o: Any) -> Any:
    """Tuples -> lists, paths -> str, recursively (YAML-safe)."""
    if isinstance(o, dict):
        return {str(k): _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_plain(v) for v in o]
    if isinstance(o, (Path, str)):
        return str(o)  # also str subclasses such as torch's TorchVersion
    if o is None or isinstance(o, (bool, int, float)):
        return o
    return str(o)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:40] or "x"


def new_run_id(method: str, model: str, payload: Any) -> str:
    """``<UTC time>-<method>-<model>-<6 hex of the resolved config>``."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:6]
    return f"{stamp}-{slug(method)}-{slug(Path(model).name if os.sep in model else model)}-{digest}"


def unique_run_id(root: Path, run_id: str) -> str:
    """``run_id``, or ``run_id-2``, ``-3``... when a run (finished or in progress) already has it:
    two runs of the same config started within one second must not collide."""
    root = Path(root)
    candidate, k = run_id, 1
    while (root / candidate).exists() or (root / f".{candidate}.partial").exists():
        k += 1
        candidate = f"{run_id}-{k}"
    return candidate


class RunDir:
    """A run directory being written: under ``.<id>.partial`` until :meth:`finish`."""

    def __init__(self, root: Path, run_id: str, *, staged: bool = True):
        self.root = Path(root)
        self.run_id = run_id = unique_run_id(self.root, run_id)
        self.final = self.root / run_id
        self.path = self.root / f".{run_id}.partial" if staged else self.final
        with refused_as(self.root):
            self.path.mkdir(parents=True, exist_ok=False)
            try:
                self._log = open(self.path / "log.txt", "a", buffering=1)
            except BaseException:
                shutil.rmtree(self.path, ignore_errors=True)
                raise

    def log(self, msg: str) -> None:
        now = _dt.datetime.now().strftime("%H:%M:%S")
        with refused_as(self.path / "log.txt"):
            self._log.write(f"[{now}] {msg}\n")

    def append_result(self, record: dict) -> None:
        append_record(self.path / "results.jsonl", record)

    def finish(self) -> Path:
        with refused_as(self.final):
            self._log.close()
            if self.path != self.final:
                os.replace(self.path, self.final)
            self.path = self.final
        return self.final

    def abandon(self) -> None:
        try:
            self._log.close()
        except OSError:
            pass            # the directory goes anyway
        if self.path != self.final and self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)


def run_kind(config: Any) -> str:
    """What wrote a run directory, from its config.yaml: ``edit``, ``bench``, ``train``
    (``kedit train``), ``trace`` (``kedit trace``) or ``unknown``."""
    if not isinstance(config, dict):
        return "unknown"
    if config.get("kind") == "train":
        return "train"
    if "method" in config:
        return "bench" if config.get("bench") else "edit"
    return "trace" if "settings" in config else "unknown"


#: How a message names each kind of run directory.
RUN_KINDS = {"edit": "an edit run (kedit edit)", "bench": "a bench run (kedit bench)",
             "train": "a training run (kedit train)", "trace": "a causal-tracing run (kedit trace)",
             "unknown": "not a kedit run"}


def append_record(path: Path, record: dict) -> None:
    """Append one case's record to a results.jsonl, flushed and fsynced (the resume log)."""
    with refused_as(path), open(path, "a") as f:
        f.write(json.dumps(record, default=_json_default) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_results(path: Path) -> list[dict]:
    """results.jsonl -> records; a torn last line (interrupted write) is ignored."""
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            break
    return out
