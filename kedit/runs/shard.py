"""Independent bench cases split over processes, and their logs merged back into one.

The unit of work is a *batch*: cases ``b*size .. (b+1)*size`` of the run's case list
(one case per batch for single-edit methods, ``--batch-size`` cases for batch methods).
Batches are numbered on the whole list, whatever the number of processes, so a record's
``batch`` says which edit it came from in every run and every resume.

Each process edits the batches ``todo[rank::world]`` (strided: neighbouring batches go
to different processes) and appends its records to its own log, ``results.rank<R>.jsonl``
(a single process writes ``results.jsonl`` directly).  :func:`consolidate` — run by the
main process before the work starts and after every process has finished — folds every
log into ``results.jsonl``: only batches whose every case has a record are kept (a batch
cut off by an interruption is redone from the original weights), each batch once, in the
order of the case list, so the merged log (and ``metrics.json`` computed from it) is the
one a single process writes.  A run cut off with any number of processes resumes with any
other number.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from kedit.data.cases import EditCase
from kedit.runs.rundir import read_results, write_text

LOG = "results.jsonl"


def batch_ranges(n: int, size: int) -> list[range]:
    """Case indices of each batch of a run of ``n`` cases."""
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def shard_log(run_dir: Path, rank: int, world: int) -> Path:
    """The log this process appends to."""
    return Path(run_dir) / (LOG if world == 1 else f"results.rank{rank}.jsonl")


def shard_logs(run_dir: Path) -> list[Path]:
    """Every per-process log left in the run directory (merged or not yet)."""
    return sorted(Path(run_dir).glob("results.rank*.jsonl"))


def complete_records(records: Sequence[dict], cases: Sequence[EditCase], size: int) -> list[dict]:
    """The records of the batches that finished completely, each batch once, in case order."""
    ranges = batch_ranges(len(cases), size)
    index = {c.case_id: i for i, c in enumerate(cases)}
    seen: dict[int, dict[str, dict]] = {}
    for r in records:
        b, i = r.get("batch"), index.get(r.get("case_id"))
        if i is None or not isinstance(b, int) or not 0 <= b < len(ranges) or i not in ranges[b]:
            continue  # not a case of this run's batch b (e.g. a log from another batch size)
        seen.setdefault(b, {}).setdefault(r["case_id"], r)
    kept = []
    for b in sorted(seen):
        want = [cases[i].case_id for i in ranges[b]]
        if all(cid in seen[b] for cid in want):
            kept.extend(seen[b][cid] for cid in want)
    return kept


def consolidate(run_dir: Path, cases: Sequence[EditCase], size: int) -> list[dict]:
    """Fold ``results.jsonl`` and every per-process log into ``results.jsonl`` (atomic
    rewrite; the per-process logs are removed after) and return its records."""
    run_dir = Path(run_dir)
    logs = shard_logs(run_dir)
    records = [r for f in [run_dir / LOG, *logs] for r in read_results(f)]
    kept = complete_records(records, cases, size)
    write_text(run_dir / LOG, "".join(json.dumps(r) + "\n" for r in kept))
    for f in logs:
        f.unlink()
    return kept


def todo_batches(done: Sequence[dict], cases: Sequence[EditCase], size: int) -> list[int]:
    """Batches with no record yet (``done`` holds complete batches only)."""
    finished = {r["batch"] for r in done}
    return [b for b in range(len(batch_ranges(len(cases), size))) if b not in finished]


def my_batches(todo: Sequence[int], rank: int, world: int) -> list[int]:
    """This process's share of ``todo``: every ``world``-th batch from its ``rank``."""
    return list(todo[rank::world])
