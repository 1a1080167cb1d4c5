"""ROME on the embedded SmolLM2-135M: the seed example flips, locality holds, weights come back."""

from __future__ import annotations

import pytest
import torch

from kedit.api import edit
from kedit.data.cases import load_cases
from kedit.evaluation import evaluate_cases
from kedit.models.load import load_model


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m", device="cpu", progress=lambda s: None)


def test_messi_plays_basketball_after_rome(smol, tmp_path_factory):
    cases = load_cases("cases/messi.jsonl")
    before = {k: v.clone() for k, v in smol.model.state_dict().items()}
    # the shipped hyperparameters; fewer corpus texts keep the statistics quick in a test
    result = edit(smol, cases, "rome", stats_dir=str(tmp_path_factory.mktemp("stats")), mom2_samples=200)
    rec = result.records[0]
    assert rec["pre"]["rewrite_acc"] == 0.0 and rec["post"]["rewrite_acc"] == 1.0
    assert rec["post"]["efficacy_success"] == 1.0          # P(basketball) > P(football) on the prompt
    assert rec["post"]["paraphrase_success"] == 1.0        # ... and on its rephrase
    assert rec["post"]["locality_acc"] == 1.0              # Larry Bird, the Colosseum: same argmaxes
    assert rec["post"]["neighborhood_success"] == 1.0      # P(Rome) > P(basketball) still
    # the model handed in is back to its weights, bit for bit
    assert all(torch.equal(before[k], v) for k, v in smol.model.state_dict().items())
    # and the edit can be re-applied: the answer really changes, then reverts
    delta = result.deltas["seed-messi"]
    delta.apply(smol.model)
    post, _ = evaluate_cases(smol.model, smol.tokenizer, cases)
    delta.revert(smol.model)
    assert post[0]["rewrite_acc"] == 1.0
    assert all(torch.equal(before[k], v) for k, v in smol.model.state_dict().items())
