"""Generation quality after an edit: fluency and consistency (ROME paper, Meng et al. 2022, §4.2).

For each case the model *generates* (top-k 5 sampling, seeded) from the case's
generation prompts -- CounterFact's ``generation_prompts`` (10 per case in the ROME
layout); cases without them (EasyEdit's flat layout) use the edit prompt and its
rephrasings instead, which the result records as ``generation_source``.

* ``fluency`` -- ROME's generation entropy ``n_gram_entropy``: per text,
  ``mean(2/3 · H₂, 4/3 · H₃)`` where ``H_n = -Σ f log₂ f`` over the relative frequencies
  ``f`` of the text's word n-grams; averaged over the case's texts.  Low values mean
  repetitive text (an edit that breaks the model makes it loop).  ROME tokenises words
  with NLTK's ``word_tokenize``; kedit uses the regex ``\\w+|[^\\w\\s]`` (words and single
  punctuation marks), which agrees on ordinary prose and avoids a dependency.  Reported
  in bits, not ×100 as in the paper's tables.
* ``consistency`` -- ROME's reference score: the cosine similarity of the TF-IDF vectors
  of (all the case's generations joined) and (Wikipedia texts about subjects that share
  the new object, ROME's ``attribute_snippets.json`` for the case's relation and
  ``target_new`` id), with ROME's ``idf.npy`` / ``tfidf_vocab.json``.  Those files are
  not shipped (not redistributable here): pass their directory as ``--reference DIR``;
  without it, or for cases without ``relation_id`` / ``target_new_id`` (only the ROME
  layout has them), the metric is left out.  The vectoriser is scikit-learn's default
  ``TfidfVectorizer`` behaviour: lower-cased tokens matching ``\\b\\w\\w+\\b``, raw
  counts times idf, L2-normalised.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

WORD = re.compile(r"\w+|[^\w\s]")
TFIDF_TOKEN = re.compile(r"(?u)\b\w\w+\b")


def ngram_entropy(text: str, n: int) -> float:
    """``-Σ f log₂ f`` over the relative frequencies of the text's word n-grams (0 if none)."""
    words = WORD.findall(text)
    grams = Counter(tuple(words[i: i + n]) for i in range(len(words) - n + 1))
    total = sum(grams.values())
    return -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0


def fluency(texts: Sequence[str]) -> float:
    """Mean over ``texts`` of ``mean(2/3 · H₂, 4/3 · H₃)`` (ROME's ``n_gram_entropy``)."""
    per_text = [(2 / 3 * ngram_entropy(t, 2) + 4 / 3 * ngram_entropy(t, 3)) / 2 for t in texts]
    return float(np.mean(per_text)) if per_text else float("nan")


@dataclass
class TfidfReference:
    """ROME's reference data: idf weights, their vocabulary, and texts per (relation, object)."""

    vocab: dict[str, int]
    idf: np.ndarray
    snippets: dict[tuple[str, str], list[str]]

    @classmethod
    def load(cls, directory: str | Path) -> TfidfReference:
        d = Path(directory)
        need = ("attribute_snippets.json", "idf.npy", "tfidf_vocab.json")
        missing = [f for f in need if not (d / f).exists()]
        if missing:
            raise FileNotFoundError(f"--reference {d}: missing {', '.join(missing)} (ROME's data/ files)")
        vocab = json.loads((d / "tfidf_vocab.json").read_text())
        idf = np.load(d / "idf.npy", allow_pickle=False)
        if len(idf) != len(vocab):
            raise ValueError(f"--reference {d}: idf.npy has {len(idf)} entries, tfidf_vocab.json {len(vocab)}")
        snippets: dict[tuple[str, str], list[str]] = {}
        for el in json.loads((d / "attribute_snippets.json").read_text()):
            key = (str(el["relation_id"]), str(el["target_id"]))
            snippets.setdefault(key, []).extend(s["text"] for s in el["samples"])
        return cls(vocab, idf, snippets)

    def vector(self, text: str) -> np.ndarray:
        v = np.zeros(len(self.idf))
        for word in TFIDF_TOKEN.findall(text.lower()):
            j = self.vocab.get(word)
            if j is not None:
                v[j] += 1.0
        v *= self.idf
        norm = np.linalg.norm(v)
        return v / norm if norm > 0 else v

    def similarity(self, a: str, b: str) -> float:
        """Cosine of the two texts' TF-IDF vectors."""
        return float(self.vector(a) @ self.vector(b))

    def consistency(self, relation_id: str | None, target_id: str | None, texts: Sequence[str]) -> float | None:
        refs = self.snippets.get((str(relation_id), str(target_id))) if relation_id and target_id else None
        if not refs:
            return None
        return self.similarity(" ".join(texts), " ".join(refs))


def generation_prompts(case: Any) -> tuple[list[str], str]:
    """The prompts a case generates from, and where they came from."""
    if case.generation_prompts:
        return list(case.generation_prompts), "generation_prompts"
    return [case.prompt, *case.rephrase_prompts], "prompt+rephrase"


def generation_metrics(loaded: Any, cases: Sequence[Any], *, max_new_tokens: int = 100, seed: int = 0,
                       reference: TfidfReference | None = None, batch_size: int = 16) -> list[dict[str, float]]:
    """``fluency`` (and ``consistency`` with a reference) per case, in case order."""
    from kedit.evaluation.generation import generate

    prompts, owner = [], []
    for i, case in enumerate(cases):
        ps, _ = generation_prompts(case)
        prompts += ps
        owner += [i] * len(ps)
    texts = generate(loaded, prompts, max_new_tokens, sample=True, top_k=5, seed=seed, batch_size=batch_size)
    per_case: list[list[str]] = [[] for _ in cases]
    for i, p, t in zip(owner, prompts, texts):
        per_case[i].append(p + t)
    out = []
    for case, gen in zip(cases, per_case):
        m = {"fluency": fluency(gen)}
        if reference is not None:
            c = reference.consistency(case.relation_id, case.target_new_id, gen)
            if c is not None:
                m["consistency"] = c
        out.append(m)
    return out
