"""Which evaluations a run makes, as one object the runner calls (``--eval``, ``--cost``, ``--judge``).

* ``teacher`` -- the teacher-forced metrics of :mod:`kedit.evaluation.metrics` (EasyEdit's
  token accuracies, ROME's probability comparisons): today's default;
* ``generate`` -- the generation-based ``gen_*`` scores of :mod:`kedit.evaluation.wild`
  (and ``gen_*_judge`` with a judge);
* ``cost`` -- ``ppl`` and ``retained_acc`` of :mod:`kedit.evaluation.cost`: properties of
  the whole model, measured once per model state (not per case) and copied into every
  case the state stands for.

``--eval teacher`` (default) = teacher; ``--eval generate`` = generate; ``--eval all`` =
teacher + generate; ``--cost`` adds cost to any of them (it is the expensive part: a
perplexity of 20,000 tokens is two minutes of one CPU thread for SmolLM2-135M).

The object also adds up the seconds each part took (:attr:`Evaluation.seconds`), so a run
can say what the generation-based scores cost against the teacher-forced ones.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from kedit.evaluation.cost import CostSettings
from kedit.evaluation.metrics import LocalityReference, evaluate_cases, metric_order
from kedit.evaluation.wild import Judge, WildSettings, wild_metrics

__all__ = ["EVAL_MODES", "Evaluation", "Reference"]

EVAL_MODES = ("teacher", "generate", "all")


@dataclass
class Reference:
    """The pre-edit model's answers that locality is compared with."""

    teacher: LocalityReference | None = None
    generate: dict | None = None


@dataclass
class Evaluation:
    teacher: bool = True
    generate: WildSettings | None = None
    judge: Judge | None = None
    cost: CostSettings | None = None
    batch_size: int = 32
    seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_options(cls, mode: str = "teacher", *, cost: bool = False, chat_template: bool = False,
                     ppl_tokens: int = 20_000, judge: Any = None, batch_size: int = 32) -> "Evaluation":
        """The evaluation that ``--eval MODE [--cost] [--chat-template] [--ppl-tokens N]
        [--judge DIR]`` asks for (``judge``: the loaded judge model, or None)."""
        if mode not in EVAL_MODES:
            raise ValueError(f"--eval {mode}: choose one of {' | '.join(EVAL_MODES)}")
        gen = mode in ("generate", "all")
        return cls(teacher=mode in ("teacher", "all"),
                   generate=WildSettings(chat_template=chat_template) if gen else None,
                   judge=Judge(judge) if (gen and judge is not None) else None,
                   cost=CostSettings(ppl_tokens=ppl_tokens) if cost else None,
                   batch_size=batch_size)

    def _add(self, part: str, t0: float) -> None:
        self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - t0

    def cases(self, loaded: Any, cases: Sequence[Any], reference: Reference | None = None
              ) -> tuple[list[dict[str, float]], list[dict], Reference]:
        """Per-case metrics, per-case details (the generated answers), and this model's
        reference (pass a pre-edit call's to the post-edit calls)."""
        out: list[dict[str, float]] = [{} for _ in cases]
        details: list[dict] = [{} for _ in cases]
        ref = Reference()
        if self.teacher:
            t0 = time.perf_counter()
            got, ref.teacher = evaluate_cases(loaded.model, loaded.tokenizer, cases,
                                              reference.teacher if reference else None, batch_size=self.batch_size)
            for m, g in zip(out, got):
                m.update(g)
            self._add("teacher", t0)
        if self.generate is not None:
            t0 = time.perf_counter()
            got, texts, ref.generate = wild_metrics(loaded, cases, self.generate,
                                                    reference.generate if reference else None, self.judge)
            for m, g, d, t in zip(out, got, details, texts):
                m.update(g)
                d["answers"] = t
            self._add("generate", t0)
        return [{k: m[k] for k in metric_order(m)} for m in out], details, ref

    def model(self, loaded: Any) -> dict[str, float]:
        """``ppl`` and ``retained_acc`` of the model as it stands ({} without cost)."""
        if self.cost is None:
            return {}
        t0 = time.perf_counter()
        got = self.cost.measure(loaded)
        self._add("cost", t0)
        return got

    def describe(self) -> dict:
        """What a run's config records (and ``bench --resume`` reads back)."""
        return {"teacher": self.teacher, "generate": self.generate is not None,
                "chat_template": bool(self.generate and self.generate.chat_template),
                "judge": str(getattr(getattr(self.judge, "loaded", None), "path", "") or "") or None,
                "cost": self.cost is not None,
                "ppl_tokens": self.cost.ppl_tokens if self.cost else None,
                "ppl_window": self.cost.window if self.cost else None}
