"""Benchmarks over several processes: two CPU processes under torchrun (gloo) give the run
directory one process gives, a run cut off (Ctrl-C, a killed launch) with one process
count resumes with another, sequential runs refuse, and only the main process prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_bench import ctrl_c_at_edit, science, tiny_bench  # noqa: F401 - tiny_bench is a fixture
from typer.testing import CliRunner

from kedit.cli import app
from kedit.methods.locate.rome import ROME
from kedit.runs.rundir import read_results
from kedit.util.launch import Launch, LaunchError

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def torchrun(args: list[str], *, nproc: int = 2, script: str | None = None, timeout: int = 120, **env_extra):
    """``torchrun --standalone --nproc_per_node N -m kedit ARGS`` (or ``SCRIPT ARGS``; CPU, one
    thread a process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **env_extra,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    target = [script] if script else ["-m", "kedit"]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", *target, *args],
                          env=env, capture_output=True, text=True, timeout=timeout)


def same_science(got: dict, want: dict) -> bool:
    """The metrics of two runs of the same cases agree: post-edit scores, counts and every
    other field exactly; the pre-edit scores (and their standard errors) to float rounding.
    Each process scores its own cases before editing in batches of those cases, and on some
    CPUs a batch of another shape rounds differently in the last digits (seen: a pre-edit
    probability, scored alone instead of in a batch of five, moved in its seventh digit)."""
    pre = lambda m: {"pre": m["pre"], "stderr": m["stderr"]["pre"]}
    rest = lambda m: {**{k: v for k, v in m.items() if k not in ("pre", "stderr")},
                      "stderr": {k: v for k, v in m["stderr"].items() if k != "pre"}}
    a, b = pre(got), pre(want)
    return rest(got) == rest(want) and a.keys() == b.keys() and all(
        a[k].keys() == b[k].keys() and all(v == pytest.approx(b[k][m], rel=1e-6, abs=1e-9) for m, v in a[k].items())
        for k in a)


def one_run(root: Path) -> Path:
    (run,) = [p for p in root.iterdir() if p.is_dir()]
    return run


def test_two_processes_write_the_run_one_process_writes(tiny_bench):
    args, tmp = tiny_bench
    res = runner.invoke(app, [*args, "--out", str(tmp / "one")])
    assert res.exit_code == 0, res.output
    want = one_run(tmp / "one")

    proc = torchrun([*args, "--out", str(tmp / "two")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = one_run(tmp / "two")
    assert same_science(science(json.loads((run / "metrics.json").read_text())),
                        science(json.loads((want / "metrics.json").read_text())))
    recs, base = read_results(run / "results.jsonl"), read_results(want / "results.jsonl")
    assert [(r["case_id"], r["batch"]) for r in recs] == [(r["case_id"], r["batch"]) for r in base]
    assert [r["post"] for r in recs] == [r["post"] for r in base]
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "metrics.json", "results.jsonl"]
    # only the main process prints: one results table, one "sharded" line
    assert proc.stdout.count("counterfact: 5 cases") == 1, proc.stdout
    assert proc.stderr.count("sharded over 2 processes") == 1


def test_cut_runs_resume_with_another_process_count(tiny_bench, monkeypatch):
    """One process cut -> two processes resume it and are killed in turn -> one process
    finishes it; then two process logs, one torn mid-line -> one process finishes it."""
    args, tmp = tiny_bench
    res = runner.invoke(app, [*args, "--out", str(tmp / "clean")])
    assert res.exit_code == 0, res.output
    want = science(json.loads((one_run(tmp / "clean") / "metrics.json").read_text()))

    real = ctrl_c_at_edit(monkeypatch, 3)                       # one process, Ctrl-C in the third edit
    assert runner.invoke(app, [*args, "--out", str(tmp / "cut")]).exit_code == 130
    monkeypatch.setattr(ROME, "compute", real)
    run = one_run(tmp / "cut")
    assert [r["case_id"] for r in read_results(run / "results.jsonl")] == ["c0", "c1"]
    # two processes resume it (rank 0: c2, c4; rank 1: c3); rank 1 is cut in its first edit and
    # torchrun stops rank 0 wherever it is
    proc = torchrun(["bench", "--resume", str(run)], script=str(Path(__file__).with_name("cut_rank.py")),
                    CUT_RANK="1", CUT_AT="1")
    assert proc.returncode != 0 and not (run / "metrics.json").exists()
    logged = {r["case_id"] for f in run.glob("results*.jsonl") for r in read_results(f)}
    assert {"c0", "c1"} <= logged and "c3" not in logged
    calls = []
    monkeypatch.setattr(ROME, "compute", lambda self, requests: calls.append(requests[0].case_id) or real(self, requests))
    res = runner.invoke(app, ["bench", "--resume", str(run)])   # one process finishes it
    assert res.exit_code == 0, res.output
    assert sorted(calls) == sorted({"c0", "c1", "c2", "c3", "c4"} - logged)   # each missing case once
    recs = read_results(run / "results.jsonl")
    assert [r["case_id"] for r in recs] == ["c0", "c1", "c2", "c3", "c4"] and not list(run.glob("results.rank*"))
    assert same_science(science(json.loads((run / "metrics.json").read_text())), want)

    # two process logs left as a kill leaves them, one torn mid-line -> one process
    (run / "metrics.json").unlink()
    (run / "results.jsonl").unlink()
    (run / "results.rank0.jsonl").write_text(json.dumps(recs[0]) + "\n" + json.dumps(recs[2]) + "\n")
    (run / "results.rank1.jsonl").write_text(json.dumps(recs[1]) + "\n" + json.dumps(recs[3])[:40])
    calls.clear()
    res = runner.invoke(app, ["bench", "--resume", str(run)])
    assert res.exit_code == 0, res.output
    assert calls == ["c3", "c4"]                                  # nothing done twice
    assert [r["case_id"] for r in read_results(run / "results.jsonl")] == ["c0", "c1", "c2", "c3", "c4"]
    assert not list(run.glob("results.rank*"))
    assert same_science(science(json.loads((run / "metrics.json").read_text())), want)


def test_sequential_runs_and_bad_launch_environments_refuse(tiny_bench, monkeypatch):
    args, _ = tiny_bench
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    res = runner.invoke(app, [*args, "--sequential"])
    assert res.exit_code == 2 and "--sequential" in res.output and "WORLD_SIZE=2" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, ["edit", "cases.jsonl", "--model", "m"])      # one run from one process
    assert res.exit_code == 2 and "kedit edit runs in one process (WORLD_SIZE=2)" in res.output
    res = runner.invoke(app, ["stats", "--model", "m"])
    assert res.exit_code == 2 and "kedit stats runs in one process" in res.output
    monkeypatch.setenv("RANK", "two")
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "RANK='two'" in res.output


def test_launch_reads_the_launcher_environment():
    assert Launch.from_env({}) == Launch(0, 1, 0) and not Launch.from_env({}).sharded
    got = Launch.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (got.rank, got.world, got.local_rank, got.main) == (3, 4, 1, False)
    assert got.device("cuda") == "cuda:1" and got.device("cuda:0") == "cuda:1" and got.device("cpu") == "cpu"
    assert Launch().device("auto") == "auto"       # alone: the usual --device rules
    with pytest.raises(LaunchError, match="RANK=4 WORLD_SIZE=4"):
        Launch.from_env({"RANK": "4", "WORLD_SIZE": "4"})


MAIN_FIRST = """
import json, os, sys, time
from kedit.util.launch import Launch
launch = Launch.from_env()
log = sys.argv[1]
with launch.group("cpu"):
    with launch.main_first():
        with open(log, "a") as f:
            f.write(json.dumps({"rank": launch.rank, "t": time.time()}) + "\\n")
        if launch.main:
            time.sleep(1.0)   # a slow cache fill: the other process must wait for it
    shared = launch.share({"dir": f"from rank {launch.rank}"})["dir"]
    with open(f"{log}.rank{launch.rank}", "w") as f:   # one file per process: stdout lines of two
        f.write(shared)                                 # processes can interleave mid-line
"""


def test_main_first_runs_the_main_process_alone_first(tmp_path):
    script = tmp_path / "main_first.py"
    script.write_text(MAIN_FIRST)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path / "log.jsonl")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["rank"] for r in rows] == [0, 1] and rows[1]["t"] - rows[0]["t"] >= 1.0
    assert [(tmp_path / f"log.jsonl.rank{r}").read_text() for r in (0, 1)] == ["from rank 0"] * 2
