"""What a benchmark table costs on this machine: CPU seconds per case, and the projected total.

    python bench/table_budget.py [--methods rome,ft_m] [--subsets knowedit:zsre,...]
                                 [--small 1] [--large 3] [--model smollm2-135m] [--threads 1]

For every (method, benchmark subset) the script runs ``kedit bench`` twice as a user would
(``--batch-size 1``, KnowEdit subsets with ``--generation``, into a temporary directory), on
``--small`` and on ``--large`` cases, and reads the child processes' CPU time (user + system)
from the operating system.  The difference of the two runs divided by the difference in cases
is the CPU time of one case, start-up (imports, model load, statistics, pre-edit evaluation
set-up) removed.  It then prints, per row and in total, the CPU hours the full table takes at
its published sizes (KnowEdit: ZsRE 200, WikiData_counterfact 200, WikiBio 100 cases;
portability one-hop sets 100 each) and the wall hours on this machine's cores with one run per
core.  CPU time is what the machine spends whatever else runs beside it; the per-case seconds
therefore hold on a shared machine to within cache effects.  Nothing is asserted.

The defaults (``--methods rome,memit,alphaedit,emmet,ft_l,ft_m`` over the three KnowEdit
subsets, plus the two one-hop portability sets for ROME, MEMIT and FT-M) are the table of
docs/benchmarks.md ("The full table").
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: benchmark subset -> (cases in the full table, extra flags)
TABLE = {"knowedit:zsre": (200, ["--generation"]),
         "knowedit:wiki-counterfact": (200, ["--generation"]),
         "knowedit:wikibio": (100, ["--generation"]),
         "portability:zsre-one-hop": (100, []),
         "portability:counterfact-one-hop": (100, [])}
PORTABILITY_METHODS = ("rome", "memit", "ft_m")


def cpu_of_run(method: str, subset: str, n: int, model: str, threads: int, out: Path) -> float:
    """CPU seconds (user + system) of one ``kedit bench`` run on the first ``n`` cases."""
    bench, sub = subset.split(":")
    cmd = [sys.executable, "-m", "kedit", "bench", bench, "--subset", sub, "--method", method, "-n", str(n),
           "--model", model, "--batch-size", "1", *TABLE[subset][1], "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd[2:])}: exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="rome,memit,alphaedit,emmet,ft_l,ft_m")
    ap.add_argument("--subsets", default=None, help="comma-separated, e.g. knowedit:zsre (default: the table's)")
    ap.add_argument("--small", type=int, default=1, help="cases of the first run")
    ap.add_argument("--large", type=int, default=3, help="cases of the second run")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    args = ap.parse_args()
    if not 0 < args.small < args.large:
        sys.exit("--small and --large: 0 < small < large")
    methods = [m for m in args.methods.split(",") if m]
    subsets = args.subsets.split(",") if args.subsets else list(TABLE)
    unknown = [s for s in subsets if s not in TABLE]
    if unknown:
        sys.exit(f"--subsets: unknown {unknown}; known: {', '.join(TABLE)}")
    cores = os.cpu_count() or 1
    side_by_side = max(cores // args.threads, 1)
    print(f"model {args.model}, {args.threads} torch thread(s) per run, {cores} cores; "
          f"CPU s per case = (CPU(n={args.large}) - CPU(n={args.small})) / {args.large - args.small}")
    print(f"{'method':<10} {'subset':<32} {'CPU s/case':>10} {'cases':>6} {'CPU h':>7}")
    total = 0.0
    with tempfile.TemporaryDirectory(prefix="kedit-budget-") as tmp:
        for method in methods:
            for subset in subsets:
                if subset.startswith("portability:") and method not in PORTABILITY_METHODS and not args.subsets:
                    continue
                small = cpu_of_run(method, subset, args.small, args.model, args.threads, Path(tmp) / "a")
                large = cpu_of_run(method, subset, args.large, args.model, args.threads, Path(tmp) / "b")
                per_case = max(large - small, 0.0) / (args.large - args.small)
                n = TABLE[subset][0]
                total += per_case * n / 3600
                print(f"{method:<10} {subset:<32} {per_case:>10.1f} {n:>6} {per_case * n / 3600:>7.2f}", flush=True)
    print(f"total: {total:.1f} CPU hours; {total / side_by_side:.1f} wall hours "
          f"with {side_by_side} runs side by side on this machine")


if __name__ == "__main__":
    main()
