"""Generation metrics: ROME's n-gram entropy and TF-IDF consistency, hand-computed."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from kedit.data.cases import EditCase
from kedit.evaluation.fluency import TfidfReference, fluency, generation_prompts, ngram_entropy


def test_ngram_entropy_hand_computed():
    # "a b a b": bigrams ab, ba, ab -> (2/3, 1/3); trigrams aba, bab -> (1/2, 1/2)
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b", 2) == pytest.approx(h2)
    assert ngram_entropy("a b a b", 3) == pytest.approx(1.0)
    assert fluency(["a b a b"]) == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    # a looping text scores lower than varied text; punctuation counts as a word
    assert fluency(["the the the the the the"]) == 0.0
    assert fluency(["one, two. three!"]) > fluency(["one one one one one"])
    assert ngram_entropy("word", 2) == 0.0


def test_tfidf_consistency_hand_computed(tmp_path):
    vocab = {"paris": 0, "rome": 1, "city": 2}
    (tmp_path / "tfidf_vocab.json").write_text(json.dumps(vocab))
    np.save(tmp_path / "idf.npy", np.array([1.0, 2.0, 0.5]))
    (tmp_path / "attribute_snippets.json").write_text(json.dumps([
        {"relation_id": "P36", "target_id": "Q220", "samples": [{"text": "Rome is a city"}, {"text": "in Rome"}]}]))
    ref = TfidfReference.load(tmp_path)
    # generated: "Paris city" -> (1, 0, .5)/|.|; reference "Rome is a city in Rome" -> (0, 4, .5)/|.|
    a, b = np.array([1, 0, .5]), np.array([0, 4, .5])
    want = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    assert ref.consistency("P36", "Q220", ["Paris city"]) == pytest.approx(want)
    assert ref.consistency("P36", "Q999", ["Paris"]) is None
    assert ref.consistency(None, None, ["Paris"]) is None
    (tmp_path / "idf.npy").unlink()
    with pytest.raises(FileNotFoundError, match="idf.npy"):
        TfidfReference.load(tmp_path)


def test_generation_prompts_fall_back_to_prompt_and_rephrases():
    c = EditCase(case_id="a", template="{} plays", subject="Messi", target_new="tennis",
                 rephrase_prompts=("Messi is a player of",))
    assert generation_prompts(c) == (["Messi plays", "Messi is a player of"], "prompt+rephrase")
    g = EditCase(case_id="b", template="{} plays", subject="Messi", target_new="tennis",
                 generation_prompts=("Messi is known for",))
    assert generation_prompts(g) == (["Messi is known for"], "generation_prompts")
