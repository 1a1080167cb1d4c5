"""IKE on tiny models: no weight ever changes, revert and save/load, retrieval on a
hand-made pool (hand-computed TF-IDF ranking), the exact context text, the tokenisation
boundary, exclusion of the edited fact, sequential state and resume."""

from __future__ import annotations

import json
import math
import random
import sys
import types

import numpy as np
import pytest
import torch
from contract import assert_revert_bit_identical, assert_save_load_same_logits, check_sequential_resume, logits
from tiny import tiny_model, tiny_tokenizer

from kedit.config import ConfigError, build_params, load_params
from kedit.methods.base import EditRequest, RunContext
from kedit.methods.context.ike import (IKE, PoolCase, TfidfIndex, assign_kinds, clean_paraphrase, default_pool,
                                       kind_counts, load_pool)
from kedit.methods.registry import get_method
from kedit.util.paths import configs_dir, package_data

# A hand-made pool (EasyEdit flat layout).  The query fact is "The Eiffel Tower is located
# in Rome"; its TF-IDF neighbours, by hand (below): colosseum > louvre > tokyo > messi.
POOL = [
    {"case_id": 1, "prompt": "Lionel Messi plays", "subject": "Lionel Messi", "target_new": "basketball",
     "ground_truth": "football", "rephrase_prompt": "Lionel Messi is a professional",
     "locality_prompt": "Larry Bird is a professional", "locality_ground_truth": "basketball"},
    {"case_id": 2, "prompt": "The Colosseum is located in", "subject": "The Colosseum", "target_new": "Rome",
     "ground_truth": "Athens", "rephrase_prompt": "Some noise here. The Colosseum can be found in",
     "locality_prompt": "The Pantheon is located in", "locality_ground_truth": "Rome"},
    {"case_id": 3, "prompt": "The Louvre is located in", "subject": "The Louvre", "target_new": "Paris",
     "ground_truth": "Berlin", "rephrase_prompt": "The Louvre stands in",
     "locality_prompt": "Notre Dame is located in", "locality_ground_truth": "Paris"},
    {"case_id": 4, "prompt": "Tokyo is located in", "subject": "Tokyo", "target_new": "Japan",
     "ground_truth": "China", "rephrase_prompt": "Tokyo lies in",
     "locality_prompt": "Osaka is located in", "locality_ground_truth": "Japan"},
]
EDIT = EditRequest("e1", "{} is located in", "The Eiffel Tower", "Rome", "Paris")
COLOSSEUM, LOUVRE, TOKYO, MESSI = 1, 2, 3, 0   # pool indices


@pytest.fixture
def pool(tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in POOL))
    return path


def ike(loaded, pool, **over) -> IKE:
    settings = {"k": 1, "pool": str(pool), "max_context_tokens": 100, **over}
    return IKE(loaded, build_params(IKE.Params, settings, "test"), RunContext(progress=False))


def state(loaded) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}


def same_state(loaded, before) -> bool:
    now = loaded.model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


# ------------------------------------------------------------------ weights, revert, save/load


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_weights_never_change_during_and_after(family, pool):
    loaded = tiny_model(family)
    before = state(loaded)
    ptrs = {n: p.data_ptr() for n, p in loaded.model.named_parameters()}
    base = logits(loaded)
    edit = ike(loaded, pool, k=2).compute([EDIT])
    assert edit.kind == "context" and same_state(loaded, before)
    edit.apply(loaded.model)
    assert not torch.equal(logits(loaded), base), "the context changes nothing"
    assert same_state(loaded, before)                       # every parameter bit-identical while applied
    assert {n: p.data_ptr() for n, p in loaded.model.named_parameters()} == ptrs
    edit.revert(loaded.model)
    assert same_state(loaded, before) and torch.equal(logits(loaded), base)
    assert_revert_bit_identical(loaded, edit.detached())


def test_save_load_same_logits(pool, tmp_path):
    loaded = tiny_model("llama")
    edit = ike(loaded, pool, k=2).compute([EDIT])
    back = assert_save_load_same_logits(loaded, edit, tmp_path)
    assert back.text == edit.text and torch.equal(back.ids, edit.ids)
    assert back.meta["facts"] == edit.meta["facts"]


# ------------------------------------------------------------------ retrieval


def test_tfidf_ranking_by_hand(pool):
    # idf = ln(N/df), N = 4: "the" in colosseum and louvre (ln 2); "is", "located", "in" in
    # three facts (ln 4/3); every other term in one (ln 4).  Each term occurs once (tf weight 1).
    l2, l43, l4 = math.log(2), math.log(4 / 3), math.log(4)
    q = math.sqrt(l2**2 + 3 * l43**2 + l4**2)               # query: the, is, located, in, rome (eiffel/tower unseen)
    want = {
        COLOSSEUM: (l2**2 + 3 * l43**2 + l4**2) / (q * math.sqrt(l2**2 + 3 * l43**2 + 2 * l4**2)),
        LOUVRE: (l2**2 + 3 * l43**2) / (q * math.sqrt(l2**2 + 3 * l43**2 + 2 * l4**2)),
        TOKYO: (3 * l43**2) / (q * math.sqrt(3 * l43**2 + 2 * l4**2)),
        MESSI: 0.0,
    }
    cases = load_pool(pool)
    got = TfidfIndex([c.fact for c in cases]).scores("The Eiffel Tower is located in Rome")
    assert got == pytest.approx([want[i] for i in range(4)], abs=1e-12)
    method = ike(tiny_model("llama"), pool, k=3)
    method.prepare()
    assert method.retrieve([EDIT], random.Random(0)) == [COLOSSEUM, LOUVRE, TOKYO]


def test_never_retrieves_the_edited_case_or_its_subject(tmp_path):
    rows = POOL + [
        {**POOL[1], "case_id": 5, "subject": "The Eiffel Tower", "prompt": "The Eiffel Tower is located in",
         "target_new": "Rome"},                                             # the edited case itself
        {**POOL[1], "case_id": 6, "subject": "the eiffel tower", "prompt": "the eiffel tower was designed by",
         "target_new": "Rome"},                                             # same subject, other relation
    ]
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = tiny_model("llama")
    for retrieval in ("tfidf", "random"):
        method = ike(loaded, path, k=10, retrieval=retrieval, max_context_tokens=10_000)
        method.prepare()
        chosen = method.retrieve([EDIT], random.Random(0))
        assert sorted(chosen) == [0, 1, 2, 3]
        edit = method.compute([EDIT])
        assert "designed by" not in edit.text
        assert edit.text.count("The Eiffel Tower is located in Rome") == 1   # only in the final block
    # a committed subject is excluded from later edits as well
    method = ike(loaded, path, k=10, max_context_tokens=10_000)
    method.commit(method.compute([EditRequest("e0", "{} is located in", "Tokyo", "Peru")]))
    method.prepare()
    assert TOKYO not in method.retrieve([EDIT], random.Random(0))


def test_random_retrieval_is_seeded_and_differs_from_tfidf(pool):
    loaded = tiny_model("llama")
    a = ike(loaded, pool, k=3, retrieval="random").compute([EDIT])
    b = ike(loaded, pool, k=3, retrieval="random").compute([EDIT])
    assert a.text == b.text
    texts = set()
    for seed in range(8):
        m = ike(loaded, pool, k=3, retrieval="random")
        m.ctx.seed = seed
        texts.add(tuple(d.split(":")[0] for d in m.compute([EDIT]).meta["cases"][0]["demos"]))
    assert len(texts) > 1


def test_encoder_retrieval_with_a_local_sentence_transformer(pool, tmp_path, monkeypatch):
    """sentence-transformers is not installed: a stand-in module with hand-made embeddings."""
    vectors = {"Lionel Messi plays basketball": [0, 0, 1], "The Colosseum is located in Rome": [0, 1, 0],
               "The Louvre is located in Paris": [1, 0.2, 0], "Tokyo is located in Japan": [1, 0.5, 0],
               "The Eiffel Tower is located in Rome": [1, 0.4, 0]}

    class FakeST:
        def __init__(self, path, device=None):
            self.path = path

        def encode(self, texts, **kw):
            return np.array([vectors[t] for t in texts], dtype=np.float32)

    monkeypatch.setitem(sys.modules, "sentence_transformers", types.SimpleNamespace(SentenceTransformer=FakeST))
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))
    enc = tmp_path / "encoder"
    enc.mkdir()
    method = ike(tiny_model("llama"), pool, k=3, encoder=str(enc))
    method.prepare()
    # cosines: tokyo 0.981, louvre 0.969, colosseum 0.371, messi 0
    assert method.retrieve([EDIT], random.Random(0)) == [TOKYO, LOUVRE, COLOSSEUM]
    assert len(list((tmp_path / "home" / "ike").glob("pool-*.safetensors"))) == 1
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)      # not installed
    with pytest.raises(ConfigError, match="pip install sentence-transformers"):
        ike(tiny_model("llama"), pool, encoder=str(enc)).prepare()
    with pytest.raises(ConfigError, match="pip install sentence-transformers"):      # refused before any work
        ike(tiny_model("llama"), pool, encoder=str(enc)).check()


# ------------------------------------------------------------------ the context text


def test_context_text_exactly(pool):
    loaded = tiny_model("llama")
    tail = "New Fact: The Eiffel Tower is located in Rome\nPrompt:"
    head = "New Fact: The Colosseum is located in Rome\nPrompt: "
    for proportions, line in [((1, 0, 0), "The Colosseum is located in Rome"),
                              ((0, 1, 0), "The Colosseum can be found in Rome"),     # paraphrase, cleaned
                              ((0, 0, 1), "The Pantheon is located in Rome")]:       # neighbour, its answer
        edit = ike(loaded, pool, proportions=list(proportions)).compute([EDIT])
        assert edit.text == head + line + "\n\n" + tail
    edit = ike(loaded, pool, separator="newline", proportions=[0, 1, 0]).compute([EDIT])
    assert edit.text == ("New Fact: The Colosseum is located in Rome\nPrompt:\nThe Colosseum can be found in Rome\n\n"
                         "New Fact: The Eiffel Tower is located in Rome\nPrompt:\n")
    edit = ike(loaded, pool, separator="none", proportions=[1, 0, 0]).compute([EDIT])
    assert edit.text == ("New Fact: The Colosseum is located in Rome\nPrompt:The Colosseum is located in Rome\n\n"
                         "New Fact: The Eiffel Tower is located in Rome\nPrompt:")
    assert ike(loaded, pool, k=0).compute([EDIT]).text == tail


def test_three_kinds_nearest_last(pool):
    edit = ike(tiny_model("llama"), pool, k=3, proportions=[1, 1, 1], max_context_tokens=1000).compute([EDIT])
    blocks = edit.text.split("\n\n")
    assert blocks[-1] == "New Fact: The Eiffel Tower is located in Rome\nPrompt:"
    facts = [b.split("\n")[0] for b in blocks[:-1]]
    assert facts == ["New Fact: Tokyo is located in Japan", "New Fact: The Louvre is located in Paris",
                     "New Fact: The Colosseum is located in Rome"]              # farthest first, nearest last
    first = ike(tiny_model("llama"), pool, k=3, proportions=[1, 1, 1], max_context_tokens=1000,
                order="nearest_first").compute([EDIT])
    assert [b.split("\n")[0] for b in first.text.split("\n\n")[:-1]] == facts[::-1]     # EasyEdit's order
    kinds = {d.split(":")[1] for d in edit.meta["cases"][0]["demos"]}
    assert kinds == {"copy", "update", "retain"}
    options = {  # the demonstrations each case can give, by kind
        "Tokyo": {"copy": "Tokyo is located in Japan", "update": "Tokyo lies in Japan",
                  "retain": "Osaka is located in Japan"},
        "The Louvre": {"copy": "The Louvre is located in Paris", "update": "The Louvre stands in Paris",
                       "retain": "Notre Dame is located in Paris"},
        "The Colosseum": {"copy": "The Colosseum is located in Rome", "update": "The Colosseum can be found in Rome",
                          "retain": "The Pantheon is located in Rome"},
    }
    for block, demo in zip(blocks[:-1], [d for d in edit.meta["cases"][0]["demos"]]):
        subject = next(s for s in options if block.startswith(f"New Fact: {s} "))
        assert block.split("\n")[1] == "Prompt: " + options[subject][demo.split(":")[1]]


def test_kind_counts_and_fallback(pool):
    assert kind_counts(32, (1, 3, 4)) == [4, 12, 16]       # the authors' 32 demonstrations
    assert kind_counts(16, (1, 3, 4)) == [2, 6, 8]
    assert kind_counts(4, (1, 3, 4)) == [1, 1, 2]          # 0.5, 1.5, 2: the tie goes to copy
    assert kind_counts(0, (1, 3, 4)) == [0, 0, 0]
    bare = PoolCase("1", "Lionel Messi", "Lionel Messi plays", "basketball")     # no paraphrase, no neighbour
    assert assign_kinds([bare] * 8, (1, 3, 4), random.Random(0)) == ["copy"] * 8
    full = load_pool(pool)
    kinds = assign_kinds(full * 8, (1, 3, 4), random.Random(0))
    assert [kinds.count(k) for k in ("copy", "update", "retain")] == [4, 12, 16]


def test_clean_paraphrase():
    assert clean_paraphrase("A Week is held since 1990. Howard Glacier is in", "Howard Glacier") == "Howard Glacier is in"
    assert clean_paraphrase("and Riley. Autonomous University of Madrid is in", "Autonomous University of Madrid") \
        == "Autonomous University of Madrid is in"
    assert clean_paraphrase("The mother tongue of Danielle Darrieux is", "Danielle Darrieux") \
        == "The mother tongue of Danielle Darrieux is"


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("separator", ["space", "newline", "none"])
def test_tokenisation_boundary(pool, bos, separator):
    """Context ids + the input's ids (as kedit tokenises it alone) == the ids of the one string."""
    loaded = tiny_model("llama", bos=bos)
    tok = tiny_tokenizer(bos)
    for prompt in ["The Eiffel Tower is located in", "the river flows", "Question:What is", "1990 was", "(a) is"]:
        edit = ike(loaded, pool, separator=separator).compute([EditRequest("p", "{}", prompt, "Rome")])
        assert edit.meta["cases"][0]["boundary"] == "exact"
        ids = edit.ids.tolist()
        p_ids = tok(prompt)["input_ids"]
        if bos:
            assert ids[0] == tok.bos_token_id and p_ids[0] == tok.bos_token_id
            p_ids = p_ids[1:]
        assert ids + p_ids == tok(edit.text + prompt)["input_ids"]


def test_the_model_reads_context_and_input_as_one_text(pool):
    """Under the edit, the input's logits are those of the one string (no BOS tokenizer)."""
    loaded = tiny_model("llama")
    tok = loaded.tokenizer
    edit = ike(loaded, pool, k=2).compute([EDIT])
    prompt = EDIT.prompt
    n = len(tok(prompt)["input_ids"])
    with torch.no_grad():
        whole = loaded.model(**tok(edit.text + prompt, return_tensors="pt")).logits[0, -n:]
        edit.apply(loaded.model)
        got = loaded.model(**tok(prompt, return_tensors="pt")).logits[0]
        edit.revert(loaded.model)
    torch.testing.assert_close(got, whole, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ length, sequential


def test_context_limit_drops_the_farthest_demonstrations(pool):
    loaded = tiny_model("llama")
    full = ike(loaded, pool, k=3, max_context_tokens=1000).compute([EDIT])
    n = full.meta["cases"][0]["context_tokens"]
    cut = ike(loaded, pool, k=3, max_context_tokens=n - 1).compute([EDIT])
    info = cut.meta["cases"][0]
    assert info["dropped"] >= 1 and info["context_tokens"] <= n - 1
    assert info["demos"] == full.meta["cases"][0]["demos"][info["dropped"]:]   # the farthest went first
    assert cut.text.endswith(full.text[-len(cut.text):])
    with pytest.raises(ValueError, match="facts alone"):
        ike(loaded, pool, k=3, max_context_tokens=5).compute([EDIT])


def test_sequential_facts_accumulate_and_state_round_trips(pool):
    loaded = tiny_model("llama")
    method = ike(loaded, pool, k=1, max_context_tokens=1000)
    first = method.compute([EditRequest("a", "{} plays", "Larry Bird", "tennis")])
    assert method.state() == {}
    method.commit(first)
    second = method.compute([EDIT])
    assert second.text.endswith("New Fact: Larry Bird plays tennis\nNew Fact: The Eiffel Tower is located in Rome\n"
                                "Prompt:")
    assert second.meta["cases"][0]["facts"] == 2
    method.commit(second)
    saved = method.state()
    other = ike(loaded, pool, k=1, max_context_tokens=1000)
    other.load_state(saved)
    assert other.facts == method.facts and len(other.facts) == 2
    third = EditRequest("c", "{} was born in", "Ada Lovelace", "Oslo")
    assert other.compute([third]).text == method.compute([third]).text
    with pytest.raises(ValueError):
        other.load_state({"keys": torch.zeros(1)})


def test_sequential_resume_equals_uninterrupted(tmp_path, monkeypatch, pool):
    want = check_sequential_resume(tmp_path, monkeypatch, "ike",
                                   {"k": 1, "pool": str(pool), "max_context_tokens": 115}, IKE)
    assert want["n"] == 5 and want["post"]["rewrite_acc"] >= 0


# ------------------------------------------------------------------ registry, config, pool


def test_registered_config_and_shipped_pool():
    assert get_method("ike") is IKE and IKE.kind == "context"
    params = load_params(IKE.Params, configs_dir() / "methods" / "ike" / "smollm2-135m.yaml")
    assert params.retriever == "tfidf" and params.proportions == (1, 1, 1) and params.separator == "newline"
    assert IKE.Params().proportions == (1, 3, 4)          # the class default is the paper's mix
    with pytest.raises(ConfigError, match="encoder"):
        build_params(IKE.Params, {"retrieval": "encoder"}, "t")
    rows = [json.loads(line) for line in default_pool().read_text().splitlines()]
    assert len(rows) > 9000
    shipped = package_data() / "benchmarks"
    held = {str(r["case_id"]) for f in ("counterfact-val.json", "counterfact-orig-500.json")
            for r in json.loads((shipped / f).read_text())}
    assert not held & {str(r["case_id"]) for r in rows}     # no case of an evaluation file
