"""Edit-quality metrics: EasyEdit token accuracies and ROME/CounterFact probability scores.

Two teacher-forced families whose names never mix (the registry :data:`METRICS` also
names the generation-based ``gen_*`` scores of :mod:`kedit.evaluation.wild`, family
``wild``, and what editing costs the model, ``ppl`` and ``retained_acc`` of
:mod:`kedit.evaluation.cost`, family ``cost``; their definitions are written there):

* ``easyedit`` (Wang et al. 2023, EasyEdit / Yao et al. 2023 "Editing Large Language
  Models"): teacher-forced *token accuracies* -- ``rewrite_acc``, ``rephrase_acc``,
  ``locality_acc``, ``portability_acc``.
* ``counterfact`` (Meng et al. 2022, ROME, CounterFact): comparisons of the
  probabilities of the new and the true object -- ``efficacy_*``, ``paraphrase_*``,
  ``neighborhood_*`` and the aggregate ``score``.

Per-prompt quantities come from a :class:`~kedit.evaluation.scoring.TargetScore`:
:func:`token_accuracy`, :func:`mean_nll` and :func:`prob` (``exp(-mean_nll)``, the
per-token geometric-mean probability that ROME compares).

A metric is left out of a case's dict when the case's data does not provide it
(no rephrase prompts -> no ``rephrase_acc`` / ``paraphrase_*``; no ``ground_truth`` ->
no ``efficacy_*`` / ``paraphrase_*``; no locality -> no ``locality_acc`` /
``neighborhood_*``; no portability -> no ``portability_acc``).

Kinds (KnowEdit, Zhang et al. 2024, "A Comprehensive Study of Knowledge Editing for
Large Language Models", and EasyEdit's ``examples/run_knowedit_llama2.py``): a case's
locality and portability prompts come in named sets -- KnowEdit's *kinds*
(Reasoning, Subject_Aliasing, Logical_Generalization; Relation_Specificity,
Forgetfulness), EasyEdit's portability sets (one_hop, subject_replace,
inverse_relation), or any name a cases file gives.  The published definitions:

* Edit Succ.   = mean over cases of ``rewrite_acc``;
* Portability  = mean over the cases that have portability prompts of
  (mean over the case's kinds of (mean over the kind's prompts of the token accuracy
  of the kind's answer));
* Locality     = the same with locality kinds and, per prompt, the share of the answer's
  positions whose argmax is the pre-edit model's;
* Fluency      = mean over cases of ROME's n-gram entropy of a generation from the edit
  prompt (×100 in KnowEdit's table; see :mod:`kedit.evaluation.fluency`).

kedit computes exactly these per case: ``portability_acc`` and ``locality_acc`` are the
means over the case's kinds, and every kind also gets its own value,
``portability_acc.<kind>`` / ``locality_acc.<kind>`` (mean over the kind's prompts),
with ``n.<that name>`` = the number of prompts behind it (a count, which
:func:`aggregate` sums instead of averaging).  A prompt whose answer has aliases (a
list of accepted answers) counts as right with its best alias (the maximum token
accuracy over them); EasyEdit keeps only the first alias, which gives the same value
whenever a prompt has one answer (all shipped KnowEdit and portability files).  Locality
compares argmaxes teacher-forced on the first alias, as EasyEdit does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import torch

from kedit.evaluation.scoring import TargetScore, score_targets

if TYPE_CHECKING:  # pragma: no cover
    from kedit.data.cases import EditCase

__all__ = [
    "COUNT_PREFIX",
    "METRICS",
    "PER_KIND",
    "LocalityReference",
    "MetricInfo",
    "aggregate",
    "evaluate_cases",
    "harmonic_mean",
    "mean_nll",
    "metric_order",
    "prob",
    "token_accuracy",
]


class MetricInfo(NamedTuple):
    family: str  # "easyedit" | "counterfact"
    higher_is_better: bool
    description: str


#: name -> (family, higher_is_better, one-line description); order is report order.
METRICS: dict[str, MetricInfo] = {
    "rewrite_acc": MetricInfo(
        "easyedit", True, "token accuracy of target_new on the edit prompt (teacher forced)"
    ),
    "rephrase_acc": MetricInfo(
        "easyedit", True, "token accuracy of target_new on the rephrased prompts"
    ),
    "locality_acc": MetricInfo(
        "easyedit", True, "share of locality answer tokens whose argmax is unchanged by the edit (mean over kinds)"
    ),
    "portability_acc": MetricInfo(
        "easyedit", True, "token accuracy of the portability answers on their prompts (mean over kinds)"
    ),
    "efficacy_success": MetricInfo(
        "counterfact", True, "[P(new) > P(true)] on the edit prompt"
    ),
    "efficacy_magnitude": MetricInfo(
        "counterfact", True, "P(new) - P(true) on the edit prompt"
    ),
    "paraphrase_success": MetricInfo(
        "counterfact", True, "mean of [P(new) > P(true)] over paraphrase prompts"
    ),
    "paraphrase_magnitude": MetricInfo(
        "counterfact", True, "mean of P(new) - P(true) over paraphrase prompts"
    ),
    "neighborhood_success": MetricInfo(
        "counterfact", True, "mean of [P(true) > P(new)] over neighborhood prompts"
    ),
    "neighborhood_magnitude": MetricInfo(
        "counterfact", True, "mean of P(true) - P(new) over neighborhood prompts"
    ),
    "specificity_acc": MetricInfo(
        "easyedit", True, "token accuracy of the locality answers on their prompts (zsRE specificity, MEND/MEMIT)"
    ),
    "fluency": MetricInfo(
        "counterfact", True, "weighted bi-/tri-gram entropy of sampled generations (kedit.evaluation.fluency)"
    ),
    "consistency": MetricInfo(
        "counterfact", True, "TF-IDF cosine of generations vs reference texts on target_new (needs --reference)"
    ),
    "score": MetricInfo(
        "counterfact",
        True,
        "harmonic mean of efficacy, paraphrase and neighborhood success (aggregate only)",
    ),
    # generation-based (WILD, Yang et al. 2025; kedit.evaluation.wild): greedy answer from the
    # prompt alone, <= 50 tokens, cut at ".", a newline or end of text
    "gen_rewrite_acc": MetricInfo(
        "wild", True, "the generated answer to the edit prompt contains target_new (normalised words)"
    ),
    "gen_rewrite_em": MetricInfo(
        "wild", True, "the generated answer to the edit prompt is target_new (normalised exact match)"
    ),
    "gen_rewrite_judge": MetricInfo("wild", True, "a local judge model says the edit prompt's answer is target_new"),
    "gen_rephrase_acc": MetricInfo("wild", True, "as gen_rewrite_acc, mean over the rephrased prompts"),
    "gen_rephrase_em": MetricInfo("wild", True, "as gen_rewrite_em, mean over the rephrased prompts"),
    "gen_rephrase_judge": MetricInfo("wild", True, "as gen_rewrite_judge, mean over the rephrased prompts"),
    "gen_portability_acc": MetricInfo(
        "wild", True, "generated answers containing a portability answer (any alias; mean over kinds)"
    ),
    "gen_portability_em": MetricInfo("wild", True, "generated answers equal to a portability answer (mean over kinds)"),
    "gen_portability_judge": MetricInfo("wild", True, "judge says the portability answer is right (mean over kinds)"),
    "gen_locality_acc": MetricInfo(
        "wild", True, "share of locality prompts whose generated answer is the pre-edit one (mean over kinds)"
    ),
    "gen_judge_parsed": MetricInfo("wild", True, "share of the judge's replies that said yes or no"),
    # what editing costs the model (kedit.evaluation.cost): the whole model, not the case
    "ppl": MetricInfo("cost", False, "perplexity on the first 20,000 tokens of the shipped WikiText-2 test split"),
    "retained_acc": MetricInfo(
        "cost", True, "share of 200 shipped facts the unedited model knew that the model still gets right"
    ),
}

_SUCCESS_NAMES = ("efficacy_success", "paraphrase_success", "neighborhood_success")

#: Metrics that also get one value per kind (prompt-set name): ``<metric>.<kind>``.
PER_KIND = ("locality_acc", "portability_acc", "gen_locality_acc", "gen_portability_acc")
#: Prefix of the per-case prompt counts behind a per-kind value (``n.portability_acc.Reasoning``).
COUNT_PREFIX = "n."


def metric_order(names) -> list[str]:
    """Registry order, each per-kind value (and its prompt count) right after its metric
    (kinds in the order given), then anything else in the order given."""
    names = list(dict.fromkeys(names))
    out: list[str] = []
    for k in METRICS:
        if k in names:
            out.append(k)
        for kind in (n for n in names if n.startswith(k + ".")):
            out += [kind] + [c for c in (COUNT_PREFIX + kind,) if c in names]
    return out + [n for n in names if n not in out]


# --------------------------------------------------------------------------- per prompt


def token_accuracy(score: TargetScore) -> float:
    """EasyEdit's teacher-forced token accuracy: the mean over the target's tokens of
    ``[argmax prediction == target token]``, each predicted from the prompt and the
    *true* preceding target tokens."""
    return float((score.argmax_ids == score.target_ids).double().mean())


def mean_nll(score: TargetScore) -> float:
    """Mean negative log-likelihood per target token, ``-mean_t log P(y_t | x, y_<t)``
    (ROME's comparison quantity)."""
    return float(-score.logprobs.double().mean())


def prob(score: TargetScore) -> float:
    """``exp(-mean_nll)``: the per-token geometric-mean probability of the target,
    which ROME's CounterFact metrics call P(target)."""
    return math.exp(-mean_nll(score))


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean; 0.0 if any value is <= 0."""
    if not values:
        raise ValueError("harmonic mean of nothing")
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


# --------------------------------------------------------------------------- locality reference

RefKey = tuple[str, str, int]  # (case_id, locality set name, prompt index)


@dataclass
class LocalityReference:
    """Pre-edit argmax token ids at each locality prompt's answer positions, keyed by
    ``(case_id, locality set name, prompt index)``."""

    argmax: dict[RefKey, tuple[int, ...]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.argmax)

    def __contains__(self, key: object) -> bool:
        return key in self.argmax

    def __getitem__(self, key: RefKey) -> tuple[int, ...]:
        return self.argmax[key]

    def to_records(self) -> list[dict[str, Any]]:
        """JSON-serialisable form (see :meth:`from_records`)."""
        return [
            {"case_id": c, "set": s, "index": i, "argmax": list(ids)}
            for (c, s, i), ids in self.argmax.items()
        ]

    @classmethod
    def from_records(cls, records: Sequence[dict[str, Any]]) -> "LocalityReference":
        return cls(
            {
                (str(r["case_id"]), str(r["set"]), int(r["index"])): tuple(int(t) for t in r["argmax"])
                for r in records
            }
        )


# --------------------------------------------------------------------------- evaluation


class _Pairs:
    """Deduplicated list of (prompt, target) pairs to score in one call."""

    def __init__(self) -> None:
        self.pairs: list[tuple[str, str]] = []
        self._index: dict[tuple[str, str], int] = {}

    def add(self, prompt: str, target: str) -> int:
        key = (prompt, target)
        if key not in self._index:
            self._index[key] = len(self.pairs)
            self.pairs.append(key)
        return self._index[key]


@dataclass
class _Plan:
    rewrite_new: int
    rewrite_true: int | None
    rephrase: list[tuple[int, int | None]]  # (new, true)
    # (key, first answer, every answer, new or None if skipped)
    locality: list[tuple[RefKey, int, list[int], int | None]]
    portability: list[tuple[str, list[int]]]  # (kind, every answer)


def _same_answer(a: str, b: str) -> bool:
    return a.strip() == b.strip()


def evaluate_cases(
    model: Any,
    tokenizer: Any,
    cases: Sequence["EditCase"],
    reference: LocalityReference | None = None,
    batch_size: int = 32,
) -> tuple[list[dict[str, float]], LocalityReference]:
    """Per-case metric dicts (in case order) and this model's :class:`LocalityReference`.

    All (prompt, target) pairs of all cases are scored with a single
    :func:`~kedit.evaluation.scoring.score_targets` call, so cases share padded
    batches.

    Definitions (P = :func:`prob`, acc = :func:`token_accuracy`):

    * ``rewrite_acc`` = acc(target_new | edit prompt).
    * ``rephrase_acc`` = mean over rephrase prompts of acc(target_new | prompt).
    * ``locality_acc.<kind>`` = mean over the kind's prompts of the share of the
      answer's positions (teacher forced on the first accepted answer) where the argmax
      now equals the argmax in ``reference`` (the pre-edit model's). Without a
      reference this *is* the pre-edit call and the value is 1.0 by definition.
      ``locality_acc`` = mean over the case's kinds (KnowEdit's Locality).
    * ``specificity_acc`` = mean over all locality prompts of acc(locality answer | prompt)
      (best accepted answer): the MEND / MEMIT zsRE "specificity" (accuracy on the
      unrelated NQ question's own answer, not agreement with the pre-edit model -- that
      is ``locality_acc``).
    * ``portability_acc.<kind>`` = mean over the kind's prompts of
      max over accepted answers of acc(answer | prompt); ``portability_acc`` = mean over
      the case's kinds (KnowEdit's Portability).
    * ``n.<metric>.<kind>``: the number of prompts behind each per-kind value.
    * ``efficacy_success`` = [P(new) > P(true)] on the edit prompt, i.e.
      mean_nll(new) < mean_nll(true); ``efficacy_magnitude`` = P(new) - P(true).
    * ``paraphrase_success`` / ``paraphrase_magnitude``: the same, averaged over the
      rephrase prompts.
    * ``neighborhood_success`` = mean over locality prompts of [P(gt) > P(new)],
      gt being the locality prompt's ground truth (for CounterFact: the edited fact's
      true object); ``neighborhood_magnitude`` = mean of P(gt) - P(new). Locality
      items whose ground truth equals target_new (after stripping) are skipped.

    The returned reference always holds *this* model's argmaxes (whether or not a
    ``reference`` was passed): the reference of a pre-edit call is the one to pass to
    post-edit calls.
    """
    seen: set[str] = set()
    for case in cases:
        if case.case_id in seen:
            raise ValueError(f"duplicate case_id {case.case_id!r} in evaluate_cases")
        seen.add(case.case_id)

    pairs = _Pairs()
    plans: list[_Plan] = []
    for case in cases:
        new, gt = case.target_new, case.ground_truth
        prompt = case.prompt
        locality: list[tuple[RefKey, int, list[int], int | None]] = []
        keys: set[RefKey] = set()
        for ps in case.locality:
            for j, (p, loc_gt, accepted) in enumerate(zip(ps.prompts, ps.ground_truths, ps.answers)):
                key = (case.case_id, ps.name, j)
                if key in keys:
                    raise ValueError(f"case {case.case_id!r}: duplicate locality set name {ps.name!r}")
                keys.add(key)
                new_idx = None if _same_answer(loc_gt, new) else pairs.add(p, new)
                locality.append((key, pairs.add(p, loc_gt), [pairs.add(p, a) for a in accepted], new_idx))
        kinds = [ps.name for ps in case.portability]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"case {case.case_id!r}: duplicate portability set name")
        plans.append(
            _Plan(
                rewrite_new=pairs.add(prompt, new),
                rewrite_true=pairs.add(prompt, gt) if gt is not None else None,
                rephrase=[
                    (pairs.add(p, new), pairs.add(p, gt) if gt is not None else None)
                    for p in case.rephrase_prompts
                ],
                locality=locality,
                portability=[
                    (ps.name, [pairs.add(p, a) for a in accepted])
                    for ps in case.portability
                    for p, accepted in zip(ps.prompts, ps.answers)
                ],
            )
        )

    scores = score_targets(model, tokenizer, pairs.pairs, batch_size=batch_size)
    new_reference = LocalityReference()
    results: list[dict[str, float]] = []
    for case, plan in zip(cases, plans):
        m: dict[str, float] = {}
        m["rewrite_acc"] = token_accuracy(scores[plan.rewrite_new])
        if plan.rephrase:
            m["rephrase_acc"] = _mean([token_accuracy(scores[n]) for n, _ in plan.rephrase])
        if plan.locality:
            accs: dict[str, list[float]] = {}
            for key, gt_idx, _, _ in plan.locality:
                post = scores[gt_idx].argmax_ids
                new_reference.argmax[key] = tuple(int(t) for t in post.tolist())
                if reference is None:
                    accs.setdefault(key[1], []).append(1.0)
                    continue
                if key not in reference:
                    raise KeyError(f"locality reference has no entry for {key!r}")
                pre = torch.tensor(reference[key], dtype=torch.long)
                if pre.shape != post.shape:
                    raise ValueError(
                        f"locality reference for {key!r} has {pre.numel()} tokens, "
                        f"now {post.numel()} (different tokenizer?)"
                    )
                accs.setdefault(key[1], []).append(float((pre == post).double().mean()))
            _per_kind(m, "locality_acc", accs)
            m["specificity_acc"] = _mean([_best(scores, every) for _, _, every, _ in plan.locality])
        if plan.portability:
            port: dict[str, list[float]] = {}
            for kind, every in plan.portability:
                port.setdefault(kind, []).append(_best(scores, every))
            _per_kind(m, "portability_acc", port)
        if plan.rewrite_true is not None:
            s_new, s_true = scores[plan.rewrite_new], scores[plan.rewrite_true]
            m["efficacy_success"] = float(mean_nll(s_new) < mean_nll(s_true))
            m["efficacy_magnitude"] = prob(s_new) - prob(s_true)
        if plan.rephrase and plan.rewrite_true is not None:
            succ, mag = [], []
            for n, t in plan.rephrase:
                assert t is not None
                succ.append(float(mean_nll(scores[n]) < mean_nll(scores[t])))
                mag.append(prob(scores[n]) - prob(scores[t]))
            m["paraphrase_success"] = _mean(succ)
            m["paraphrase_magnitude"] = _mean(mag)
        neigh = [(g, n) for _, g, _, n in plan.locality if n is not None]
        if neigh:
            m["neighborhood_success"] = _mean(
                [float(mean_nll(scores[g]) < mean_nll(scores[n])) for g, n in neigh]
            )
            m["neighborhood_magnitude"] = _mean([prob(scores[g]) - prob(scores[n]) for g, n in neigh])
        results.append({k: m[k] for k in metric_order(m)})
    return results, new_reference


def _best(scores: Sequence[TargetScore], every: Sequence[int]) -> float:
    """Token accuracy of the best accepted answer."""
    return max(token_accuracy(scores[i]) for i in every)


def _per_kind(m: dict[str, float], name: str, values: dict[str, list[float]]) -> None:
    """``name`` = mean over kinds of the kind's mean; ``name.<kind>`` and its prompt count."""
    means = {kind: _mean(v) for kind, v in values.items()}
    m[name] = _mean(list(means.values()))
    for kind, v in values.items():
        m[f"{name}.{kind}"] = means[kind]
        m[f"{COUNT_PREFIX}{name}.{kind}"] = len(v)


# --------------------------------------------------------------------------- aggregation


def aggregate(per_case: Sequence[dict[str, float]]) -> dict[str, Any]:
    """``{"n": N, "mean": {...}, "stderr": {...}, "count": {...}}`` over cases.

    Each name is averaged over the cases that have it (``count``); ``stderr`` is the
    sample standard deviation (ddof=1) over ``sqrt(count)``, 0.0 for a single case.
    Per-kind values are averaged over the cases that have the kind (KnowEdit averages
    over the cases that have any portability).  Prompt counts (``n.<name>``) are not
    metrics: they are summed into ``"prompts"`` (present only when there are some).
    ``mean["score"]`` is the harmonic mean of the aggregate means of
    ``efficacy_success``, ``paraphrase_success`` and ``neighborhood_success`` (ROME's
    CounterFact score; 0 if any is 0), present only when all three are.
    """
    values: dict[str, list[float]] = {}
    prompts: dict[str, int] = {}
    for m in per_case:
        for k, v in m.items():
            if k.startswith(COUNT_PREFIX):
                prompts[k.removeprefix(COUNT_PREFIX)] = prompts.get(k.removeprefix(COUNT_PREFIX), 0) + int(v)
                continue
            values.setdefault(k, []).append(float(v))
    names = metric_order([k for k in METRICS if k in values] + sorted(k for k in values if k not in METRICS))
    mean: dict[str, float] = {}
    stderr: dict[str, float] = {}
    count: dict[str, int] = {}
    for k in names:
        vs = values[k]
        n = len(vs)
        mu = _mean(vs)
        mean[k] = mu
        count[k] = n
        if n > 1:
            var = sum((v - mu) ** 2 for v in vs) / (n - 1)
            stderr[k] = float(math.sqrt(var) / math.sqrt(n))
        else:
            stderr[k] = 0.0
    if all(k in mean for k in _SUCCESS_NAMES):
        mean["score"] = float(harmonic_mean([mean[k] for k in _SUCCESS_NAMES]))
    out = {"n": len(per_case), "mean": mean, "stderr": stderr, "count": count}
    if prompts:
        out["prompts"] = prompts
    return out
