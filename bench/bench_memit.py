"""Batch-editing benchmark: edits per second for MEMIT batches of 1, 10, 100 and for ROME.

    python bench/bench_memit.py [--sizes 1,10,100] [--rome 10] [--data counterfact|FILE]
                                [--seed 0] [--device auto] [--dtype float32] [--set key=value ...] [--json F]

For each MEMIT batch size B the first B CounterFact cases are edited in one batch;
ROME edits ``--rome`` cases one at a time.  Printed per row: seconds for the edit
(split into target optimisation / keys / update), edits per second, evaluation seconds
per case, mean gradient steps, efficacy / neighbourhood success pre -> post, and the
process's peak RSS at the end; then each row's metrics after the edit.  Statistics and
context prefixes are prepared before the clock starts (``prepare`` is timed separately).
Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402

from kedit.data.cases import load_cases  # noqa: E402
from kedit.runs.bench import load_benchmark  # noqa: E402
from kedit.runs.experiment import make_method  # noqa: E402
from kedit.methods.base import RunContext  # noqa: E402
from kedit.models.load import load_model  # noqa: E402
from kedit.runs.runner import run_edits  # noqa: E402

SHOW = ("rewrite_acc", "rephrase_acc", "locality_acc", "efficacy_success", "paraphrase_success",
        "neighborhood_success")


def run(loaded, method_name: str, cases, batch_size: int, overrides: dict, stats_dir, seed: int = 0) -> dict:
    ctx = RunContext(stats_dir=stats_dir, seed=seed, progress=False)
    method, _ = make_method(loaded, method_name, None, overrides, ctx)
    t0 = time.perf_counter()
    method.prepare()
    t_prep = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = run_edits(method, cases, batch_size=batch_size)
    wall = time.perf_counter() - t0
    recs = result.records
    edit = sum(r["time"]["edit"] for r in recs)
    phase = {k: sum(r["time"].get(k, 0.0) for r in recs) for k in ("target", "key", "update")}
    return {"method": method_name, "batch_size": batch_size, "n": len(cases), "prepare_s": t_prep,
            "edit_s": edit, **{f"{k}_s": v for k, v in phase.items()}, "edits_per_s": len(cases) / edit,
            "eval_s_per_case": statistics.mean(r["time"]["eval"] for r in recs),
            "pre_eval_s": result.timings.get("pre_eval", 0.0), "wall_s": wall,
            "steps_mean": statistics.mean(r["method"].get("steps", 0) for r in recs),
            "pre": {m: result.metrics["pre"].get(m) for m in SHOW},
            "post": {m: result.metrics["post"].get(m) for m in SHOW}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,10,100", help="MEMIT batch sizes")
    ap.add_argument("--rome", type=int, default=10, help="ROME cases (one at a time); 0 to skip")
    ap.add_argument("--data", default="counterfact", help="counterfact | zsre | a cases file (e.g. cases/anchor-31.jsonl)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--stats-dir", default=None)
    ap.add_argument("--seed", type=int, default=0, help="draws the context prefixes")
    ap.add_argument("--set", action="append", default=[], help="MEMIT hyperparameter override key=value")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    loaded = load_model(args.model, device=args.device, dtype=args.dtype, progress=lambda s: None)
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    sizes = [int(x) for x in args.sizes.split(",") if x]
    n = max(sizes + [args.rome])
    cases = load_cases(args.data)[:n] if Path(args.data).is_file() else load_benchmark(args.data, n=n)
    print(f"model {args.model} on {loaded.device} ({args.dtype}); {args.data} cases")
    rows = [run(loaded, "memit", cases[:b], b, overrides, args.stats_dir, args.seed) for b in sizes]
    if args.rome:
        rows.append(run(loaded, "rome", cases[: args.rome], 1, {}, args.stats_dir, args.seed))
    print(f"\n{'method':7s} {'batch':>5s} {'edit s':>8s} {'target':>7s} {'keys':>6s} {'update':>6s} {'edits/s':>8s} "
          f"{'eval s/case':>11s} {'steps':>5s}  ES pre->post  NS pre->post")
    for r in rows:
        es = f"{r['pre']['efficacy_success']:.2f}->{r['post']['efficacy_success']:.2f}"
        ns = f"{r['pre']['neighborhood_success']:.2f}->{r['post']['neighborhood_success']:.2f}"
        print(f"{r['method']:7s} {r['batch_size']:>5d} {r['edit_s']:>8.1f} {r['target_s']:>7.1f} {r['key_s']:>6.1f} "
              f"{r['update_s']:>6.2f} {r['edits_per_s']:>8.3f} {r['eval_s_per_case']:>11.3f} {r['steps_mean']:>5.1f}  "
              f"{es:12s}  {ns}")
    print()
    for r in rows:
        print(f"{r['method']:7s} {r['batch_size']:>5d}  " + "  ".join(
            f"{m.replace('_success', '').replace('_acc', '')} {r['post'][m]:.3f}" for m in SHOW if r["post"][m] is not None))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS {rss:.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(loaded.device), "rows": rows, "peak_rss_mib": rss},
                                              indent=1))


if __name__ == "__main__":
    main()
