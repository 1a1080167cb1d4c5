"""Generation quality after an edit: fluency and consistency (ROME paper, Meng et al. 2022, §4.2).

For each case the model *generates* (top-k 5 sampling, seeded) from the case's
generation prompts -- CounterFact's ``generation_prompts`` (10 per case in the ROME
layout); cases without them (EasyEdit's flat layout) use the edit prompt and its
rephrasings instead, which the result records as ``generation_source``.

KnowEdit's Fluency (EasyEdit's ``test_generation_quality`` as its KnowEdit script calls
it) generates once from the edit prompt alone, top-k 5, until the text -- prompt
included -- is 100 tokens long, whatever the model emits: ``source="prompt",
total_tokens=True``.  kedit samples exactly that many new tokens with the end-of-text
token suppressed (EasyEdit's sampler ignores it and goes on; an instruction-tuned model
such as SmolLM2-Instruct ends its turn right after a question, which would leave the
prompt alone to be scored); a prompt of 100 tokens or more gets no new token, and its
fluency is the prompt's own, as in EasyEdit.

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


def fixed_length_samples(loaded: Any, prompts: Sequence[str], total_tokens: int, *, top_k: int = 5, seed: int = 0,
                         batch_size: int = 16) -> list[str]:
    """Top-k samples that make each text (prompt + continuation) ``total_tokens`` tokens
    long, the end-of-text token suppressed (EasyEdit's ``generate_fast`` with
    ``max_out_len``); a prompt that long already gets ``""``.  Prompts of one length
    share batches (no padding); seeded in a forked RNG; neutral generation settings, as
    :func:`kedit.evaluation.generation.generate`."""
    import torch

    from kedit.evaluation.generation import _continuation, _model_device, _pad_id, _seeded

    model, tok = loaded.model, loaded.tokenizer
    device = _model_device(loaded)
    encoded = [[int(t) for t in ids] for ids in tok(list(prompts))["input_ids"]] if prompts else []
    eos = getattr(tok, "eos_token_id", None)
    if eos is None:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    out = [""] * len(encoded)
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        if 0 < len(ids) < total_tokens:
            by_length.setdefault(len(ids), []).append(i)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _seeded(int(seed), device):
            for length, idx in sorted(by_length.items()):
                n_new = total_tokens - length
                options = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=True, top_k=int(top_k),
                               top_p=1.0, temperature=1.0, num_beams=1, repetition_penalty=1.0,
                               no_repeat_ngram_size=0, pad_token_id=_pad_id(tok, model), eos_token_id=eos)
                for lo in range(0, len(idx), batch_size):
                    chunk = idx[lo: lo + batch_size]
                    ids = torch.tensor([encoded[i] for i in chunk], device=device)
                    gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **options)
                    for row, i in enumerate(chunk):
                        out[i] = _continuation(tok, encoded[i], [int(t) for t in gen[row, length:].tolist()])
    finally:
        model.train(was_training)
    return out


def generation_metrics(loaded: Any, cases: Sequence[Any], *, max_new_tokens: int = 100, seed: int = 0,
                       reference: TfidfReference | None = None, batch_size: int = 16, source: str = "case",
                       total_tokens: bool = False) -> list[dict[str, float]]:
    """``fluency`` (and ``consistency`` with a reference) per case, in case order.

    ``source``: ``"case"`` (the case's generation prompts, see :func:`generation_prompts`)
    or ``"prompt"`` (the edit prompt only, KnowEdit).  ``total_tokens``: ``max_new_tokens``
    counts the prompt's tokens too (KnowEdit's 100-token texts)."""
    from kedit.evaluation.generation import generate

    if source not in ("case", "prompt"):
        raise ValueError(f"source must be 'case' or 'prompt', got {source!r}")
    prompts, owner = [], []
    for i, case in enumerate(cases):
        ps = [case.prompt] if source == "prompt" else generation_prompts(case)[0]
        prompts += ps
        owner += [i] * len(ps)
    if not total_tokens:
        texts = generate(loaded, prompts, max_new_tokens, sample=True, top_k=5, seed=seed, batch_size=batch_size)
    else:
        texts = fixed_length_samples(loaded, prompts, max_new_tokens, seed=seed, batch_size=batch_size)
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
