"""kedit's greedy decoding loop gives the ids transformers' ``generate`` gives: left-padded
batches whose rows end at different steps (EOS or a stop token), on several model families,
and with every kind of edit installed -- memories that route per position (GRACE) or per row
and keep that route over cached steps (WISE, SERAC), and a context before the prompt."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

from kedit.config import build_params
from kedit.data.cases import EditRequest
from kedit.evaluation.decode import end_ids, greedy_decode
from kedit.evaluation.generation import _stopping
from kedit.methods.base import RunContext
from kedit.methods.learned.serac import SeracWrapper
from kedit.methods.memory.wise import WiseWrapper
from kedit.methods.registry import get_method
from kedit.models.tokens import pad_batch

PROMPTS = ["The", "The history of the city of London", "Paris is the capital city of the Kingdom of France",
           "A", "The river flows"]
NEW = 12


def batch(loaded, prompts):
    seqs = [loaded.tokenizer(p)["input_ids"] for p in prompts]
    ids, mask, _ = pad_batch(seqs, loaded.tokenizer.pad_token_id, side="left")
    return ids, mask


def hf_generate(loaded, ids, mask, stop):
    options = {"stopping_criteria": _stopping(stop)} if stop.numel() else {}
    with torch.inference_mode():
        out = loaded.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                    num_beams=1, pad_token_id=loaded.tokenizer.pad_token_id, repetition_penalty=1.0,
                                    top_p=1.0, top_k=None, temperature=1.0, **options)
    return out[:, ids.shape[1]:]


def ours(loaded, ids, mask, stop):
    with torch.inference_mode():
        return greedy_decode(loaded.model, ids, mask, NEW, stop_ids=stop, pad_id=loaded.tokenizer.pad_token_id)


def staggered_stop(loaded, ids, mask, running=()) -> torch.Tensor:
    """A stop id that ends the rows at different steps (the first token of the free
    generation that does), and none of the rows in ``running``."""
    free = ours(loaded, ids, mask, torch.zeros(0, dtype=torch.long)).tolist()
    for t in dict.fromkeys(t for row in free for t in row):
        ends = [row.index(t) if t in row else len(row) for row in free]
        if len(set(ends)) > 1 and all(ends[r] == len(free[r]) for r in running):
            return torch.tensor([t], dtype=torch.long)
    raise AssertionError("no token ends the rows at different steps")


def assert_same_as_generate(loaded, prompts=PROMPTS, running=()):
    ids, mask = batch(loaded, prompts)
    stop = staggered_stop(loaded, ids, mask, running)
    got = ours(loaded, ids, mask, stop)
    want = hf_generate(loaded, ids, mask, stop)
    assert torch.equal(got, want)
    ended = [int(((row == loaded.tokenizer.pad_token_id).cumsum(0) == 0).sum()) for row in got]
    assert len(set(ended)) > 1 and min(ended) < got.shape[1]     # rows left the batch at different steps
    return got


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_same_ids_as_generate_with_padding_and_staggered_stops(family):
    assert_same_as_generate(tiny_model(family))


def test_eos_ends_a_row(monkeypatch):
    loaded = tiny_model("llama")
    ids, mask = batch(loaded, PROMPTS)
    free = ours(loaded, ids, mask, torch.zeros(0, dtype=torch.long))
    eos = int(free[1, 2])                    # say the model's EOS is a token row 1 makes
    monkeypatch.setattr(loaded.model.generation_config, "eos_token_id", eos)
    assert end_ids(loaded.model) == [eos]
    got = ours(loaded, ids, mask, torch.zeros(0, dtype=torch.long))
    assert torch.equal(got, hf_generate(loaded, ids, mask, torch.zeros(0, dtype=torch.long)))
    first = free[1].tolist().index(eos)
    assert got[1, : first + 1].tolist() == free[1, : first + 1].tolist()
    assert (got[1, first + 1:] == loaded.tokenizer.pad_token_id).all()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))


def _edit(loaded, name, settings, request):
    cls = get_method(name)
    return cls(loaded, build_params(cls.Params, settings, "test"), RunContext(seed=0, progress=False)).compute([request])


def test_grace_routes_the_same_during_decoding(home):
    loaded = tiny_model("llama")
    request = EditRequest("c", "{}", "The river flows", " of", " the")
    edit = _edit(loaded, "grace", {"layer": 1, "n_iter": 40, "eps": 1e-4}, request)
    plain = ours(loaded, *batch(loaded, PROMPTS), torch.zeros(0, dtype=torch.long))
    edit.apply(loaded.model)
    try:
        got = assert_same_as_generate(loaded)
    finally:
        edit.revert(loaded.model)
    assert int(got[4, 0]) == loaded.tokenizer(" of", add_special_tokens=False)["input_ids"][0]
    assert not torch.equal(got[4], plain[4])


def test_wise_keeps_each_rows_route_when_rows_leave(home, monkeypatch):
    loaded = tiny_model("llama")
    request = EditRequest("c1", "Paris is the capital city of {}", "the Kingdom of France", " of", " and")
    edit = _edit(loaded, "wise", {"layer": 1, "edit_lr": 30.0, "n_iter": 25, "act_margin": [0.5, 3.0, 2.0],
                                   "norm_constraint": None, "context_template_length_params": [[3, 2]]}, request)
    edit.apply(loaded.model)
    decided = []
    thresholds = WiseWrapper.thresholds
    monkeypatch.setattr(WiseWrapper, "thresholds", lambda self: decided.append(1) or thresholds(self))
    try:
        got = assert_same_as_generate(loaded, running=(2,))       # the edited prompt's row goes on
        # the route is decided on the prompt, once, and kept for the rows that go on
        assert len(decided) == 3                   # once per prompt batch: the free run, ours, generate()
        monkeypatch.setattr(WiseWrapper, "keep_rows", lambda self, index: None)
        decided.clear()
        ids, mask = batch(loaded, PROMPTS)
        ours(loaded, ids, mask, staggered_stop(loaded, ids, mask, (2,)))
        assert len(decided) > 2                                     # without keep_rows: decided anew
    finally:
        edit.revert(loaded.model)
    assert got[2, 0] == loaded.tokenizer(" of", add_special_tokens=False)["input_ids"][0]


def test_serac_and_context_edits_decode_the_same(home):
    from test_edit_kinds import context_edit
    from test_serac import routing, untrained_edit

    loaded = tiny_model("llama")
    for edit in (routing(untrained_edit(loaded, scale=3.0), everything=True), context_edit(loaded)):
        edit.apply(loaded.model)
        try:
            got = assert_same_as_generate(loaded)
            ids, mask = batch(loaded, PROMPTS)
            ours(loaded, ids, mask, staggered_stop(loaded, ids, mask))    # its state after our loop
            # SERAC routes on the whole sequence so far: the rows that went on keep their history
            for w in (m for m in loaded.model.modules() if isinstance(m, SeracWrapper)):
                last = [i for i in range(len(PROMPTS)) if got[i, -1] != loaded.tokenizer.pad_token_id]
                assert len(w._hist) == len(last) < len(PROMPTS)
                for h, i in zip(w._hist, last):
                    assert h == loaded.tokenizer(PROMPTS[i])["input_ids"] + got[i, :-1].tolist()
        finally:
            edit.revert(loaded.model)


def test_wise_keeps_the_route_for_a_batch_without_padding(home, monkeypatch):
    # generate() drops an attention mask of all ones (transformers >= 5.2x), and a wrapper
    # that gets no mask cannot tell a cached step from a new sequence; the loop always passes
    # the mask, so a prompt alone decodes as it does in a padded batch
    from kedit.evaluation.generation import generate

    loaded = tiny_model("llama")
    request = EditRequest("c1", "Paris is the capital city of {}", "the Kingdom of France", " of", " and")
    edit = _edit(loaded, "wise", {"layer": 1, "edit_lr": 30.0, "n_iter": 25, "act_margin": [0.5, 3.0, 2.0],
                                   "norm_constraint": None, "context_template_length_params": [[3, 2]]}, request)
    prompt = "Paris is the capital city of the Kingdom of France"
    decided = []
    thresholds = WiseWrapper.thresholds
    monkeypatch.setattr(WiseWrapper, "thresholds", lambda self: decided.append(1) or thresholds(self))
    edit.apply(loaded.model)
    try:
        (alone,) = generate(loaded, [prompt], max_new_tokens=6)
        assert len(decided) == 1                      # decided on the prompt, kept for the 5 cached steps
        assert generate(loaded, [prompt, "The"], max_new_tokens=6)[0] == alone
    finally:
        edit.revert(loaded.model)
