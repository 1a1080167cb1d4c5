"""WISE on tiny random LLaMA models: the edit, the per-row router (padding, KV-cache
generation), the cumulative state read back from the model, shards and their TIES merge,
revert / save-load / sequential resume (tests/contract.py), and the hparams files."""

from __future__ import annotations

import json
import math

import pytest
import torch

import contract
from kedit.config import ConfigError, build_params, load_params
from kedit.data.cases import EditCase
from kedit.evaluation import evaluate_cases
from kedit.methods.base import EditRequest, RunContext
from kedit.methods.memory.wise import (Wise, WiseParams, WiseState, WiseWrapper, _residual_change, pack_mask,
                                       ties_merge, unpack_mask)
from kedit.methods.registry import get_method
from kedit.models.hooks import edit_output, record
from kedit.util.paths import configs_dir
from tiny import tiny_model

# The tiny models' MLP activations are ~100x smaller than SmolLM2's: a larger step, smaller
# margins, no per-entry bound; three context rows keep a step cheap.
SETTINGS = {"layer": 1, "edit_lr": 30.0, "n_iter": 25, "act_margin": [0.5, 3.0, 2.0], "norm_constraint": None,
            "context_template_length_params": [[3, 2]]}
CASE = EditCase(case_id="c1", template="Paris is the capital city of {}", subject="the Kingdom of France",
                target_new=" of", ground_truth=" and")
CASE2 = EditCase(case_id="c2", template="The Thames flows through {}", subject="London", target_new=" the",
                 ground_truth=" and")
EDIT_PROMPT = CASE.template.replace("{}", CASE.subject)
UNRELATED = "The river flows"


@pytest.fixture(autouse=True)
def kedit_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path_factory.getbasetemp() / "home"))


def method(loaded, seed=0, **over) -> Wise:
    cls = get_method("wise")
    return cls(loaded, build_params(cls.Params, {**SETTINGS, **over}, "test"), RunContext(seed=seed, progress=False))


@pytest.fixture(scope="module")
def edited(tmp_path_factory):
    """One tiny LLaMA, one WISE edit of CASE (computed once; every test reverts what it applies)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("KEDIT_HOME", str(tmp_path_factory.getbasetemp() / "home"))
    loaded = tiny_model("llama")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    edit = method(loaded).compute([EditRequest.from_case(CASE)])
    mp.undo()
    return loaded, edit, before


def wrapper_of(loaded) -> WiseWrapper:
    w = loaded.model.get_submodule(loaded.adapter.mlp_out_name(SETTINGS["layer"]))
    assert isinstance(w, WiseWrapper)
    return w


def logits(loaded, prompts, side="right"):
    tok = loaded.tokenizer
    old = tok.padding_side
    tok.padding_side = side
    try:
        enc = tok(list(prompts), return_tensors="pt", padding=True)
    finally:
        tok.padding_side = old
    with torch.no_grad():
        return loaded.model(**enc).logits, enc["attention_mask"]


def test_edit_makes_the_target_the_argmax_and_leaves_the_model_unchanged(edited):
    loaded, edit, before = edited
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())
    assert not isinstance(loaded.model.get_submodule(loaded.adapter.mlp_out_name(1)), WiseWrapper)
    assert edit.kind == "memory" and not edit.mergeable and edit.cumulative
    pre = evaluate_cases(loaded.model, loaded.tokenizer, [CASE])[0][0]["rewrite_acc"]
    info = edit.meta["cases"][0]
    assert info["loss"] < info["loss_start"] and info["act_edit"] > info["act_irrelevant"]
    edit.apply(loaded.model)
    try:
        post = evaluate_cases(loaded.model, loaded.tokenizer, [CASE])[0][0]["rewrite_acc"]
    finally:
        edit.revert(loaded.model)
    assert pre == 0.0 and post == 1.0


def test_unrelated_prompt_goes_through_the_main_memory_bit_identically(edited):
    loaded, edit, _ = edited
    base_unrelated, _ = logits(loaded, [UNRELATED])
    base_edit, _ = logits(loaded, [EDIT_PROMPT])
    edit.apply(loaded.model)
    try:
        w = wrapper_of(loaded)
        got_unrelated, _ = logits(loaded, [UNRELATED])
        assert w.last_route.tolist() == [-1]
        got_edit, _ = logits(loaded, [EDIT_PROMPT])
        assert w.last_route.tolist() == [0]
    finally:
        edit.revert(loaded.model)
    assert torch.equal(got_unrelated, base_unrelated)
    assert not torch.allclose(got_edit, base_edit)


def test_a_neighbour_sharing_the_edit_prompts_tokens_is_routed_to_the_side_memory(edited):
    """The limit of WISE's router that keeps its CounterFact locality below GRACE's: the
    score is the mean of the per-token change ``‖ΔW a_t‖`` over the input's tokens, so a
    prompt that differs from the edit prompt in one subject token clears act_ratio × the
    edit's own score, and gets the edit, while an unrelated prompt does not."""
    loaded, edit, _ = edited
    neighbour = EDIT_PROMPT.replace("France", "Spain")
    assert neighbour != EDIT_PROMPT
    edit.apply(loaded.model)
    try:
        w = wrapper_of(loaded)
        scores, route = [], []
        for prompt in (EDIT_PROMPT, neighbour, UNRELATED):
            with record({"w": w}) as got:
                logits(loaded, [prompt])
            scores.append(float(w.scores(got["w"])[0][0, 0]))
            route.append(int(w.last_route[0]))
        threshold = float(w.thresholds()[0])
    finally:
        edit.revert(loaded.model)
    assert route == [0, 0, -1]
    assert scores[1] > threshold > scores[2] and scores[1] > 0.9 * scores[0]


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_routes_each_row_on_its_own_tokens(edited, side):
    loaded, edit, _ = edited
    long_unrelated = UNRELATED + " through the middle of the old town and out to the sea"
    prompts = [EDIT_PROMPT, long_unrelated, UNRELATED]     # rows of different lengths: padding in rows 0 and 2
    base, mask = logits(loaded, prompts, side)
    assert (mask == 0).any()
    edit.apply(loaded.model)
    try:
        w = wrapper_of(loaded)
        got, _ = logits(loaded, prompts, side)
        routes = w.last_route.tolist()
        alone = []
        for p in prompts:
            solo, _ = logits(loaded, [p])
            alone.append((w.last_route.item(), solo[0]))
    finally:
        edit.revert(loaded.model)
    assert routes == [0, -1, -1] == [r for r, _ in alone]
    valid = mask.bool()
    # main-memory rows: bit-identical to the base model on the same padded batch
    for row in (1, 2):
        assert torch.equal(got[row][valid[row]], base[row][valid[row]])
    # the edited row: what it gets alone (padding neither votes nor changes its output)
    assert torch.allclose(got[0][valid[0]], alone[0][1], atol=1e-5)
    assert not torch.allclose(got[0][valid[0]], base[0][valid[0]])


def test_scores_ignore_padding_positions(edited):
    loaded, edit, _ = edited
    edit.apply(loaded.model)
    try:
        w = wrapper_of(loaded)
        x = torch.randn(1, 5, w.state.shape[1]) * 0.05
        padded = torch.cat([x, torch.randn(1, 3, w.state.shape[1]) * 5.0], dim=1)
        valid = torch.tensor([[True] * 5 + [False] * 3])
        s_alone, _ = w.scores(x)
        s_padded, _ = w.scores(padded, valid)
        s_counted, _ = w.scores(padded)
    finally:
        edit.revert(loaded.model)
    assert torch.allclose(s_padded, s_alone, rtol=1e-6)
    assert not torch.allclose(s_counted, s_alone)


def test_generation_keeps_the_prompts_routing_for_every_cached_step(edited):
    loaded, edit, _ = edited
    tok = loaded.tokenizer
    old = tok.padding_side
    tok.padding_side = "left"
    enc = tok([EDIT_PROMPT, UNRELATED + " and the city"], return_tensors="pt", padding=True)
    tok.padding_side = old
    edit.apply(loaded.model)
    calls = []
    try:
        w = wrapper_of(loaded)
        h = w.register_forward_hook(lambda m, a, o: calls.append((a[0].shape[1], m.last_route.tolist())))
        with torch.no_grad():
            out = loaded.model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        h.remove()
        with torch.no_grad():   # without a cache every call sees the whole sequence and decides on it
            plain = loaded.model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id,
                                          use_cache=False)
    finally:
        edit.revert(loaded.model)
    assert len(calls) == 4 and calls[0][0] == enc["input_ids"].shape[1] and all(n == 1 for n, _ in calls[1:])
    assert all(route == [0, -1] for _, route in calls)
    assert out.shape == plain.shape


def test_revert_is_bit_identical(edited):
    loaded, edit, _ = edited
    contract.assert_revert_bit_identical(loaded, edit, prompts=[EDIT_PROMPT, UNRELATED])


def test_save_load_same_logits(edited, tmp_path):
    loaded, edit, _ = edited
    back = contract.assert_save_load_same_logits(loaded, edit, tmp_path, prompts=[EDIT_PROMPT, UNRELATED])
    assert back.to_json() == edit.to_json()


def test_state_is_stored_sparsely_and_round_trips_exactly(edited):
    _, edit, _ = edited
    (spec,) = edit.modules.values()
    t = spec.tensors
    out, inn = (int(x) for x in t["shape"])
    n_kept = int(unpack_mask(t["shard_mask"], out * inn).sum())
    assert t["shard_values"].numel() == n_kept
    assert 0.1 < n_kept / (out * inn) < 0.3          # mask_ratio 0.2
    assert sum(v.numel() * v.element_size() for v in t.values()) < 0.35 * out * inn * 4
    state = WiseState.from_tensors(t)
    again = state.to_tensors()
    assert again.keys() == t.keys() and all(torch.equal(again[k], t[k]) for k in t)
    mask, delta = state.shard
    assert torch.equal(delta != 0, (delta != 0) & mask)          # the shard writes only under its mask


def test_pack_mask_round_trip():
    g = torch.Generator().manual_seed(1)
    m = torch.rand(13, 7, generator=g) < 0.3
    packed = pack_mask(m)
    assert packed.dtype == torch.uint8 and packed.numel() == (13 * 7 + 7) // 8
    assert torch.equal(unpack_mask(packed, 13 * 7).reshape(13, 7), m)


def test_ties_merge_on_a_hand_made_example():
    d1 = torch.tensor([[3.0, -1.0, 0.5], [0.0, 2.0, -4.0]])
    d2 = torch.tensor([[1.0, 2.0, -0.2], [-3.0, -1.0, 0.1]])
    d3 = torch.tensor([[0.0, 0.0, 5.0], [1.0, -0.3, 0.0]])
    # density 0.5 keeps the 3 largest magnitudes of each:
    #   d1 -> [[3, 0, 0], [0, 2, -4]];  d2 -> [[1, 2, 0], [-3, 0, 0]];  d3 -> [[0, 0, 5], [1, 0, 0]]
    # weights 0.2, 0.3, 0.5 -> weighted sums [[0.9, 0.6, 2.5], [-0.4, 0.4, -0.8]] elect the signs
    #   [[+, +, +], [-, +, -]];  agreeing entries, weighted mean:
    #   (0,0): (0.2*3 + 0.3*1) / 0.5 = 1.8   (0,1): 0.3*2 / 0.3 = 2   (0,2): 5
    #   (1,0): only d2 (-3) agrees -> -3     (1,1): 2                 (1,2): -4
    want = torch.tensor([[1.8, 2.0, 5.0], [-3.0, 2.0, -4.0]])
    got = ties_merge([d1, d2, d3], [0.2, 0.3, 0.5], density=0.5)
    assert torch.allclose(got, want, atol=1e-6)
    # no trimming, opposite signs cancel by election; an entry nobody writes stays 0
    got = ties_merge([torch.tensor([2.0, -1.0, 0.0]), torch.tensor([-1.0, -1.0, 0.0])], [0.5, 0.5], density=1.0)
    assert torch.equal(got, torch.tensor([2.0, -1.0, 0.0]))


def sequence(loaded, cases, **over) -> list[WiseState]:
    """Edit ``cases`` one after another, each edit applied before the next compute; the state
    each edit returns."""
    m = method(loaded, **{"n_iter": 10, **over})
    states = []
    for c in cases:
        e = m.compute([EditRequest.from_case(c)])
        (spec,) = e.modules.values()
        before = {k: v.clone() for k, v in spec.tensors.items()}
        if states:   # compute left the installed wrapper as it was
            assert all(torch.equal(before_prev[k], v) for k, v in wrapper_of(loaded).wrapper_state().items())
        e.apply(loaded.model)
        e.forget_originals()
        before_prev = before
        states.append(WiseState.from_tensors(spec.tensors))
    return states


def test_compute_reads_the_installed_state_and_merges_shards_by_ties():
    cases = [CASE, CASE2, CASE, CASE2]
    loaded = tiny_model("llama")
    merged = sequence(loaded, cases, save_freq=1, merge_freq=2)
    kept = sequence(tiny_model("llama"), cases, save_freq=1, merge_freq=100)   # the same shards, never merged
    assert [s.count for s in merged] == [1, 2, 3, 4]
    shards = [d for _, d in kept[-1].pending]
    assert len(shards) == 4 and kept[-1].merged is None and kept[-1].shard is None
    # every shard has its own mask and writes only under it
    masks = [m for m, _ in kept[-1].pending]
    assert all(not torch.equal(masks[0], m) for m in masks[1:])
    assert all(torch.equal(d != 0, (d != 0) & m) for m, d in kept[-1].pending)
    # edit 1: saved, waiting; edit 2: the two shards merged (weights 1/2 each); edit 3: a shard
    # waiting beside the merged memory; edit 4: merged into it (0.4/2 each, 0.6 the merged memory)
    assert (merged[0].merged is None, len(merged[0].pending)) == (True, 1)
    first = ties_merge(shards[:2], [0.5, 0.5], 0.53)
    assert (merged[1].merges, len(merged[1].pending)) == (1, 0) and torch.equal(merged[1].merged, first)
    assert (merged[2].merges, len(merged[2].pending)) == (1, 1) and torch.equal(merged[2].merged, first)
    assert torch.equal(merged[3].merged, ties_merge([*shards[2:], first], [0.2, 0.2, 0.6], 0.53))
    assert merged[3].min_act == min(s.min_act for s in kept)
    # both prompts route to a side memory: the merged one (index 0)
    w = wrapper_of(loaded)
    for c in (CASE, CASE2):
        logits(loaded, [c.template.replace("{}", c.subject)])
        assert w.last_route.tolist() == [0]


def test_retrieve_keeps_merged_groups_apart_each_with_its_own_threshold():
    """WISE-Retrieve: every ``merge_freq`` edits the saved shards are TIES-merged into one
    more memory (not into a single merged memory); each memory's threshold comes from its
    own edits' scores; a row goes to the highest-scoring memory that passes its threshold."""
    cases = [CASE, CASE2, CASE, CASE2]
    kept = sequence(tiny_model("llama"), cases, save_freq=1, merge_freq=None, retrieve=True)
    groups = sequence(tiny_model("llama"), cases, save_freq=1, merge_freq=2, retrieve=True)
    shards = [d for _, d in kept[-1].pending]
    assert len(shards) == 4 and kept[-1].merged is None and kept[-1].retrieved == []
    assert kept[-1].merges == 0 and len(kept[-1].pending_min) == 4
    assert min(kept[-1].pending_min) == kept[-1].min_act
    last = groups[-1]
    assert last.merged is None and len(last.retrieved) == 2 and last.merges == 2 and last.pending == []
    assert torch.equal(last.retrieved[0], ties_merge(shards[:2], [0.5, 0.5], 0.53))
    assert torch.equal(last.retrieved[1], ties_merge(shards[2:], [0.5, 0.5], 0.53))
    assert last.retrieved_min == [min(kept[-1].pending_min[:2]), min(kept[-1].pending_min[2:])]
    assert last.minima() == last.retrieved_min
    # stored sparsely and read back exactly, flags and minima included
    back = WiseState.from_tensors(last.to_tensors())
    assert back.retrieve and back.retrieved_min == last.retrieved_min
    assert all(torch.equal(a, b) for a, b in zip(back.retrieved, last.retrieved))
    # the router: per-memory thresholds; each edit prompt goes to its own edit's memory
    loaded = tiny_model("llama")
    sequence(loaded, [CASE, CASE2], save_freq=1, merge_freq=None, retrieve=True)
    w = wrapper_of(loaded)
    ratio = w.config_dict["act_ratio"]
    assert w.thresholds().tolist() == pytest.approx([ratio * m for m in w.state.pending_min])
    routes = []
    for c in (CASE, CASE2):
        logits(loaded, [c.template.replace("{}", c.subject)])
        routes += w.last_route.tolist()
    assert routes == [0, 1]
    w.state.pending_min = [math.inf, math.inf]        # no memory passes its threshold: main memory
    logits(loaded, [EDIT_PROMPT])
    assert w.last_route.tolist() == [-1]
    # a memory built one way is not continued the other way
    with pytest.raises(ValueError, match="retrieve"):
        method(loaded, n_iter=2, save_freq=1, merge_freq=None, retrieve=False).compute([EditRequest.from_case(CASE)])


def test_irrelevant_prompts_are_deterministic_and_never_the_edits_own_case(tmp_path):
    records = [{"src": "What is A?", "loc": "nq question: q0", "loc_ans": "a0"},
               {"src": EDIT_PROMPT, "loc": "nq question: own", "loc_ans": "own"},
               {"src": "What is B?", "loc": "nq question: q2", "loc_ans": "a2"},
               {"src": "What is C?", "loc": "nq question: q3", "loc_ans": "a3"}]
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(records))
    loaded = tiny_model("llama")
    req = EditRequest.from_case(CASE)

    def picks(seed, k=1):
        m = method(loaded, seed=seed, irrelevant_data=str(path), n_irrelevant=k)
        return [m.irrelevant_texts(req, n) for n in range(40)]

    assert picks(0) == picks(0) and picks(0) != picks(1)
    two = picks(0, k=2)
    assert all(len(set(t)) == 2 for t in two)
    drawn = {t for ts in [*picks(0), *picks(1), *two] for t in ts}
    assert drawn == {"nq question: q0 a0", "nq question: q2 a2", "nq question: q3 a3"}
    with pytest.raises(ValueError, match="fewer than 4"):
        method(loaded, irrelevant_data=str(path), n_irrelevant=4).irrelevant_texts(req, 0)


def test_subject_swaps_ask_the_edit_question_of_other_subjects(tmp_path):
    records = [{"subject": s, "src": f"What is {s}?", "loc": f"nq question: {s}", "loc_ans": "x"}
               for s in ("Oslo", "the kingdom of france", "Peru", "Oslo", "Chopin")]
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(records))
    loaded = tiny_model("llama")
    req = EditRequest.from_case(CASE)           # subject "the Kingdom of France"
    m = method(loaded, irrelevant_data=str(path), n_subject_swaps=2)
    draws = [m.swapped_texts(req, n) for n in range(30)]
    assert draws == [m.swapped_texts(req, n) for n in range(30)]          # deterministic
    assert all(len(set(d)) == 2 for d in draws)
    # the edit's template with another subject (never its own, whatever the case), each seen
    assert {t for d in draws for t in d} == {CASE.template.replace("{}", s) for s in ("Oslo", "Peru", "Chopin")}
    assert method(loaded, irrelevant_data=str(path)).swapped_texts(req, 0) == []     # the paper: none
    # they are trained as irrelevant inputs: the rows of an edit grow by them
    rows, irrelevant = m._rows(req, 0)
    plain = method(loaded, irrelevant_data=str(path))._rows(req, 0)[1]
    assert len(irrelevant) == len(plain) + 2
    with pytest.raises(ConfigError, match="n_subject_swaps"):
        build_params(WiseParams, {"n_subject_swaps": -1}, "test")


def test_sequential_resume_equals_uninterrupted(tmp_path, monkeypatch):
    # save every edit, merge every second: merges happen at the 2nd and 4th of the 5 edits
    want = contract.check_sequential_resume(tmp_path, monkeypatch, "wise",
                                            {**SETTINGS, "n_iter": 8, "save_freq": 1, "merge_freq": 2}, Wise)
    assert want["n"] == 5 and want["post"]["rewrite_acc"] > want["pre"]["rewrite_acc"]


def test_params_are_checked_and_the_shipped_config_loads():
    with pytest.raises(ConfigError, match="merge_freq"):
        build_params(WiseParams, {"save_freq": 3, "merge_freq": 4}, "test")
    with pytest.raises(ConfigError, match="act_margin"):
        build_params(WiseParams, {"act_margin": [1.0, 2.0]}, "test")
    loaded = tiny_model("llama")
    p = load_params(WiseParams, configs_dir() / "methods" / "wise" / "smollm2-135m.yaml", loaded.adapter)
    assert p.merge_alg == "ties" and (p.merge_freq is None or p.merge_freq % p.save_freq == 0)
    assert build_params(WiseParams, {"merge_freq": None}, "test").merge_freq is None
    with pytest.raises(ConfigError, match="merge_freq"):
        build_params(WiseParams, {"merge_freq": 0}, "test")
    assert get_method("wise").kind == "memory"


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_training_replays_a_memory_change_as_the_block_adds_it(family):
    """A step feeds the blocks above the block's output with the side memory's change: for
    Gemma that change passes the post-feed-forward norm, as it does when the memory answers."""
    loaded = tiny_model(family)
    a, layer = loaded.adapter, 1
    ids = loaded.tokenizer(UNRELATED + " through the old city", return_tensors="pt")["input_ids"]
    with torch.no_grad(), record({"m": a.mlp_out(layer)}, inputs=False) as m, \
            record({"h": a.block(layer)}, inputs=False) as h0:
        loaded.model(input_ids=ids)
    change = torch.randn(m["m"].shape, generator=torch.Generator().manual_seed(0)) * m["m"].std()
    with torch.no_grad(), edit_output(a.mlp_out(layer), lambda out: out + change), \
            record({"h": a.block(layer)}, inputs=False) as h1:
        loaded.model(input_ids=ids)
    with torch.no_grad():
        replayed = h0["h"] + _residual_change(a.mlp_out_norm(layer), m["m"])(change)
    assert torch.allclose(replayed, h1["h"], atol=1e-5)
    assert torch.allclose(h0["h"] + change, h1["h"], atol=1e-5) == (family == "llama")

