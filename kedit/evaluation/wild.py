"""Scores from what the model generates (the WILD protocol), not from teacher forcing.

Yang et al. 2025, "The Mirage of Model Editing: Revisiting Evaluation in the Wild"
(arXiv 2502.11177, ACL 2025) show that teacher-forced token accuracy overstates editing:
it feeds the model the target's own prefix and length.  Their WILD protocol asks the
edited model as a user would:

* **input**: the test prompt alone (their default "question only" context); kedit adds
  the model's chat template with ``--chat-template`` (the prompt as the user's turn);
* **generation**: greedy, at most 50 new tokens, stopped at ``"."``, a newline or the end
  of text (their ``stop_strings``); the answer is the text before the first stop;
* **scoring**: an LLM judge (theirs: an API model asked whether the answer is CORRECT or
  INCORRECT against the gold target), or without one, exact match of the normalised
  answer (SQuAD's normalisation: lower case, punctuation and articles removed,
  whitespace collapsed).

What kedit computes, per prompt (``norm`` = :func:`normalize_answer`, ``A`` = the
generated answer, ``G`` = the accepted answers -- ``target_new`` for the edit prompt and
its rephrasings, the alias list of a portability prompt):

* ``em``  = 1 if ``norm(A) == norm(g)`` for some ``g`` in ``G`` (WILD's fallback metric);
* ``acc`` = 1 if some ``norm(g)`` (not empty) occurs in ``norm(A)`` as whole words
  (answer containment; also tried with punctuation read as a word break, so that
  "Apple's" contains "Apple").  **The headline**: the answer is already cut at the first
  sentence end, and a small model that answers "Lionel Messi plays basketball" has the
  fact right; exact match counts it wrong.  Containment is what WILD's judge asks
  ("fully contains the important information") without its check for contradictions,
  so ``acc >= em`` always and a hedged "football or basketball" counts under ``acc``.
* ``judge`` = 1 if a local judge model (``--judge DIR``) answers yes to
  :data:`JUDGE_QUESTION` (parsed by :func:`parse_verdict`; a reply that says neither
  yes nor no counts 0, and ``gen_judge_parsed`` is the share of the case's replies that
  said one of them).

Per case: ``gen_rewrite_{acc,em,judge}`` on the edit prompt; ``gen_rephrase_*`` = mean
over the rephrasings; ``gen_portability_*`` = mean over the case's portability kinds of
the mean over the kind's prompts (KnowEdit's averaging, as ``portability_acc``), with
``gen_portability_acc.<kind>``; ``gen_locality_acc`` = mean over the locality kinds of
the share of the kind's prompts whose post-edit answer (the cut text, stripped) equals
the pre-edit one exactly (WILD compares the generated token ids; equal texts is the
stricter reading), with ``gen_locality_acc.<kind>``.  Before the edit
``gen_locality_acc`` is 1 by definition.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch

if TYPE_CHECKING:  # pragma: no cover
    from kedit.data.cases import EditCase

__all__ = [
    "JUDGE_QUESTION",
    "STOP",
    "Judge",
    "WildSettings",
    "answer_contains",
    "exact_match",
    "normalize_answer",
    "parse_verdict",
    "render_prompts",
    "wild_metrics",
]

#: WILD's stop strings (the end of text is the model's EOS token).
STOP = (".", "\n")
#: WILD's generation budget.
MAX_NEW_TOKENS = 50

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str, punctuation: str = "") -> str:
    """Lower case, punctuation removed (every Unicode punctuation character, not only
    ASCII's; replaced by ``punctuation``: SQuAD's and WILD's normalisation deletes it), the
    articles a/an/the removed as words, whitespace collapsed."""
    text = text.lower()
    text = "".join(punctuation if unicodedata.category(ch).startswith("P") else ch for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(answer: str, accepted: Sequence[str]) -> bool:
    """``normalize_answer(answer)`` equals that of some accepted answer (one that does not
    normalise to nothing: an answer "The" accepts no answer at all)."""
    a = normalize_answer(answer)
    return any(g and a == g for g in (normalize_answer(x) for x in accepted))


def answer_contains(answer: str, accepted: Sequence[str]) -> bool:
    """Some accepted answer, normalised and not empty, occurs in the normalised answer as
    a run of whole words ("paris" is in "paris france", not in "parisian").  Tried with
    punctuation deleted (so "USA" is in "the U.S.A") and with punctuation as a word break
    (so "Apple" is in "Apple's design" and "trance" in "trance-dance")."""
    for sep in ("", " "):
        a = f" {normalize_answer(answer, sep)} "
        if any(g and f" {g} " in a for g in (normalize_answer(x, sep) for x in accepted)):
            return True
    return False


# --------------------------------------------------------------------------- prompts


def render_prompts(tokenizer: Any, prompts: Sequence[str], chat_template: bool) -> list[str]:
    """The prompts as the model is asked them: unchanged, or each as the user's turn of
    the tokenizer's chat template with the assistant's turn opened."""
    if not chat_template:
        return list(prompts)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat-template: the model's tokenizer has no chat template")
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True) for p in prompts]


@dataclass
class WildSettings:
    """How answers are generated; ``stop_ids`` caches the stop tokens per tokenizer."""

    max_new_tokens: int = MAX_NEW_TOKENS
    chat_template: bool = False
    batch_size: int = 64       # prompts decoded together; a row leaves the batch when its answer stops
    stop: tuple[str, ...] = STOP
    _stop_ids: dict[int, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def answers(self, loaded: Any, prompts: Sequence[str]) -> list[str]:
        """Greedy answers (cut at the first stop string, stripped), in prompt order;
        each distinct prompt is generated once."""
        from kedit.evaluation.generation import generate, stop_token_ids

        unique = list(dict.fromkeys(prompts))
        if not unique:
            return []
        tok = loaded.tokenizer
        key = id(tok)
        if key not in self._stop_ids:
            self._stop_ids[key] = stop_token_ids(tok, self.stop)
        texts = generate(loaded, render_prompts(tok, unique, self.chat_template), self.max_new_tokens,
                         batch_size=self.batch_size, stop=self.stop, stop_ids=self._stop_ids[key],
                         special_tokens=not self.chat_template)
        by_prompt = {p: t.strip() for p, t in zip(unique, texts)}
        return [by_prompt[p] for p in prompts]


# --------------------------------------------------------------------------- judge

#: The one question the judge is asked per answer (kedit's wording of WILD's grading request).
JUDGE_QUESTION = (
    "You grade answers. Here is a prompt, its correct answer, and an answer to grade.\n"
    "Prompt: {question}\n"
    "Correct answer: {gold}\n"
    "Answer to grade: {answer}\n"
    "Does the answer to grade state the correct answer, without contradicting it? "
    "Reply with one word: yes or no."
)

_YES = {"yes", "y", "true", "correct", "right", "a"}
_NO = {"no", "n", "false", "incorrect", "wrong", "b"}
_WORD = re.compile(r"[a-z]+")


def parse_verdict(text: str) -> bool | None:
    """The judge's reply as True (yes) / False (no) / None (neither).

    The first word decides (case, quotes, markdown and punctuation ignored): yes, y,
    true, correct, right, or WILD's letter A mean yes; no, n, false, incorrect, wrong, or
    B mean no.  Otherwise the first "yes" or "no" anywhere as a word decides ("I think
    yes"); a reply with neither is None."""
    words = _WORD.findall(text.lower())
    if not words:
        return None
    if words[0] in _YES:
        return True
    if words[0] in _NO:
        return False
    for w in words[1:]:
        if w == "yes":
            return True
        if w == "no":
            return False
    return None


@dataclass
class Judge:
    """A local causal LM (``--judge DIR``, loaded with kedit's loader) that grades answers.

    Greedy, at most ``max_new_tokens`` new tokens, stopped at a newline; through its chat
    template when it has one.  Never a network service."""

    loaded: Any
    max_new_tokens: int = 8
    batch_size: int = 16
    unparsed: int = 0
    asked: int = 0

    def grade(self, items: Sequence[tuple[str, Sequence[str], str]]) -> list[float | None]:
        """1.0 (yes) / 0.0 (no) / None (the reply said neither) per ``(prompt, accepted
        answers, generated answer)``; an empty answer is 0.0 without asking."""
        from kedit.evaluation.generation import generate

        out: list[float | None] = [0.0] * len(items)
        ask = [i for i, (_, _, a) in enumerate(items) if a.strip()]
        questions = []
        for i in ask:
            q, gold, a = items[i]
            gold_text = gold[0] if len(gold) == 1 else f"{gold[0]} (also accepted: {', '.join(gold[1:])})"
            questions.append(JUDGE_QUESTION.format(question=q.strip(), gold=gold_text, answer=a.strip()))
        tok = self.loaded.tokenizer
        chat = bool(getattr(tok, "chat_template", None))
        prompts = render_prompts(tok, questions, True) if chat else [q + "\nReply:" for q in questions]
        replies = generate(self.loaded, prompts, self.max_new_tokens, batch_size=self.batch_size,
                           stop=("\n",), special_tokens=not chat) if prompts else []
        for i, reply in zip(ask, replies):
            verdict = parse_verdict(reply)
            self.asked += 1
            if verdict is None:
                self.unparsed += 1
            out[i] = None if verdict is None else float(verdict)
        return out


# --------------------------------------------------------------------------- per case

Key = tuple[str, str, int]   # (case_id, locality set name, prompt index)


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


def wild_metrics(loaded: Any, cases: Sequence["EditCase"], settings: WildSettings,
                 reference: dict[Key, str] | None = None, judge: Judge | None = None
                 ) -> tuple[list[dict[str, float]], list[list[dict]], dict[Key, str]]:
    """Per case: the ``gen_*`` metrics (module docstring), the answers generated
    (``[{"kind", "set", "prompt", "answer"}]``), and this model's locality answers
    (the reference to pass to the post-edit call; without one, ``gen_locality_acc``
    is 1 by definition).  All prompts of all cases go through one batched generation."""
    from kedit.evaluation.metrics import COUNT_PREFIX

    rows: list[list[dict]] = []
    prompts: list[str] = []
    for case in cases:
        mine = [{"kind": "rewrite", "set": "", "prompt": case.prompt, "accepted": (case.target_new,)}]
        mine += [{"kind": "rephrase", "set": "", "prompt": p, "accepted": (case.target_new,)}
                 for p in case.rephrase_prompts]
        for ps in case.portability:
            mine += [{"kind": "portability", "set": ps.name, "prompt": p, "accepted": tuple(a)}
                     for p, a in zip(ps.prompts, ps.answers)]
        for ps in case.locality:
            mine += [{"kind": "locality", "set": ps.name, "prompt": p, "index": j}
                     for j, p in enumerate(ps.prompts)]
        rows.append(mine)
        prompts += [r["prompt"] for r in mine]
    answers = iter(settings.answers(loaded, prompts))
    for mine in rows:
        for r in mine:
            r["answer"] = next(answers)
    if judge is not None:
        graded = [r for mine in rows for r in mine if r["kind"] != "locality"]
        for r, v in zip(graded, judge.grade([(r["prompt"], r["accepted"], r["answer"]) for r in graded])):
            r["judge"] = 0.0 if v is None else v
            r["judge_parsed"] = v is not None

    new_reference: dict[Key, str] = {}
    results: list[dict[str, float]] = []
    for case, mine in zip(cases, rows):
        m: dict[str, float] = {}
        for kind in ("rewrite", "rephrase"):
            got = [r for r in mine if r["kind"] == kind]
            if got:
                m[f"gen_{kind}_acc"] = _mean([float(answer_contains(r["answer"], r["accepted"])) for r in got])
                m[f"gen_{kind}_em"] = _mean([float(exact_match(r["answer"], r["accepted"])) for r in got])
                if judge is not None:
                    m[f"gen_{kind}_judge"] = _mean([r["judge"] for r in got])
        judged = [r for r in mine if "judge_parsed" in r]
        if judged:
            m["gen_judge_parsed"] = _mean([float(r["judge_parsed"]) for r in judged])
        port = [r for r in mine if r["kind"] == "portability"]
        if port:
            for name, score in (("acc", lambda r: float(answer_contains(r["answer"], r["accepted"]))),
                                ("em", lambda r: float(exact_match(r["answer"], r["accepted"]))),
                                *((("judge", lambda r: r["judge"]),) if judge is not None else ())):
                by_kind: dict[str, list[float]] = {}
                for r in port:
                    by_kind.setdefault(r["set"], []).append(score(r))
                m[f"gen_portability_{name}"] = _mean([_mean(v) for v in by_kind.values()])
                if name == "acc":
                    for kind, v in by_kind.items():
                        m[f"gen_portability_acc.{kind}"] = _mean(v)
                        m[f"{COUNT_PREFIX}gen_portability_acc.{kind}"] = len(v)
        loc = [r for r in mine if r["kind"] == "locality"]
        if loc:
            by_kind = {}
            for r in loc:
                key = (case.case_id, r["set"], r["index"])
                new_reference[key] = r["answer"]
                if reference is None:
                    same = 1.0
                elif key not in reference:
                    raise KeyError(f"generation locality reference has no entry for {key!r}")
                else:
                    same = float(reference[key].strip() == r["answer"].strip())
                by_kind.setdefault(r["set"], []).append(same)
            m["gen_locality_acc"] = _mean([_mean(v) for v in by_kind.values()])
            for kind, v in by_kind.items():
                m[f"gen_locality_acc.{kind}"] = _mean(v)
                m[f"{COUNT_PREFIX}gen_locality_acc.{kind}"] = len(v)
        results.append(m)
    texts = [[{k: r[k] for k in ("kind", "set", "prompt", "answer", "judge") if k in r} for r in mine]
             for mine in rows]
    return results, texts, new_reference
