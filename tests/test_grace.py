"""GRACE on tiny random models: the codebook rule (add, split, expand, overwrite), token-wise
routing (right and left padding, generate with a KV cache), the edit contract (revert,
save/load, sequential resume) and the hparams file."""

from __future__ import annotations

import pytest
import torch
from contract import PROMPTS, assert_revert_bit_identical, assert_save_load_same_logits, check_sequential_resume
from tiny import FAMILIES, tiny_model

from kedit.config import build_params, load_params
from kedit.data.cases import EditCase
from kedit.evaluation import evaluate_cases
from kedit.evaluation.generation import generate
from kedit.methods.base import EditRequest, RunContext
from kedit.methods.edit import Edit, EditWrapper, ModuleEdit
from kedit.methods.memory.grace import Grace, GraceParams, GraceWrapper, codebook_update, labels_match, route
from kedit.methods.registry import get_method
from kedit.models.hooks import record
from kedit.models.tokens import encode_prompt_target, pad_batch
from kedit.util.paths import configs_dir

LAYER = 1
SETTINGS = {"layer": LAYER, "n_iter": 40, "eps": 1e-4}
EDITED = PROMPTS[1]                   # "Lionel Messi plays"
NEAR = "Leo Messi plays"              # another prompt, same last token
OTHERS = [PROMPTS[0], PROMPTS[2], "The river flows"]


def case(prompt: str, target: str = " of", cid: str = "c") -> EditCase:
    return EditCase(case_id=cid, template="{}", subject=prompt, target_new=target, ground_truth=" the")


def method(loaded, **over) -> Grace:
    return Grace(loaded, build_params(GraceParams, {**SETTINGS, **over}, "test"), RunContext(progress=False))


def edit_of(loaded, prompt=EDITED, target=" of", **over) -> ModuleEdit:
    return method(loaded, **over).compute([EditRequest.from_case(case(prompt, target))])


def rewrite_acc(loaded, prompt=EDITED, target=" of") -> float:
    got, _ = evaluate_cases(loaded.model, loaded.tokenizer, [case(prompt, target)])
    return got[0]["rewrite_acc"]


def state_of(edit: ModuleEdit) -> dict[str, torch.Tensor]:
    (spec,) = edit.modules.values()
    return spec.tensors


def key_of(loaded, prompt: str) -> torch.Tensor:
    """The input of the edited projection at the prompt's last token (an independent read)."""
    ids = loaded.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with record({"k": loaded.adapter.mlp_out(LAYER)}, inputs=True) as seen, torch.no_grad():
        loaded.model(input_ids=ids)
    return seen["k"][0, -1].float()


def row_logits(loaded, prompts, side="right"):
    seqs = [loaded.tokenizer(p)["input_ids"] for p in prompts]
    if side == "right":
        ids, mask = pad_batch(seqs, loaded.tokenizer.pad_token_id, "right")
        kw = {}
    else:
        ids, mask, pos = pad_batch(seqs, loaded.tokenizer.pad_token_id, "left")
        kw = {"position_ids": pos}
    with torch.no_grad():
        out = loaded.model(input_ids=ids, attention_mask=mask, **kw).logits
    return out, mask.bool(), [len(s) for s in seqs]


# --------------------------------------------------------------------------- the rule, on numbers


def test_codebook_rule_add_split_expand_inside_overwrite():
    empty = {"keys": torch.zeros(0, 3), "values": torch.zeros(0, 2), "radii": torch.zeros(0),
             "labels": torch.zeros(0, 0, dtype=torch.long)}
    a = torch.tensor([0.0, 0.0, 0.0])
    s, u = codebook_update(empty, a, torch.tensor([5, 6]), 1.0, "exact", 2)
    assert (u.action, u.index, u.fresh) == ("add", 0, True) and s["radii"].tolist() == [1.0]
    s["values"][0] = torch.tensor([7.0, 8.0])
    # farther than eps + eps_nearest: a new entry, labels padded to the widest, rows aligned
    far, u = codebook_update(s, torch.tensor([2.5, 0.0, 0.0]), torch.tensor([9]), 1.0, "exact", 2)
    assert u.action == "add" and far["keys"].shape == (2, 3) and far["radii"].tolist() == [1.0, 1.0]
    assert far["labels"].tolist() == [[5, 6], [9, -1]] and far["values"][0].tolist() == [7.0, 8.0]
    # within reach, other label: split, both radii d/2, the new entry last with its own label
    sp, u = codebook_update(s, torch.tensor([1.5, 0.0, 0.0]), torch.tensor([9]), 1.0, "exact", 2)
    assert (u.action, u.index) == ("split", 1) and sp["radii"].tolist() == [0.75, 0.75]
    assert sp["labels"].tolist() == [[5, 6], [9, -1]] and torch.equal(sp["keys"][1], torch.tensor([1.5, 0.0, 0.0]))
    # within reach, same label: expand the nearest radius to d, train that entry's value further
    ex, u = codebook_update(s, torch.tensor([0.0, 1.5, 0.0]), torch.tensor([5, 6]), 1.0, "exact", 2)
    assert (u.action, u.index, u.fresh) == ("expand", 0, False) and ex["radii"].tolist() == [1.5]
    assert ex["keys"].shape == (1, 3)
    ins, u = codebook_update(s, torch.tensor([0.0, 0.5, 0.0]), torch.tensor([5, 6]), 1.0, "exact", 2)
    assert (u.action, ins["radii"].tolist()) == ("inside", [1.0])
    # the same key with another label: overwritten (a split would leave two radius-0 entries)
    ov, u = codebook_update(s, a.clone(), torch.tensor([4]), 1.0, "exact", 2)
    assert (u.action, u.index, u.fresh) == ("overwrite", 0, True) and ov["labels"].tolist() == [[4, -1]]
    assert ov["radii"].tolist() == [1.0] and ov["keys"].shape == (1, 3)


def test_labels_compare_by_mean_as_the_original_or_exactly():
    a, b = torch.tensor([5, 7, -1]), torch.tensor([6, 6])
    assert labels_match(a, b, "mean") and not labels_match(a, b, "exact")
    assert labels_match(a, torch.tensor([5, 7]), "exact") and not labels_match(a, torch.tensor([5, 8]), "mean")


def test_route_per_position_last_and_prompt_with_padding():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    values = torch.tensor([[10.0], [20.0]])
    radii = torch.tensor([0.1, 0.1])
    x = torch.tensor([[[5.0, 5.0], [1.0, 0.0], [5.0, 5.0], [0.0, 1.05], [5.0, 5.0]],
                      [[1.0, 0.0], [5.0, 5.0], [5.0, 5.0], [5.0, 5.0], [5.0, 5.0]]])
    out = torch.zeros(2, 5, 1)
    last = route(x, out, keys, values, radii, None, "last")[..., 0]
    assert last.tolist() == [[0, 10, 0, 20, 0], [10, 0, 0, 0, 0]]
    prompt = route(x, out, keys, values, radii, None, "prompt")[..., 0]
    assert prompt.tolist() == [[10, 10, 20, 20, 0], [10, 0, 0, 0, 0]]
    valid = torch.tensor([[True] * 5, [False, True, True, True, True]])   # row 1: its hit is padding
    assert route(x, out, keys, values, radii, valid, "prompt")[..., 0].tolist() == [[10, 10, 20, 20, 0], [0] * 5]
    far = torch.full((2, 5, 2), 9.0)
    assert route(far, out, keys, values, radii, None, "prompt") is out


# --------------------------------------------------------------------------- on models


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("replacement", ["last", "prompt"])
def test_edit_makes_target_the_argmax_and_leaves_the_model_unchanged(family, replacement):
    loaded = tiny_model(family)
    assert rewrite_acc(loaded) == 0.0
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    tree = [(n, id(m)) for n, m in loaded.model.named_modules()]
    edit = edit_of(loaded, replacement=replacement)
    assert [(n, id(m)) for n, m in loaded.model.named_modules()] == tree
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert edit.kind == "memory" and not edit.mergeable and edit.cumulative
    assert list(edit.modules) == [loaded.adapter.mlp_out_name(LAYER)]
    info = edit.meta["cases"][0]
    assert info["action"] == "add" and info["n_keys"] == 1 and info["loss"] < info["loss_start"]
    assert torch.allclose(state_of(edit)["keys"][0], key_of(loaded, EDITED), atol=1e-6)
    edit.apply(loaded.model)
    assert isinstance(loaded.model.get_submodule(loaded.adapter.mlp_out_name(LAYER)), GraceWrapper)
    assert rewrite_acc(loaded) == 1.0
    edit.revert(loaded.model)
    assert rewrite_acc(loaded) == 0.0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_query_outside_every_radius_gives_the_base_logits_bit_for_bit(family):
    loaded = tiny_model(family)
    base, _, _ = row_logits(loaded, OTHERS)
    edit = edit_of(loaded)
    edit.apply(loaded.model)
    after, _, _ = row_logits(loaded, OTHERS)
    changed, _, _ = row_logits(loaded, [EDITED])
    edit.revert(loaded.model)
    assert torch.equal(after, base)
    assert not torch.equal(changed, row_logits(loaded, [EDITED])[0])


def test_conflicting_edit_within_reach_splits_both_radii_to_half_the_distance():
    loaded = tiny_model("llama")
    d = float((key_of(loaded, EDITED) - key_of(loaded, NEAR)).norm())
    eps = 0.75 * d                                     # d <= eps + eps: within reach
    first = edit_of(loaded, EDITED, " of", eps=eps)
    first.apply(loaded.model)
    second = edit_of(loaded, NEAR, " and", eps=eps)    # reads the installed codebook
    first.revert(loaded.model)
    st = state_of(second)
    assert second.meta["cases"][0]["action"] == "split" and st["keys"].shape[0] == 2
    assert torch.allclose(st["radii"], torch.tensor([d / 2, d / 2]), rtol=1e-5)
    ids = lambda t: list(encode_prompt_target(loaded.tokenizer, "x", t).target_ids)  # noqa: E731
    assert st["labels"][0][st["labels"][0] >= 0].tolist() == ids(" of")
    assert st["labels"][1][st["labels"][1] >= 0].tolist() == ids(" and")
    assert torch.equal(st["values"][0], state_of(first)["values"][0])    # the first value is kept
    second.apply(loaded.model)
    assert rewrite_acc(loaded, EDITED, " of") == 1.0 and rewrite_acc(loaded, NEAR, " and") == 1.0
    second.revert(loaded.model)


def test_same_label_within_reach_expands_the_nearest_radius():
    loaded = tiny_model("llama")
    d = float((key_of(loaded, EDITED) - key_of(loaded, NEAR)).norm())
    eps = 0.75 * d                                     # eps < d <= 2 eps: outside the ball, within reach
    first = edit_of(loaded, EDITED, " of", eps=eps)
    first.apply(loaded.model)
    second = edit_of(loaded, NEAR, " of", eps=eps)
    first.revert(loaded.model)
    st = state_of(second)
    assert second.meta["cases"][0]["action"] == "expand" and st["keys"].shape[0] == 1
    assert torch.allclose(st["radii"], torch.tensor([d]), rtol=1e-5)
    assert torch.equal(st["keys"], state_of(first)["keys"])
    second.apply(loaded.model)
    assert rewrite_acc(loaded, EDITED, " of") == 1.0 and rewrite_acc(loaded, NEAR, " of") == 1.0
    second.revert(loaded.model)


def test_same_prompt_other_target_overwrites_its_entry():
    loaded = tiny_model("llama")
    first = edit_of(loaded, EDITED, " of", eps=1.0)
    first.apply(loaded.model)
    second = edit_of(loaded, EDITED, " and", eps=1.0)
    first.revert(loaded.model)
    assert second.meta["cases"][0]["action"] == "overwrite" and state_of(second)["keys"].shape[0] == 1
    second.apply(loaded.model)
    assert rewrite_acc(loaded, EDITED, " and") == 1.0
    second.revert(loaded.model)


def test_sequential_compute_starts_from_the_installed_codebook_and_leaves_it():
    loaded = tiny_model("llama")
    first = edit_of(loaded)
    first.apply(loaded.model)
    path = loaded.adapter.mlp_out_name(LAYER)
    installed = loaded.model.get_submodule(path)
    held = {k: v.clone() for k, v in installed.wrapper_state().items()}
    second = edit_of(loaded, PROMPTS[2], " and")
    assert loaded.model.get_submodule(path) is installed
    assert all(torch.equal(held[k], v) for k, v in installed.wrapper_state().items())
    st = state_of(second)
    assert second.meta["cases"][0]["action"] == "add" and st["keys"].shape[0] == 2
    assert all(torch.equal(st[k][0], held[k][0]) for k in ("keys", "values", "radii"))
    second.apply(loaded.model)        # replaces the installed state (cumulative)
    assert rewrite_acc(loaded) == 1.0 and rewrite_acc(loaded, PROMPTS[2], " and") == 1.0
    second.revert(loaded.model)
    assert loaded.model.get_submodule(path) is installed
    first.revert(loaded.model)
    assert not isinstance(loaded.model.get_submodule(path), EditWrapper)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_revert_is_bit_identical(family):
    loaded = tiny_model(family)
    assert_revert_bit_identical(loaded, edit_of(loaded))


@pytest.mark.parametrize("replacement", ["last", "prompt"])
def test_save_load_same_logits(tmp_path, replacement):
    loaded = tiny_model("qwen2")
    back = assert_save_load_same_logits(loaded, edit_of(loaded, replacement=replacement), tmp_path)
    assert next(iter(back.modules.values())).config["replacement"] == replacement
    assert isinstance(Edit.load(tmp_path / "edit.safetensors"), ModuleEdit)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("replacement", ["last", "prompt"])
def test_padded_batch_routes_per_row(side, replacement):
    loaded = tiny_model("llama")
    prompts = [EDITED, "The Thames flows through the city of London"]   # different lengths: padding
    base, mask, lens = row_logits(loaded, prompts, side)
    edit = edit_of(loaded, replacement=replacement)
    edit.apply(loaded.model)
    batch, _, _ = row_logits(loaded, prompts, side)
    single, _, _ = row_logits(loaded, [EDITED])
    edit.revert(loaded.model)
    assert torch.equal(batch[1][mask[1]], base[1][mask[1]])          # the unedited row: untouched
    assert not torch.equal(batch[0][mask[0]], base[0][mask[0]])
    assert torch.allclose(batch[0][mask[0]], single[0], atol=1e-5, rtol=1e-5)   # the edited row: as alone
    target = loaded.tokenizer(" of")["input_ids"][0]
    assert int(single[0, -1].argmax()) == target


def test_generate_with_the_edit_produces_the_target():
    """Left-padded batch, KV cache: the second edit's key is the first generated token's
    position (a later call of one position), so both edits show only if every call routes."""
    loaded = tiny_model("llama")
    other = "The Thames flows through the city of London"
    before = generate(loaded, [EDITED, other], max_new_tokens=4)
    first = edit_of(loaded, EDITED, " of")
    first.apply(loaded.model)
    second = edit_of(loaded, EDITED + " of", " the")
    second.apply(loaded.model)
    after = generate(loaded, [EDITED, other], max_new_tokens=4)
    alone = generate(loaded, [EDITED], max_new_tokens=4)
    second.revert(loaded.model)
    first.revert(loaded.model)
    assert state_of(second)["keys"].shape[0] == 2
    assert after[0].startswith(" of the") and not before[0].startswith(" of the")
    assert after[1] == before[1] and alone[0] == after[0]
    assert generate(loaded, [EDITED, other], max_new_tokens=4) == before


def test_sequential_resume_equals_uninterrupted(tmp_path, monkeypatch):
    metrics = check_sequential_resume(tmp_path, monkeypatch, "grace",
                                      {"layer": LAYER, "n_iter": 15, "eps": 1e-4}, Grace)
    assert metrics["post"]["rewrite_acc"] == 1.0


def test_registered_and_hparams_file():
    assert get_method("grace") is Grace and Grace.kind == "memory"
    path = configs_dir() / "methods" / "grace" / "smollm2-135m.yaml"
    p = load_params(GraceParams, path)
    assert p.dist_fn == "euc" and p.lr == 1.0 and p.replacement in ("last", "prompt")
    with pytest.raises(Exception, match="eps"):
        build_params(GraceParams, {"eps": 0}, "test")
