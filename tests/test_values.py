"""The shared target optimiser: replaying the residual stream below the edited block
gives the same targets as running the whole model at every step."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kedit.methods.base import EditRequest
from kedit.methods.core.values import TargetOptions, block_index, optimise_targets
from tiny import FAMILIES, tiny_model

REQUESTS = [EditRequest("a", "{} is located in the city of", "The Eiffel Tower", " Rome", " Paris"),
            EditRequest("b", "The mother tongue of {} is", "Danielle Darrieux", " English", " French")]
TEMPLATES = ["{}", "It was a day. {}", "The rain fell on the roofs of the town. {}"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("where", ["mlp_out", "block"])
def test_replaying_lower_blocks_changes_nothing(family, where):
    loaded = tiny_model(family)
    adapter = loaded.adapter
    module = adapter.mlp_out(1) if where == "mlp_out" else adapter.block(1)
    opts = TargetOptions(steps=4, lr=0.5, early_stop_loss=0.0)
    calls = {"bottom": 0, "top": 0}

    def count(name):
        return lambda *_: calls.__setitem__(name, calls[name] + 1)

    hooks = [adapter.mlp(0).register_forward_hook(count("bottom")),
             adapter.mlp(adapter.n_layers - 1).register_forward_hook(count("top"))]
    try:
        fast = optimise_targets(loaded, REQUESTS, TEMPLATES, module, "subject_last", opts)
        runs_fast, top_fast = calls["bottom"], calls["top"]
        calls.update(bottom=0, top=0)
        slow = optimise_targets(loaded, REQUESTS, TEMPLATES, module, "subject_last",
                                dataclasses.replace(opts, replay=False))
        runs_slow, top_slow = calls["bottom"], calls["top"]
    finally:
        for h in hooks:
            h.remove()
    # block 0 ran once (the initial pass) vs in every forward of every step
    assert top_fast == top_slow >= opts.steps + 1
    assert runs_fast == 1 and runs_slow == top_slow
    assert torch.allclose(fast.delta, slow.delta, atol=1e-5, rtol=1e-4)
    assert fast.steps == slow.steps
    assert fast.nll == pytest.approx(slow.nll, rel=1e-4, abs=1e-6)
    # the blocks' own forward is back after the replay
    assert "forward" not in vars(adapter.block(0))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("where", ["mlp_out", "block"])
@pytest.mark.parametrize("replay", [True, False])
def test_prefix_cache_runs_fewer_positions_for_the_same_targets(family, where, replay):
    """Steps that run only the positions from the fact token on (attending to the prefix's
    cached keys/values) give the targets of full forwards."""
    loaded = tiny_model(family)
    adapter = loaded.adapter
    module = adapter.mlp_out(1) if where == "mlp_out" else adapter.block(1)
    opts = TargetOptions(steps=4, lr=0.5, early_stop_loss=0.0, replay=replay)
    lengths: list[int] = []
    h = adapter.block(adapter.n_layers - 1).register_forward_hook(
        lambda _m, args, _o: lengths.append(args[0].shape[1]) if args else None, with_kwargs=False)
    try:
        fast = optimise_targets(loaded, REQUESTS, TEMPLATES, module, "subject_last", opts)
        seen_fast = list(lengths)
        lengths.clear()
        slow = optimise_targets(loaded, REQUESTS, TEMPLATES, module, "subject_last",
                                dataclasses.replace(opts, prefix_cache=False))
        seen_slow = list(lengths)
    finally:
        h.remove()
    assert seen_fast[0] == seen_slow[0]                       # the initial pass runs whole rows
    assert max(seen_fast[1:]) < min(seen_slow[1:]) / 2       # the steps run the suffixes only
    assert torch.allclose(fast.delta, slow.delta, atol=1e-5, rtol=1e-4)
    assert fast.steps == slow.steps
    assert fast.nll == pytest.approx(slow.nll, rel=1e-4, abs=1e-6)
    assert fast.loss == pytest.approx(slow.loss, rel=1e-4, abs=1e-6)


def test_block_index_finds_the_enclosing_block():
    loaded = tiny_model("llama")
    a = loaded.adapter
    assert block_index(a, a.mlp_out(1)) == 1 and block_index(a, a.block(0)) == 0
    with pytest.raises(ValueError):
        block_index(a, a.final_norm())



def test_early_stop_on_nll_or_on_the_whole_loss():
    """``early_stop_on="nll"`` stops a request once its target NLL is below the threshold;
    ``"total"`` (the reference code's criterion) waits for NLL + KL + weight decay, so
    where the decay term keeps the whole loss above the threshold it runs every step.
    (Random tiny models give flat next-token distributions, so the threshold sits where
    the NLL of this subject-final prompt gets within the run, not near zero.)"""
    loaded = tiny_model("llama")
    request = [EditRequest("c", "Paris is the capital city of {}", "the Kingdom of France", " of", " and")]
    module = loaded.adapter.mlp_out(1)
    opts = TargetOptions(steps=40, lr=0.5, early_stop_loss=6.0, weight_decay=1e-4, kl_factor=0.0,
                         clamp_norm_factor=1000.0)
    on_nll = optimise_targets(loaded, request, TEMPLATES, module, "subject_last", opts)
    on_total = optimise_targets(loaded, request, TEMPLATES, module, "subject_last",
                                dataclasses.replace(opts, early_stop_on="total"))
    # stopped on the NLL early, while the whole loss was still above the threshold ...
    assert on_nll.steps[0] < opts.steps - 1 and on_nll.nll[0] < opts.early_stop_loss < on_nll.loss[0]
    # ... which "total" does not accept: it runs every step
    assert on_total.steps[0] == opts.steps - 1 and on_total.loss[0] > opts.early_stop_loss
    assert not torch.equal(on_total.delta, on_nll.delta)


def test_step_chunks_group_rows_by_suffix_length():
    """A step runs rows from their fact token on; rows are grouped by that length so no chunk
    pads a one-token KL row to a ten-token rewrite row (unless the model has sliding windows)."""
    from kedit.methods.core.keys import Row
    from kedit.methods.core.values import _step_chunks

    rows = [Row(0, tuple(range(8)), 5), Row(0, tuple(range(6)), 5), Row(1, tuple(range(9)), 6),
            Row(1, tuple(range(12)), 4), Row(1, tuple(range(7)), 6)]       # suffixes 3, 1, 3, 8, 1
    opts = TargetOptions()
    grouped = [ids for _, ids in _step_chunks(rows, [0, 1, 2, 3, 4], opts, by_length=True)]
    assert grouped == [[1, 4], [0, 2], [3]]
    for chunk, ids in _step_chunks(rows, [0, 1, 2, 3, 4], opts, by_length=True):
        assert len({len(r.ids) - r.lookup for r in chunk}) == 1 and [rows[j] for j in ids] == chunk
    assert [ids for _, ids in _step_chunks(rows, [0, 2, 3], opts, by_length=False)] == [[0, 2, 3]]
    small = dataclasses.replace(opts, batch_tokens=16)     # a group is still cut to the budget (2 x 9 > 16)
    assert [ids for _, ids in _step_chunks(rows, [0, 2], small, by_length=True)] == [[0], [2]]
