"""The runner loop, identical for every method.

prepare; evaluate every case before editing (one batched pass); then for each batch:
compute -> apply -> evaluate -> record -> commit (sequential) or revert (independent).
The runner never asks which method it runs: a method that edits many facts in one
update says so with ``batch_native``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


import torch

from kedit.cases import EditCase
from kedit.evaluation import aggregate, evaluate_cases
from kedit.methods.base import Delta, EditRequest, Method, RunContext


@dataclass
class EditResult:
    """What an edit run produced: per-case pre/post metrics, aggregates and the deltas."""

    cases: list[EditCase]
    records: list[dict]                       # per case: case_id, pre, post, time, method info
    metrics: dict                             # {"n", "pre", "post", "stderr": {"pre","post"}, "count"}
    deltas: dict[str, Delta]                  # case_id -> its delta (independent), "batch<N>" -> delta (sequential)
    sequential: bool
    timings: dict[str, float] = field(default_factory=dict)

    def summary_rows(self) -> list[tuple[str, float | None, float | None]]:
        names = list(dict.fromkeys([*self.metrics["pre"], *self.metrics["post"]]))
        return [(n, self.metrics["pre"].get(n), self.metrics["post"].get(n)) for n in names]


def metrics_summary(records: Sequence[dict]) -> dict:
    """metrics.json content: means, standard errors and counts, pre and post."""
    pre = aggregate([r["pre"] for r in records])
    post = aggregate([r["post"] for r in records])
    return {"n": len(records), "pre": pre["mean"], "post": post["mean"],
            "stderr": {"pre": pre["stderr"], "post": post["stderr"]},
            "count": {"pre": pre["count"], "post": post["count"]}}


def batches(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def run_edits(method: Method, cases: Sequence[EditCase], *, sequential: bool = False, batch_size: int | None = None,
              eval_batch_size: int = 32, on_case: Callable[[dict], None] | None = None,
              progress: Callable[[int], None] | None = None) -> EditResult:
    """Edit ``cases`` with ``method`` on its model and measure every case before and after.

    Independent mode (default): each batch is edited from the original weights and the
    weights are restored after it (bit-identical).  Sequential: edits accumulate; the
    post-edit metrics are taken after the last edit, and each case's metrics right after
    its own edit are kept as ``post_immediate``.
    """
    loaded = method.loaded
    model, tok = loaded.model, loaded.tokenizer
    ctx: RunContext = method.ctx
    torch.manual_seed(ctx.seed)
    size = batch_size or (len(cases) if getattr(method, "batch_native", False) else 1)
    t0 = time.perf_counter()
    method.prepare()
    t_prepare = time.perf_counter() - t0

    t0 = time.perf_counter()
    pre, reference = evaluate_cases(model, tok, cases, batch_size=eval_batch_size)
    t_pre = time.perf_counter() - t0

    records: list[dict] = []
    deltas: dict[str, Delta] = {}
    snapshot: dict[str, torch.Tensor] = {}   # sequential: weights before their first edit
    try:
        for batch in batches(len(cases), size):
            chunk = [cases[i] for i in batch]
            before = dict(ctx.timings)
            t0 = time.perf_counter()
            delta = method.compute([EditRequest.from_case(c) for c in chunk])
            t_edit = time.perf_counter() - t0
            phases = {k: v - before.get(k, 0.0) for k, v in ctx.timings.items() if v - before.get(k, 0.0) > 0}
            delta.apply(model)
            if sequential:
                for name, w in delta.originals.items():
                    snapshot.setdefault(name, w)
            t0 = time.perf_counter()
            post, _ = evaluate_cases(model, tok, chunk, reference, batch_size=eval_batch_size)
            t_eval = time.perf_counter() - t0
            info = {c.get("case_id"): c for c in delta.meta.get("cases", [])}
            for i, case, m in zip(batch, chunk, post):
                rec = {"case_id": case.case_id, "pre": pre[i], "post": m,
                       "time": {"edit": t_edit / len(chunk), "eval": t_eval / len(chunk),
                                **{k: v / len(chunk) for k, v in phases.items()}},
                       "method": {k: v for k, v in info.get(case.case_id, {}).items() if k not in ("case_id", "time")},
                       "batch": batch.start // size}
                records.append(rec)
                if on_case:
                    on_case(rec)
                if progress:
                    progress(1)
            if sequential:
                method.commit(delta)
                delta.forget_originals()
                deltas[f"batch{len(deltas)}"] = delta
            else:
                delta.revert(model)
                for case in chunk:
                    deltas[case.case_id] = delta
        if sequential:
            t0 = time.perf_counter()
            final, _ = evaluate_cases(model, tok, cases, reference, batch_size=eval_batch_size)
            for rec, m in zip(records, final):
                rec["post_immediate"], rec["post"] = rec["post"], m
            ctx.add_time("final_eval", time.perf_counter() - t0)
    finally:
        # Sequential: leave the caller's model as it was (copy the original weights back).
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, w in snapshot.items():
                params[name].copy_(w)
    ctx.add_time("prepare_total", t_prepare)
    ctx.add_time("pre_eval", t_pre)
    return EditResult(list(cases), records, metrics_summary(records), deltas, sequential, dict(ctx.timings))
