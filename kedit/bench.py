"""Benchmarks (CounterFact, zsRE): resumable runs over shipped data.

A bench run directory is written in place (not renamed at the end) so it can be
resumed: ``config.yaml`` first, then one line per finished case appended to
``results.jsonl`` (flushed and fsynced) — the resume log — and ``metrics.json`` only when
every case is done.  A directory without ``metrics.json`` is unfinished.

Resume (independent edits): records of batches that finished completely are kept; a
batch that was cut off half-way is dropped from the log and redone from the original
weights, so no case is lost or counted twice.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from kedit.cases import EditCase, load_cases
from kedit.paths import package_data
from kedit.runner import metrics_summary, run_edits
from kedit.runs import append_record, read_results, write_json, write_text

# name -> (file under kedit/data, layout, note shown with the numbers)
BENCHMARKS = {
    "counterfact": ("benchmarks/counterfact-val.json", "easyedit",
                    "CounterFact (Meng et al. 2022), validation cases in EasyEdit's flat layout"),
    "zsre": ("benchmarks/zsre_mend_train-1k.json", "zsre",
             "zsRE as split by MEND: 1,000 cases of the TRAIN split (not the eval split)"),
}


class BenchError(ValueError):
    """Bad benchmark arguments or an unusable run directory (one line)."""


def load_benchmark(name: str, data: str | None = None, n: int | None = None, offset: int = 0) -> list[EditCase]:
    """Cases ``offset .. offset+n`` of a benchmark (``data`` overrides the shipped file;
    any layout kedit reads, e.g. ROME's original CounterFact JSON)."""
    if name not in BENCHMARKS:
        raise BenchError(f"unknown benchmark '{name}' (known: {', '.join(BENCHMARKS)})")
    path, fmt, _ = BENCHMARKS[name]
    source = Path(data) if data else package_data() / path
    cases = load_cases(source, "auto" if data else fmt, skip_invalid=(name == "zsre"))
    if offset < 0 or offset >= len(cases):
        raise BenchError(f"--offset {offset}: {source} has {len(cases)} cases")
    return cases[offset: offset + n if n else None]


def complete_records(records: list[dict], batch_size: int) -> list[dict]:
    """Records of the batches that finished completely (a cut-off batch is redone)."""
    by_batch: dict[int, list[dict]] = {}
    for r in records:
        by_batch.setdefault(r["batch"], []).append(r)
    kept = []
    for b, recs in by_batch.items():
        if len({r["case_id"] for r in recs}) == batch_size or recs[-1].get("last_batch"):
            kept.extend(recs)
    return kept


def run_bench(method, cases: Sequence[EditCase], run_dir: Path, *, batch_size: int | None = None,
              sequential: bool = False, progress: Callable[[dict], None] | None = None) -> dict:
    """Edit and evaluate ``cases``, appending each finished case to ``run_dir/results.jsonl``.

    Cases already in the log (from an interrupted run) are skipped; returns metrics.json's
    content once every case is done.
    """
    run_dir = Path(run_dir)
    log = run_dir / "results.jsonl"
    native = getattr(method, "batch_native", False)
    size = batch_size or (len(cases) if native else 1)
    done = complete_records(read_results(log), size) if not sequential else []
    if sequential and log.exists() and log.stat().st_size:
        raise BenchError(f"{run_dir}: a sequential run cannot be resumed (edits accumulate in memory); "
                         f"start it again")
    # Rewrite the log with the complete batches only (atomic), then append from there.
    write_text(log, "".join(json.dumps(r) + "\n" for r in done))
    done_ids = {r["case_id"] for r in done}
    todo = [c for c in cases if c.case_id not in done_ids]
    batch_offset = 1 + max((r["batch"] for r in done), default=-1)
    n_batches = -(-len(todo) // size) if todo else 0

    def on_case(rec: dict) -> None:
        rec = {**rec, "batch": rec["batch"] + batch_offset}
        if rec["batch"] - batch_offset == n_batches - 1:
            rec["last_batch"] = True
        append_record(log, rec)
        if progress:
            progress(rec)

    if todo:
        result = run_edits(method, todo, sequential=sequential, batch_size=size,
                           on_case=None if sequential else on_case)
        if sequential:  # post-edit metrics exist only after the last edit
            for rec in result.records:
                on_case(rec)
    records = read_results(log)
    metrics = metrics_summary(records)
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def save_bench_config(run_dir: Path, config: dict) -> None:
    write_text(run_dir / "config.yaml", yaml.safe_dump(json.loads(json.dumps(config, default=str)),
                                                        sort_keys=False))


def load_bench_config(run_dir: Path) -> dict:
    f = Path(run_dir) / "config.yaml"
    if not f.exists():
        raise BenchError(f"--resume {run_dir}: no config.yaml (not a kedit bench run directory)")
    config = yaml.safe_load(f.read_text())
    if "bench" not in config:
        raise BenchError(f"--resume {run_dir}: config.yaml has no 'bench' section (not a bench run)")
    if (Path(run_dir) / "metrics.json").exists():
        raise BenchError(f"--resume {run_dir}: the run is already complete (metrics.json exists)")
    return config
