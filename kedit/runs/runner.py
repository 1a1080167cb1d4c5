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

from kedit.data.cases import EditCase, EditRequest
from kedit.evaluation import aggregate
from kedit.evaluation.suite import Evaluation
from kedit.methods.base import Method, RunContext
from kedit.methods.edit import Edit, SiteState, restore_sites
from kedit.runs.result import EditResult, supersedes

#: site -> (the edit class that reads and writes it, its state): what a sequential run
#: checkpoints, and what it restores at the end.
SiteStates = dict[str, tuple[type[Edit], SiteState]]


def metrics_summary(records: Sequence[dict]) -> dict:
    """metrics.json content: means, standard errors and counts, pre and post.

    Sequential runs score every case after the last edit (``post``, the lifelong-editing
    papers' protocol) and keep each case's scores right after its own edit in the
    records; their aggregate is ``post_immediate`` here."""
    pre = aggregate([r["pre"] for r in records])
    post = aggregate([r["post"] for r in records])
    out = {"n": len(records), "pre": pre["mean"], "post": post["mean"],
           "stderr": {"pre": pre["stderr"], "post": post["stderr"]},
           "count": {"pre": pre["count"], "post": post["count"]}}
    if records and all("post_immediate" in r for r in records):
        imm = aggregate([r["post_immediate"] for r in records])
        out["post_immediate"] = imm["mean"]
        out["stderr"]["post_immediate"] = imm["stderr"]
        out["count"]["post_immediate"] = imm["count"]
    # prompts behind each per-kind metric (n.<name>, summed over cases); the same pre and post
    if "prompts" in post or "prompts" in pre:
        out["prompts"] = post.get("prompts") or pre["prompts"]
    return out


def batches(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


@dataclass
class Resume:
    """Where an interrupted sequential run stopped: the first ``len(records)`` cases are
    edited in ``sites`` (the state of every site edited so far: weights, wrapped modules,
    the context), the method's sequential state is ``method_state`` (see
    :meth:`Method.state`)."""

    records: list[dict]
    sites: SiteStates
    method_state: dict[str, torch.Tensor] = field(default_factory=dict)


def turn_size(method: Method, batch_size: int | None, n_cases: int) -> int:
    """Cases per ``compute`` call: ``batch_size`` when given, else every case in one call for a
    batch-native method (MEMIT and its relatives) and one case for the rest."""
    return batch_size or (n_cases if getattr(method, "batch_native", False) else 1)


def run_edits(method: Method, cases: Sequence[EditCase], *, sequential: bool = False, batch_size: int | None = None,
              eval_batch_size: int = 32, on_case: Callable[[dict], None] | None = None,
              progress: Callable[[int], None] | None = None, checkpoint_every: int | None = None,
              on_checkpoint: Callable[[dict], None] | None = None,
              on_batch: Callable[[list[dict], SiteStates], None] | None = None,
              resume: Resume | None = None,
              extra_metrics: Callable[[Sequence[EditCase]], list[dict]] | None = None,
              evaluation: Evaluation | None = None) -> EditResult:
    """Edit ``cases`` with ``method`` on its model and measure every case before and after.

    Independent mode (default): each batch is edited from the original weights and the
    weights are restored after it (bit-identical).  Sequential: edits accumulate; the
    post-edit metrics are taken after the last edit, and each case's metrics right after
    its own edit are kept as ``post_immediate``.

    Sequential extras: ``checkpoint_every=K`` evaluates every case edited so far after
    each K edits (at batch boundaries) and passes ``{"edits", "n", "post", "stderr"}`` to
    ``on_checkpoint`` -- the lifelong-editing curve; ``on_batch(records, sites)`` is
    called after each batch is committed with the current state of every site edited so
    far (what a resumable run saves); ``resume`` continues from such a state (the pre-edit
    evaluation still runs on the original model).  Every kind of edit goes through the
    same loop: the runner only applies, reverts and captures sites.

    ``extra_metrics(cases) -> [dict per case]`` measures more on the model as it stands
    (e.g. generation fluency); its values join ``pre`` and ``post`` (not the curve).

    ``evaluation`` (default: the teacher-forced metrics alone, batches of
    ``eval_batch_size``) says what is measured per case (teacher-forced and/or
    generation-based scores) and per model state (``ppl``, ``retained_acc``: once before
    editing; after each independent batch; for sequential runs at every checkpoint and
    after the last edit, not after each edit).  With generation-based scores each record
    keeps the answers generated (``answers``); ``time`` splits the evaluation seconds by
    part (``eval_teacher``, ``eval_generate``, ``eval_cost``; ``pre_eval_*`` before).
    """
    ev = evaluation if evaluation is not None else Evaluation(batch_size=eval_batch_size)

    def parts(before: dict[str, float], prefix: str, n: int) -> dict[str, float]:
        return {f"{prefix}_{k}": (v - before.get(k, 0.0)) / n for k, v in ev.seconds.items()
                if v - before.get(k, 0.0) > 0}

    def measure(chunk: Sequence[EditCase], ref):
        got, details, _ = ev.cases(loaded, chunk, ref)
        if extra_metrics is not None:
            for m, e in zip(got, extra_metrics(chunk)):
                m.update(e)
        return got, details

    def with_model(per_case: list[dict]) -> list[dict]:
        whole = ev.model(loaded)
        for m in per_case:
            m.update(whole)
        return per_case

    loaded = method.loaded
    model = loaded.model
    ctx: RunContext = method.ctx
    torch.manual_seed(ctx.seed)
    size = turn_size(method, batch_size, len(cases))
    if resume is not None and not sequential:
        raise ValueError("resume is for sequential runs (independent runs skip finished cases instead)")
    t0 = time.perf_counter()
    method.prepare()
    t_prepare = time.perf_counter() - t0

    t0 = time.perf_counter()
    before_pre = dict(ev.seconds)
    pre, pre_details, reference = ev.cases(loaded, cases)
    if extra_metrics is not None:
        for m, e in zip(pre, extra_metrics(cases)):
            m.update(e)
    with_model(pre)
    t_pre = time.perf_counter() - t0
    pre_parts = parts(before_pre, "pre_eval", len(cases))

    records: list[dict] = []
    edits: dict[str, Edit] = {}
    snapshot: SiteStates = {}   # sequential: each site's state before its first edit
    first = 0
    if resume is not None:
        for site, (cls, state) in resume.sites.items():
            snapshot[site] = (cls, cls.capture(model, site))
            cls.restore(model, site, state)
        method.load_state(resume.method_state)
        records = [dict(r) for r in resume.records]
        first = len(records)
    next_point = checkpoint_every if checkpoint_every else None
    scored_at_end: tuple[list[dict], list[dict]] | None = None
    while next_point is not None and next_point <= first:
        next_point += checkpoint_every
    try:
        for batch in batches(len(cases), size):
            if batch.start < first:
                continue
            chunk = [cases[i] for i in batch]
            before = dict(ctx.timings)
            t0 = time.perf_counter()
            edit = method.compute([EditRequest.from_case(c) for c in chunk])
            t_edit = time.perf_counter() - t0
            phases = {k: v - before.get(k, 0.0) for k, v in ctx.timings.items() if v - before.get(k, 0.0) > 0}
            edit.apply(model)
            if sequential:
                for site, state in edit.originals.items():
                    snapshot.setdefault(site, (type(edit), state))
            t0 = time.perf_counter()
            before_eval = dict(ev.seconds)
            post, post_details = measure(chunk, reference)
            if not sequential:
                with_model(post)
            t_eval = time.perf_counter() - t0
            eval_parts = parts(before_eval, "eval", len(chunk))
            info = {c.get("case_id"): c for c in edit.meta.get("cases", [])}
            batch_records = []
            for i, case, m, d in zip(batch, chunk, post, post_details):
                rec = {"case_id": case.case_id, "pre": pre[i], "post": m,
                       "time": {"edit": t_edit / len(chunk), "eval": t_eval / len(chunk), "pre_eval": t_pre / len(cases),
                                **eval_parts, **pre_parts,
                                **{k: v / len(chunk) for k, v in phases.items()}},
                       "method": {k: v for k, v in info.get(case.case_id, {}).items() if k not in ("case_id", "time")},
                       "batch": batch.start // size}
                if "answers" in d:
                    rec["answers"] = {"pre": pre_details[i]["answers"], "post": d["answers"]}
                records.append(rec)
                batch_records.append(rec)
                if on_case:
                    on_case(rec)
                if progress:
                    progress(1)
            if sequential:
                method.commit(edit)
                edit.forget_originals()
                # a cumulative step holds the whole state: the step before it is not kept (a
                # run of n memory edits would otherwise hold n growing copies of the memory)
                if edits and supersedes(edit, edits[last := next(reversed(edits))]):
                    del edits[last]
                edits[f"batch{batch.start // size}"] = edit
                if next_point is not None and (batch.stop >= next_point or batch.stop == len(cases)):
                    t0 = time.perf_counter()
                    now, now_details, _ = ev.cases(loaded, cases[: batch.stop], reference)
                    with_model(now)
                    if batch.stop == len(cases):          # the same model the final scores are of
                        scored_at_end = (now, now_details)
                    point = metrics_summary([{"pre": pre[i], "post": m} for i, m in enumerate(now)])
                    if on_checkpoint:
                        on_checkpoint({"edits": batch.stop, "n": batch.stop, "post": point["post"],
                                       "stderr": point["stderr"]["post"]})
                    ctx.add_time("checkpoint_eval", time.perf_counter() - t0)
                    while next_point <= batch.stop:
                        next_point += checkpoint_every
                if on_batch:
                    on_batch(batch_records, {site: (cls, cls.capture(model, site)) for site, (cls, _) in snapshot.items()})
            else:
                edit.revert(model)
                for case in chunk:
                    edits[case.case_id] = edit
        if sequential:
            t0 = time.perf_counter()
            if scored_at_end is not None:             # a checkpoint after the last edit: reuse it
                final, final_details = scored_at_end
                if extra_metrics is not None:
                    for m, e in zip(final, extra_metrics(cases)):
                        m.update(e)
            else:
                final, final_details = measure(cases, reference)
                with_model(final)
            for rec, m, d in zip(records, final, final_details):
                rec["post_immediate"], rec["post"] = rec["post"], m
                if "answers" in rec and "answers" in d:
                    rec["answers"]["post_immediate"], rec["answers"]["post"] = rec["answers"]["post"], d["answers"]
            ctx.add_time("final_eval", time.perf_counter() - t0)
    finally:
        # Sequential: leave the caller's model as it was (every site back to its first state).
        restore_sites(model, snapshot)
    ctx.add_time("prepare_total", t_prepare)
    ctx.add_time("pre_eval", t_pre)
    return EditResult(list(cases), records, metrics_summary(records), edits, sequential, dict(ctx.timings))
