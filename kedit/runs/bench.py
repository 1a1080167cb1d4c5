"""Benchmarks (CounterFact, zsRE, KnowEdit, EasyEdit's portability sets): resumable runs
over shipped data.

``counterfact`` and ``zsre`` are one file each; ``knowedit`` and ``portability`` have
subsets (``--subset``): KnowEdit's ZsRE, WikiData_counterfact, WikiData_recent (not
shipped: ``--data``) and WikiBio; the one-hop, subject-replace and inverse-relation
portability sets of zsRE and CounterFact.

A bench run directory is written in place (not renamed at the end) so it can be
resumed: ``config.yaml`` first, then one line per finished case appended to
``results.jsonl`` (flushed and fsynced) — the resume log — and ``metrics.json`` only when
every case is done.  A directory without ``metrics.json`` is unfinished.

Resume (independent edits): records of batches that finished completely are kept; a
batch that was cut off half-way is dropped from the log and redone from the original
weights, so no case is lost or counted twice.  Launched as several processes
(``torchrun`` / ``accelerate launch``), independent batches are split over them, each
process logs to its own file and the main process merges the logs
(:mod:`kedit.runs.shard`); a run resumes with any number of processes.

Sequential runs (edits accumulate) keep their state on disk as they go: after each
batch its records (post = the metrics right after that edit) are appended to the log,
then ``checkpoint.safetensors`` is replaced atomically by the current state of every
edited site (parameters, wrapped modules such as a GRACE codebook or a WISE side memory,
a context) plus the method's sequential state (``Method.state``), with the number of
edits it holds.  Resume keeps the first ``edits`` records, restores the sites and the
state, and goes on; at the end every case is evaluated on the final model, the log is
rewritten with those final metrics (``post``; ``post_immediate`` the right-after-edit
ones), and the checkpoint is removed.  ``--checkpoint-every K`` adds a point to
``curve.jsonl`` after each K edits (all cases edited so far, evaluated on the model at
that moment); the curve goes into ``metrics.json["curve"]``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from kedit.util.yamlio import read_dir_yaml
from kedit.util.atomic import atomic_path, refused_as

from kedit.data.cases import EditCase, load_cases
from kedit.util.paths import package_data
from kedit.methods.edit import pack_sites, unpack_sites
from kedit.runs.runner import Resume, SiteStates, metrics_summary, run_edits, turn_size
from kedit.runs.rundir import append_record, read_results, unique_run_id, write_json, write_text
from kedit.runs.shard import batch_ranges, consolidate, my_batches, shard_log, todo_batches
from kedit.util.launch import Launch

# name -> (file under kedit/data, layout, note shown with the numbers)
BENCHMARKS = {
    "counterfact": ("benchmarks/counterfact-val.json", "easyedit",
                    "CounterFact (Meng et al. 2022), validation cases in EasyEdit's flat layout"),
    "zsre": ("benchmarks/zsre_mend_train-1k.json", "zsre",
             "zsRE as split by MEND: 1,000 cases of the TRAIN split (not the eval split)"),
}


#: KnowEdit's Fluency: one generation from the edit prompt, 100 tokens with the prompt.
KNOWEDIT_FLUENCY = {"source": "prompt", "total_tokens": True}

# name -> subset -> (file under kedit/data or None when not shipped, layout, note)
SUBSETS = {
    "knowedit": {
        "zsre": ("benchmarks/knowedit/zsre-test-all.json", "knowedit",
                 "KnowEdit ZsRE (Zhang et al. 2024), test set: 1,301 cases"),
        "wiki-counterfact": ("benchmarks/knowedit/wiki-counterfact-train.json", "knowedit",
                             "KnowEdit WikiData_counterfact, TRAIN split (1,427 cases; the test split is not "
                             "shipped, --data reads it)"),
        "wiki-recent": (None, "knowedit", "KnowEdit WikiData_recent, read from --data"),
        "wikibio": ("benchmarks/knowedit/wikibio-test-all.json", "wikibio",
                    "KnowEdit WikiBio, test set: 306 cases"),
    },
    "portability": {
        "zsre-one-hop": ("benchmarks/portability/zsre-one-hop.json", "zsre",
                         "EasyEdit portability, zsRE one-hop questions (1,037 cases)"),
        "counterfact-one-hop": ("benchmarks/portability/counterfact-one-hop.json", "rome",
                                "EasyEdit portability, CounterFact one-hop questions (1,031 cases)"),
        "zsre-subject-replace": ("benchmarks/portability/zsre-subject-replace.json", "zsre",
                                 "EasyEdit portability, zsRE subject aliases (289 of 293 cases usable)"),
        "counterfact-subject-replace": ("benchmarks/portability/counterfact-subject-replace.json", "rome",
                                        "EasyEdit portability, CounterFact subject aliases (213 cases)"),
        "zsre-inverse-relation": ("benchmarks/portability/zsre-inverse-relation.json", "zsre",
                                  "EasyEdit portability, zsRE inverse relations (380 of 385 cases usable)"),
    },
}


class BenchError(ValueError):
    """Bad benchmark arguments or an unusable run directory (one line)."""


@dataclass(frozen=True)
class Benchmark:
    """One benchmark (or subset): where its cases are and how to read and score them."""

    name: str
    subset: str | None
    file: str | None          # under kedit/data; None: not shipped (--data)
    layout: str
    note: str
    skip_invalid: bool = False  # files known to hold a few unusable records (listed in the data README)
    fluency: dict = field(default_factory=dict)  # generation_metrics options for --generation

    @property
    def label(self) -> str:
        """``knowedit/zsre``, ``counterfact``."""
        return f"{self.name}/{self.subset}" if self.subset else self.name


def benchmark_names() -> list[str]:
    return [*BENCHMARKS, *SUBSETS]


def get_benchmark(name: str, subset: str | None = None) -> Benchmark:
    """The benchmark ``name`` (``subset`` for knowedit / portability), or :class:`BenchError`."""
    if name in BENCHMARKS:
        if subset:
            raise BenchError(f"--subset {subset}: '{name}' has no subsets (subsets: {', '.join(SUBSETS)})")
        path, fmt, note = BENCHMARKS[name]
        return Benchmark(name, None, path, fmt, note, skip_invalid=(name == "zsre"))
    if name not in SUBSETS:
        raise BenchError(f"unknown benchmark '{name}' (known: {', '.join(benchmark_names())})")
    if not subset:
        raise BenchError(f"{name} needs --subset ({' | '.join(SUBSETS[name])})")
    if subset not in SUBSETS[name]:
        raise BenchError(f"unknown {name} subset '{subset}' (known: {', '.join(SUBSETS[name])})")
    path, fmt, note = SUBSETS[name][subset]
    return Benchmark(name, subset, path, fmt, note, skip_invalid=(name == "portability"),
                     fluency=dict(KNOWEDIT_FLUENCY) if name == "knowedit" else {})


def load_benchmark(name: str, data: str | None = None, n: int | None = None, offset: int = 0,
                   subset: str | None = None) -> list[EditCase]:
    """Cases ``offset .. offset+n`` of a benchmark (``data`` overrides the shipped file;
    any layout kedit reads, e.g. ROME's original CounterFact JSON or KnowEdit's
    recent_test.json)."""
    bm = get_benchmark(name, subset)
    if data:
        source = Path(data)
    elif bm.file is None:
        raise BenchError(f"{bm.label}: not shipped with kedit; give KnowEdit's file with --data "
                         "(e.g. wiki_recent/recent_test.json)")
    else:
        source = package_data() / bm.file
    cases = load_cases(source, "auto" if data else bm.layout, skip_invalid=bm.skip_invalid)
    if offset < 0 or offset >= len(cases):
        raise BenchError(f"--offset {offset}: {source} has {len(cases)} cases")
    return cases[offset: offset + n if n else None]


CHECKPOINT = "checkpoint.safetensors"
CURVE = "curve.jsonl"


def save_checkpoint(run_dir: Path, edits: int, sites: SiteStates, state: dict[str, torch.Tensor]) -> None:
    """The sequential run's state after ``edits`` edits (atomic replace)."""
    from safetensors.torch import save_file

    tensors, listing = pack_sites(sites)
    tensors.update({f"state/{k}": v.detach().cpu().contiguous() for k, v in state.items()})
    with atomic_path(run_dir / CHECKPOINT) as tmp:
        save_file(tensors, str(tmp), metadata={"edits": str(edits), "sites": listing})


def load_checkpoint(run_dir: Path) -> tuple[int, SiteStates, dict[str, torch.Tensor]] | None:
    from safetensors import safe_open

    path = run_dir / CHECKPOINT
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edits = int(meta["edits"])
    state = {k.removeprefix("state/"): v for k, v in tensors.items() if k.startswith("state/")}
    if "sites" not in meta:   # a checkpoint written before edit kinds: parameter values only
        from kedit.methods.edit import Delta, SiteState

        sites = {f"weight:{k.removeprefix('weight/')}": (Delta, SiteState({"value": v}))
                 for k, v in tensors.items() if k.startswith("weight/")}
    else:
        sites = unpack_sites({k: v for k, v in tensors.items() if not k.startswith("state/")}, meta["sites"])
    return edits, sites, state


def _run_sequential(method, cases: Sequence[EditCase], run_dir: Path, size: int,
                    checkpoint_every: int | None, progress: Callable[[dict], None] | None, extra_metrics,
                    evaluation=None, planned: Callable[[int, int], None] | None = None, reporter=None) -> dict:
    log, curve_log = run_dir / "results.jsonl", run_dir / CURVE
    saved = load_checkpoint(run_dir)
    resume = None
    if saved is not None:
        edits, sites, state = saved
        records = read_results(log)[:edits]
        if len(records) != edits:
            raise BenchError(f"{run_dir}: checkpoint holds {edits} edits but the log has {len(records)} records")
        resume = Resume(records, sites, state)
    curve = [p for p in read_results(curve_log) if resume and p["edits"] <= len(resume.records)]
    write_text(log, "".join(json.dumps(r) + "\n" for r in (resume.records if resume else [])))
    write_text(curve_log, "".join(json.dumps(p) + "\n" for p in curve))

    edits = [len(resume.records) if resume else 0]
    if planned:
        planned(edits[0], len(cases) - edits[0])

    def on_batch(recs: list[dict], sites: SiteStates) -> None:
        for rec in recs:
            append_record(log, rec)
        edits[0] += len(recs)
        save_checkpoint(run_dir, edits[0], sites, method.state())
        if reporter:
            reporter.log({"post": metrics_summary(recs)["post"]}, edits[0], "edits")
        for rec in recs:
            if progress:
                progress(rec)

    def on_point(point: dict) -> None:
        append_record(curve_log, point)
        curve.append(point)
        if reporter:
            reporter.log({"curve": point["post"]}, point["edits"], "curve")

    result = run_edits(method, cases, sequential=True, batch_size=size, checkpoint_every=checkpoint_every,
                       on_checkpoint=on_point, on_batch=on_batch, resume=resume, extra_metrics=extra_metrics,
                       evaluation=evaluation)
    write_text(log, "".join(json.dumps(r) + "\n" for r in result.records))
    metrics = metrics_summary(result.records)
    if curve:
        metrics["curve"] = curve
    metrics["time"] = time_split(result.records)
    write_json(run_dir / "metrics.json", metrics)
    (run_dir / CHECKPOINT).unlink(missing_ok=True)   # last: a run is never left without both
    return metrics


def run_bench(method, cases: Sequence[EditCase], run_dir: Path, *, batch_size: int | None = None,
              sequential: bool = False, checkpoint_every: int | None = None,
              progress: Callable[[dict], None] | None = None, extra_metrics=None, evaluation=None,
              launch: Launch | None = None, planned: Callable[[int, int], None] | None = None,
              reporter=None) -> dict | None:
    """Edit and evaluate ``cases``, appending each finished case to ``run_dir/results.jsonl``.

    Cases already in the log (from an interrupted run) are skipped (sequential runs go
    on from their checkpoint); returns metrics.json's content once every case is done.
    ``evaluation`` (:class:`kedit.evaluation.suite.Evaluation`) is what is measured
    (default: the teacher-forced metrics).

    ``launch`` (several processes: :class:`kedit.util.launch.Launch`): every process calls
    this with the same arguments; each edits its share of the batches not yet done
    (:mod:`kedit.runs.shard`) and the main process merges the logs and writes
    ``metrics.json``, which it returns (the other processes return None).
    ``planned(done, mine)`` is told, before any editing, how many cases were already done
    and how many this process will edit.  ``reporter`` (:class:`kedit.runs.trackers.Reporter`,
    sequential runs): each checkpoint's post metrics (``post/*``, the batch just edited) and
    each curve point (``curve/*``) are logged at step = the number of edits so far.
    """
    run_dir = Path(run_dir)
    launch = launch or Launch()
    size = turn_size(method, batch_size, len(cases))
    if sequential:
        if launch.sharded:
            raise BenchError(f"--sequential: edits accumulate in one model and cannot be split over "
                             f"{launch.world} processes (run it with one process)")
        return _run_sequential(method, cases, run_dir, size, checkpoint_every, progress, extra_metrics, evaluation,
                               planned, reporter)
    if checkpoint_every:
        raise BenchError("--checkpoint-every needs --sequential (independent edits have no accumulated state)")
    if launch.main:
        consolidate(run_dir, cases, size)          # logs of an interrupted run, any process count
    launch.barrier()
    done = read_results(run_dir / "results.jsonl")
    mine = my_batches(todo_batches(done, cases, size), launch.rank, launch.world)
    ranges = batch_ranges(len(cases), size)
    todo = [cases[i] for b in mine for i in ranges[b]]
    log = shard_log(run_dir, launch.rank, launch.world)
    if planned:
        planned(len(done), len(todo))

    def on_case(rec: dict) -> None:
        # run_edits numbers this process's batches 0, 1, ...: the batch on the whole case list
        rec = {**rec, "batch": mine[rec["batch"]]}
        append_record(log, rec)
        if progress:
            progress(rec)

    if todo:
        # todo is whole batches in order, only the run's last one can be short: run_edits cuts
        # it into the same batches
        run_edits(method, todo, batch_size=size, on_case=on_case, extra_metrics=extra_metrics, evaluation=evaluation)
    launch.barrier()
    if not launch.main:
        return None
    records = consolidate(run_dir, cases, size)
    if len(records) != len(cases):
        raise BenchError(f"{run_dir}: {len(records)} of {len(cases)} cases have records after the run")
    metrics = metrics_summary(records)
    metrics["time"] = time_split(records)
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def time_split(records: Sequence[dict]) -> dict:
    """Where a bench run's time went, summed over its cases (seconds): ``edit`` (the method),
    ``pre_eval`` / ``eval`` (evaluation before / after the edit; a sequential run's
    checkpoint evaluations are not included) and ``eval_share`` = evaluation / (edit + evaluation).
    With more than the teacher-forced metrics, the evaluation seconds of each part, before and
    after together: ``eval_teacher_s``, ``eval_generate_s``, ``eval_cost_s``."""
    edit = sum(r.get("time", {}).get("edit", 0.0) for r in records)
    pre = sum(r.get("time", {}).get("pre_eval", 0.0) for r in records)
    post = sum(r.get("time", {}).get("eval", 0.0) for r in records)
    total = edit + pre + post
    out = {"edit_s": round(edit, 3), "pre_eval_s": round(pre, 3), "eval_s": round(post, 3),
           "eval_share": round((pre + post) / total, 4) if total > 0 else 0.0}
    split: dict[str, float] = {}
    for r in records:
        for k, v in r.get("time", {}).items():
            for prefix in ("pre_eval_", "eval_"):
                if k.startswith(prefix):
                    split[k.removeprefix(prefix)] = split.get(k.removeprefix(prefix), 0.0) + v
                    break
    if set(split) - {"teacher"}:
        out.update({f"eval_{k}_s": round(v, 3) for k, v in sorted(split.items())})
    return out


def new_bench_dir(out: Path, run_id: str, config: dict) -> Path:
    """A new bench run directory holding its ``config.yaml``: built under a hidden name and
    renamed, so a failure (a full disk) leaves nothing that ``--resume`` would take for a run."""
    out = Path(out)
    run_id = unique_run_id(out, run_id)
    final, staged = out / run_id, out / f".{run_id}.partial"
    with refused_as(out):
        staged.mkdir(parents=True)
        try:
            save_bench_config(staged, config)
            os.replace(staged, final)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
    return final


def save_bench_config(run_dir: Path, config: dict) -> None:
    write_text(run_dir / "config.yaml", yaml.safe_dump(json.loads(json.dumps(config, default=str)),
                                                        sort_keys=False))


def load_bench_config(run_dir: Path) -> dict:
    config = read_dir_yaml(run_dir, "config.yaml", BenchError, "kedit bench run")
    if not isinstance(config, dict) or "bench" not in config:
        raise BenchError(f"--resume {run_dir}: config.yaml has no 'bench' section (not a bench run)")
    if (Path(run_dir) / "metrics.json").exists():
        raise BenchError(f"--resume {run_dir}: the run is already complete (metrics.json exists)")
    missing = [k for k in RESUME_KEYS if k not in config] + [f"bench.{k}" for k in RESUME_BENCH_KEYS
                                                            if k not in (config["bench"] or {})]
    missing += [f"model.{k}" for k in ("name", "device", "dtype") if k not in (config.get("model") or {})]
    if missing:
        raise BenchError(f"--resume {run_dir}: config.yaml lacks {', '.join(missing)} (not written by kedit bench)")
    return config


#: What ``--resume`` reads from a bench run's config.yaml.
RESUME_KEYS = ("method", "model", "seed", "stats_dir", "hparams", "hparams_source")
RESUME_BENCH_KEYS = ("name", "n", "offset", "batch_size", "sequential", "data")
