"""The runner loop, identical for every method.

prepare; evaluate every case before editing (one batched pass); then for each batch:
compute -> apply -> evaluate -> record -> commit (sequential) or revert (independent).
The runner never asks which method it runs: a method that edits many facts in one
update says so with ``batch_native``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


import torch

from kedit.data.cases import EditCase
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
    # Bound by kedit.edit / kedit.load_run so that apply()/revert()/applied() need no argument.
    model: Any = field(default=None, repr=False, compare=False)   # LoadedModel (or a torch module)
    base_fingerprint: str = ""                                     # the model the deltas were made on
    run_dir: Any = None                                            # set when read back from a run directory
    _applied: list = field(default_factory=list, repr=False, compare=False)

    def summary_rows(self) -> list[tuple[str, float | None, float | None]]:
        names = list(dict.fromkeys([*self.metrics["pre"], *self.metrics["post"]]))
        return [(n, self.metrics["pre"].get(n), self.metrics["post"].get(n)) for n in names]

    # --- the edit as a patch (see kedit.runs.export for which deltas a choice means) ---------------
    def select(self, case: str | None = None, all: bool = False) -> list[Delta]:
        """The deltas that make the edited model, in order: the only one, every step of a
        sequential run, ``case``'s, or with ``all=True`` every independent edit (their sum is
        a model no run evaluated)."""
        from kedit.runs.export import select_deltas

        return select_deltas(self.deltas, self.sequential, case, all)

    @property
    def delta(self) -> Delta:
        """All of the run's weight change as one :class:`Delta` (a sequential run's steps or
        every independent edit, added up) -- for saving or inspecting; :meth:`apply` applies
        the steps one by one, exactly as they were evaluated."""
        out = Delta()
        for d in self.select(all=not self.sequential):
            out = out + d
        return out

    def _module(self, model: Any = None) -> torch.nn.Module:
        target = model if model is not None else self.model
        if target is None:
            raise ValueError("no model: pass one (result.apply(model)) or get the result from kedit.edit")
        return target if isinstance(target, torch.nn.Module) else target.model

    def apply(self, model: Any = None, *, case: str | None = None, all: bool = False,
              force: bool = False) -> EditResult:
        """Put the edit into the model's weights (in place) until :meth:`revert`.  A
        LoadedModel whose fingerprint is not :attr:`base_fingerprint` is refused unless ``force``."""
        from kedit.runs.export import apply_deltas, check_fingerprint

        if self._applied:
            raise RuntimeError("the edit is already applied; revert() first")
        if model is not None and hasattr(model, "fingerprint"):
            check_fingerprint(self.base_fingerprint, model, force=force, what="this edit")
        module = self._module(model)
        self._applied = [module, apply_deltas(module, self.select(case, all))]
        return self

    def revert(self) -> None:
        """Restore the weights :meth:`apply` changed, bit-identically."""
        from kedit.runs.export import revert_deltas

        if not self._applied:
            raise RuntimeError("the edit is not applied")
        (module, done), self._applied = self._applied, []
        revert_deltas(module, done)

    @contextmanager
    def applied(self, model: Any = None, *, case: str | None = None, all: bool = False,
                force: bool = False) -> Iterator[Any]:
        """``with result.applied(): ...`` -- the edited model inside the block, the original
        weights (bit-identical) after it, also on an exception."""
        self.apply(model, case=case, all=all, force=force)
        try:
            yield self.model if model is None else model
        finally:
            self.revert()

    def export(self, out_dir: Any, model: Any = None, *, case: str | None = None, all: bool = False) -> Any:
        """Write the edited model as a Hugging Face directory (see :func:`kedit.runs.export.export_model`)."""
        from kedit.runs.export import export_model

        loaded = model if model is not None else self.model
        if loaded is None or not hasattr(loaded, "tokenizer"):
            raise ValueError("export needs the LoadedModel (kedit.load_model) the edit was made on")
        return export_model(loaded, self.select(case, all), out_dir,
                            {"run": str(self.run_dir) if self.run_dir else None, "case": case, "all": all})


def metrics_summary(records: Sequence[dict]) -> dict:
    """metrics.json content: means, standard errors and counts, pre and post."""
    pre = aggregate([r["pre"] for r in records])
    post = aggregate([r["post"] for r in records])
    return {"n": len(records), "pre": pre["mean"], "post": post["mean"],
            "stderr": {"pre": pre["stderr"], "post": post["stderr"]},
            "count": {"pre": pre["count"], "post": post["count"]}}


def batches(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


@dataclass
class Resume:
    """Where an interrupted sequential run stopped: the first ``len(records)`` cases are
    edited in ``weights`` (the current values of every parameter edited so far), the
    method's sequential state is ``method_state`` (see :meth:`Method.state`)."""

    records: list[dict]
    weights: dict[str, torch.Tensor]
    method_state: dict[str, torch.Tensor] = field(default_factory=dict)


def run_edits(method: Method, cases: Sequence[EditCase], *, sequential: bool = False, batch_size: int | None = None,
              eval_batch_size: int = 32, on_case: Callable[[dict], None] | None = None,
              progress: Callable[[int], None] | None = None, checkpoint_every: int | None = None,
              on_checkpoint: Callable[[dict], None] | None = None,
              on_batch: Callable[[list[dict], dict[str, torch.Tensor]], None] | None = None,
              resume: Resume | None = None,
              extra_metrics: Callable[[Sequence[EditCase]], list[dict]] | None = None) -> EditResult:
    """Edit ``cases`` with ``method`` on its model and measure every case before and after.

    Independent mode (default): each batch is edited from the original weights and the
    weights are restored after it (bit-identical).  Sequential: edits accumulate; the
    post-edit metrics are taken after the last edit, and each case's metrics right after
    its own edit are kept as ``post_immediate``.

    Sequential extras: ``checkpoint_every=K`` evaluates every case edited so far after
    each K edits (at batch boundaries) and passes ``{"edits", "n", "post", "stderr"}`` to
    ``on_checkpoint`` -- the lifelong-editing curve; ``on_batch(records, weights)`` is
    called after each batch is committed with the current values of every edited
    parameter (what a resumable run saves); ``resume`` continues from such a state (the
    pre-edit evaluation still runs on the original weights).

    ``extra_metrics(cases) -> [dict per case]`` measures more on the model as it stands
    (e.g. generation fluency); its values join ``pre`` and ``post`` (not the curve).
    """

    def measure(chunk: Sequence[EditCase], ref):
        got, _ = evaluate_cases(model, tok, chunk, ref, batch_size=eval_batch_size)
        if extra_metrics is not None:
            for m, e in zip(got, extra_metrics(chunk)):
                m.update(e)
        return got

    loaded = method.loaded
    model, tok = loaded.model, loaded.tokenizer
    ctx: RunContext = method.ctx
    torch.manual_seed(ctx.seed)
    size = batch_size or (len(cases) if getattr(method, "batch_native", False) else 1)
    if resume is not None and not sequential:
        raise ValueError("resume is for sequential runs (independent runs skip finished cases instead)")
    t0 = time.perf_counter()
    method.prepare()
    t_prepare = time.perf_counter() - t0

    t0 = time.perf_counter()
    pre, reference = evaluate_cases(model, tok, cases, batch_size=eval_batch_size)
    if extra_metrics is not None:
        for m, e in zip(pre, extra_metrics(cases)):
            m.update(e)
    t_pre = time.perf_counter() - t0

    records: list[dict] = []
    deltas: dict[str, Delta] = {}
    snapshot: dict[str, torch.Tensor] = {}   # sequential: weights before their first edit
    params = dict(model.named_parameters())
    first = 0
    if resume is not None:
        with torch.no_grad():
            for name, w in resume.weights.items():
                snapshot[name] = params[name].detach().clone()
                params[name].copy_(w)
        method.load_state(resume.method_state)
        records = [dict(r) for r in resume.records]
        first = len(records)
    next_point = checkpoint_every if checkpoint_every else None
    while next_point is not None and next_point <= first:
        next_point += checkpoint_every
    try:
        for batch in batches(len(cases), size):
            if batch.start < first:
                continue
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
            post = measure(chunk, reference)
            t_eval = time.perf_counter() - t0
            info = {c.get("case_id"): c for c in delta.meta.get("cases", [])}
            batch_records = []
            for i, case, m in zip(batch, chunk, post):
                rec = {"case_id": case.case_id, "pre": pre[i], "post": m,
                       "time": {"edit": t_edit / len(chunk), "eval": t_eval / len(chunk), "pre_eval": t_pre / len(cases),
                                **{k: v / len(chunk) for k, v in phases.items()}},
                       "method": {k: v for k, v in info.get(case.case_id, {}).items() if k not in ("case_id", "time")},
                       "batch": batch.start // size}
                records.append(rec)
                batch_records.append(rec)
                if on_case:
                    on_case(rec)
                if progress:
                    progress(1)
            if sequential:
                method.commit(delta)
                delta.forget_originals()
                deltas[f"batch{batch.start // size}"] = delta
                if next_point is not None and (batch.stop >= next_point or batch.stop == len(cases)):
                    t0 = time.perf_counter()
                    now, _ = evaluate_cases(model, tok, cases[: batch.stop], reference, batch_size=eval_batch_size)
                    point = metrics_summary([{"pre": pre[i], "post": m} for i, m in enumerate(now)])
                    if on_checkpoint:
                        on_checkpoint({"edits": batch.stop, "n": batch.stop, "post": point["post"],
                                       "stderr": point["stderr"]["post"]})
                    ctx.add_time("checkpoint_eval", time.perf_counter() - t0)
                    while next_point <= batch.stop:
                        next_point += checkpoint_every
                if on_batch:
                    on_batch(batch_records, {name: params[name].detach() for name in snapshot})
            else:
                delta.revert(model)
                for case in chunk:
                    deltas[case.case_id] = delta
        if sequential:
            t0 = time.perf_counter()
            final = measure(cases, reference)
            for rec, m in zip(records, final):
                rec["post_immediate"], rec["post"] = rec["post"], m
            ctx.add_time("final_eval", time.perf_counter() - t0)
    finally:
        # Sequential: leave the caller's model as it was (copy the original weights back).
        with torch.no_grad():
            for name, w in snapshot.items():
                params[name].copy_(w)
    ctx.add_time("prepare_total", t_prepare)
    ctx.add_time("pre_eval", t_pre)
    return EditResult(list(cases), records, metrics_summary(records), deltas, sequential, dict(ctx.timings))
