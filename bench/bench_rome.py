"""ROME benchmark: where the time goes per edit, and edit quality per layer.

    python bench/bench_rome.py [--cases cases/anchor-31.jsonl] [--layers 5] [-n 31]
                               [--seeds 0] [--device auto] [--dtype float32] [--set key=value ...]

Prints, per layer and seed (the seed draws the context prefixes) and, with several seeds,
the mean over them: statistics time, median / mean edit time split into key / target
optimisation / update, evaluation time per case, gradient steps used, the EasyEdit token
accuracies and CounterFact scores (mean pre -> post), and peak RSS.  Timings are printed,
never asserted (see tests/ for behaviour).
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
from kedit.runs.experiment import make_method  # noqa: E402
from kedit.methods.base import RunContext  # noqa: E402
from kedit.models.load import load_model  # noqa: E402
from kedit.runs.runner import run_edits  # noqa: E402

METRICS = ("rewrite_acc", "rephrase_acc", "locality_acc", "efficacy_success", "paraphrase_success",
           "neighborhood_success", "score")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="cases/anchor-31.jsonl")
    ap.add_argument("-n", type=int, default=None, help="first n cases")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", default="5", help="comma-separated layers to compare")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--stats-dir", default=None)
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (the context prefixes)")
    ap.add_argument("--set", action="append", default=[], help="hyperparameter override key=value")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args()

    cases = load_cases(args.cases)[: args.n]
    t0 = time.perf_counter()
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, progress=lambda s: None)
    t_load = time.perf_counter() - t0
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    rows = []
    print(f"model {args.model} on {loaded.device} ({args.dtype}), load {t_load:.1f} s, {len(cases)} cases "
          f"from {args.cases}")
    seeds = [int(x) for x in args.seeds.split(",")]
    for layer, seed in [(lay, sd) for lay in (int(x) for x in args.layers.split(",")) for sd in seeds]:
        ctx = RunContext(stats_dir=args.stats_dir, seed=seed, progress=False)
        method, _ = make_method(loaded, "rome", None, {**overrides, "layer": layer}, ctx)
        t0 = time.perf_counter()
        method.prepare()
        t_prep = time.perf_counter() - t0
        result = run_edits(method, cases)
        recs = result.records
        edit = [r["time"].get("key", 0) + r["time"].get("target", 0) + r["time"].get("update", 0) for r in recs]
        row = {
            "layer": layer, "seed": seed, "prepare_s": t_prep, "edit_median_s": statistics.median(edit),
            "edit_mean_s": statistics.mean(edit),
            "key_s": statistics.mean(r["time"].get("key", 0) for r in recs),
            "target_s": statistics.mean(r["time"].get("target", 0) for r in recs),
            "update_s": statistics.mean(r["time"].get("update", 0) for r in recs),
            "eval_s": statistics.mean(r["time"]["eval"] for r in recs),
            "steps_mean": statistics.mean(r["method"].get("steps", 0) for r in recs),
            "pre": {m: result.metrics["pre"].get(m) for m in METRICS},
            "post": {m: result.metrics["post"].get(m) for m in METRICS},
        }
        rows.append(row)
        print(f"\nlayer {layer}, seed {seed}: prepare (stats + prefixes) {t_prep:.1f} s; edit median {row['edit_median_s']:.2f} s "
              f"(mean {row['edit_mean_s']:.2f}: key {row['key_s']:.2f} + target {row['target_s']:.2f} + update "
              f"{row['update_s']:.3f}); eval {row['eval_s']:.2f} s/case; steps {row['steps_mean']:.1f}")
        for m in METRICS:
            a, b = row["pre"][m], row["post"][m]
            if a is not None or b is not None:
                print(f"  {m:22s} {a if a is None else f'{a:.3f}'} -> {b if b is None else f'{b:.3f}'}")
        sys.stdout.flush()
    if len(seeds) > 1:
        for layer in sorted({r["layer"] for r in rows}):
            mine = [r for r in rows if r["layer"] == layer]
            print(f"\nlayer {layer}, mean over seeds {args.seeds}: edit median "
                  f"{statistics.mean(r['edit_median_s'] for r in mine):.2f} s, steps "
                  f"{statistics.mean(r['steps_mean'] for r in mine):.1f}")
            for m in METRICS:
                post = [r["post"][m] for r in mine if r["post"][m] is not None]
                if post:
                    print(f"  {m:22s} {statistics.mean(post):.3f}  (per seed: "
                          f"{' '.join(f'{x:.3f}' for x in post)})")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS {rss:.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(loaded.device), "dtype": args.dtype, "rows": rows,
                                               "peak_rss_mib": rss}, indent=1))


if __name__ == "__main__":
    main()
