"""Context edits (IKE): the cost of scoring with a context of many facts.

Run from the repository root::

    .venv/bin/python bench/bench_context.py [--model smollm2-135m] [--facts 1,10,100] [--rows 32]

For each number of facts F, IKE (the model's shipped setting) computes one context edit for
the first F CounterFact validation cases (its demonstrations and F "New Fact" lines), then
the first ``--rows`` of those cases' (prompt, new target) pairs are scored in one batch, as
kedit's evaluation scores them, two ways: the shared context run once into a key/value cache
repeated over the rows (what kedit does), and the context ids written before every row with
only the rows' logits computed (what it does when another edit's module wrapper is
installed).  Prints the context's length, both times, and the largest difference between
the two log-probabilities.
"""

from __future__ import annotations

import argparse
import time

import torch

import kedit.methods.edit as edit_module
from kedit.data.cases import EditRequest, load_cases
from kedit.evaluation.scoring import score_targets
from kedit.methods.base import RunContext
from kedit.models.load import load_model
from kedit.runs.experiment import make_method
from kedit.util.paths import package_data


def _score(loaded, pairs, concatenated: bool) -> tuple[float, list[float]]:
    saved = edit_module._can_prefix
    if concatenated:
        edit_module._can_prefix = lambda model, original: False
    try:
        t = time.perf_counter()
        scores = score_targets(loaded.model, loaded.tokenizer, pairs, batch_size=len(pairs))
        return time.perf_counter() - t, [float(s.logprobs.sum()) for s in scores]
    finally:
        edit_module._can_prefix = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--facts", default="1,10,100")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    loaded = load_model(args.model, device=args.device)
    cases = load_cases(package_data() / "benchmarks" / "counterfact-val.json")
    meth, source = make_method(loaded, "ike", ctx=RunContext(progress=False))
    meth.prepare()
    print(f"model {args.model} ({args.device}, {torch.get_num_threads()} threads), IKE from {source}, "
          f"{args.rows} rows in one batch")
    print(f"{'facts':>6} {'context tokens':>15} {'cached s':>9} {'concatenated s':>15} {'max |diff| logprob':>19}")
    for n in (int(x) for x in args.facts.split(",")):
        chosen = cases[:n]
        edit = meth.compute([EditRequest.from_case(c) for c in chosen])
        pairs = [(c.prompt, c.target_new) for c in (cases[:args.rows] if n >= args.rows else
                                                    (chosen * args.rows)[:args.rows])]
        edit.apply(loaded.model)
        try:
            fast, a = _score(loaded, pairs, concatenated=False)
            slow, b = _score(loaded, pairs, concatenated=True)
        finally:
            edit.revert(loaded.model)
        diff = max(abs(x - y) for x, y in zip(a, b))
        print(f"{n:>6} {edit.ids.numel():>15} {fast:>9.2f} {slow:>15.2f} {diff:>19.2e}")


if __name__ == "__main__":
    main()
