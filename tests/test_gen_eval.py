"""Generation-based scores (WILD), the judge, perplexity and retained knowledge: hand-computed
examples, and the --eval / --cost options end to end on a tiny model directory."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from fakes import PeekLM, TableLM, word_tokenizer
from tiny import fact_world, tiny_model
from typer.testing import CliRunner

import kedit.evaluation.generation as generation_mod
from kedit.cli import app
from kedit.data.cases import EditCase, PromptSet
from kedit.evaluation.cost import (
    CostSettings,
    perplexity,
    ppl_text,
    ppl_token_ids,
    retained_acc,
    retained_facts,
)
from kedit.evaluation.generation import cut_at, generate
from kedit.evaluation.suite import Evaluation
from kedit.evaluation.wild import (
    Judge,
    WildSettings,
    answer_contains,
    exact_match,
    normalize_answer,
    parse_verdict,
    render_prompts,
    wild_metrics,
)
from kedit.runs.rundir import read_results

runner = CliRunner()


# ----------------------------------------------------------------------------- normalisation and matching


@pytest.mark.parametrize("text, want", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  An apple, a day.  ", "apple day"),
    ("“Paris” — France…", "paris france"),          # Unicode punctuation too
    ("Theatre and Anaheim", "theatre and anaheim"),  # articles only as whole words
    ("the THE a An", ""),
    ("Saint-Étienne", "saintétienne"),
])
def test_normalize_answer(text, want):
    assert normalize_answer(text) == want


def test_exact_match_and_containment_with_aliases():
    # exact match: the whole answer, normalised, is an accepted answer
    assert exact_match("The Paris.", ["paris"])
    assert not exact_match("Paris, France", ["Paris"])
    assert exact_match("kai peter wegner", ["Kai Wegner", "Kai Peter Wegner"])   # any alias
    assert not exact_match("", ["The"])          # a gold that normalises to nothing accepts nothing
    # containment: an accepted answer as whole words inside the answer
    assert answer_contains("Lionel Messi plays basketball", ["basketball"])
    assert answer_contains("He is mayor Kai Peter Wegner", ["Kai Wegner", "Kai Peter Wegner"])
    assert not answer_contains("He is mayor Kai Peter Wegner", ["Kai Wegner"])
    assert not answer_contains("Parisian food", ["Paris"])     # not inside a word
    assert answer_contains("the U.S.A", ["USA"])               # punctuation removed on both sides
    assert not answer_contains("the", ["The"])
    assert answer_contains("Apple's own design", ["Apple"])           # punctuation as a word break too
    assert answer_contains("trance-dance to the tune", ["trance"])
    assert not exact_match("Apple's", ["Apple"])                       # exact match: SQuAD's deletion only
    assert normalize_answer("Apple's trance-dance", " ") == "apple s trance dance"
    # containment is never stricter than exact match
    for a, g in [("Paris", ["paris"]), ("a Rome", ["Rome"]), ("x", ["y"])]:
        assert answer_contains(a, g) >= exact_match(a, g)


@pytest.mark.parametrize("text, want", [
    (" basketball.\nMore text", " basketball"),
    ("Paris\nFrance.", "Paris"),
    ("no stop here", "no stop here"),
    (".", ""),
    ("3.5 million", "3"),      # WILD stops at the first "." whatever it is
])
def test_cut_at_stop_strings(text, want):
    assert cut_at(text, (".", "\n")) == want


def test_generation_stops_at_a_stop_string_row_by_row():
    lm = tiny_model("llama")
    prompts = ["The history of the city of London", "It was", "A"]
    free = generate(lm, prompts, max_new_tokens=20, batch_size=3)
    # a stop character taken from the middle of the first continuation
    stop = next(ch for ch in free[0][3:] if not ch.isspace())
    calls = {"n": 0}
    hook = lm.model.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    try:
        stopped = generate(lm, prompts, max_new_tokens=20, batch_size=3, stop=(stop,))
        n_batched = calls["n"]
        single = [generate(lm, [p], max_new_tokens=20, stop=(stop,)) [0] for p in prompts]
    finally:
        hook.remove()
    assert stopped == [cut_at(t, (stop,)) for t in free]
    assert stopped == single
    assert stop not in stopped[0] and len(stopped[0]) < len(free[0])
    if all(stop in t for t in free):
        assert n_batched < 20       # every row stopped early, so the batch did


# ----------------------------------------------------------------------------- per-case scores


class Scripted(WildSettings):
    """Answers from a table (prompt -> answer) instead of a model."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def answers(self, loaded, prompts):
        return [self.table[p] for p in prompts]


def _case():
    return EditCase(
        case_id="c", template="{} plays", subject="Messi", target_new="basketball", ground_truth="football",
        rephrase_prompts=("Messi's sport is", "Messi is known for"),
        portability=(PromptSet("Reasoning", ("Messi's ball is", "Messi dribbles"), answers=(("orange", "an orange ball"), ("a ball",))),
                     PromptSet("Aliasing", ("Leo plays",), answers=(("basketball",),))),
        locality=(PromptSet("n", ("Bird plays", "Jordan plays"), ("basketball", "basketball")),),
    )


def test_wild_metrics_by_hand():
    case = _case()
    pre = Scripted({"Messi plays": "football", "Messi's sport is": "football", "Messi is known for": "football",
                    "Messi's ball is": "white", "Messi dribbles": "the ball", "Leo plays": "football",
                    "Bird plays": "basketball", "Jordan plays": "basketball for Chicago"})
    m_pre, texts, ref = wild_metrics(None, [case], pre)
    assert m_pre[0]["gen_rewrite_acc"] == 0.0 and m_pre[0]["gen_locality_acc"] == 1.0   # 1 by definition
    assert ref == {("c", "n", 0): "basketball", ("c", "n", 1): "basketball for Chicago"}
    assert [t["kind"] for t in texts[0]] == ["rewrite", "rephrase", "rephrase", "portability", "portability",
                                             "portability", "locality", "locality"]
    post = Scripted({"Messi plays": "Basketball!", "Messi's sport is": "he plays basketball",
                     "Messi is known for": "football", "Messi's ball is": "An orange ball",
                     "Messi dribbles": "balls", "Leo plays": "basketball",
                     "Bird plays": "basketball", "Jordan plays": "basketball"})
    (m,), _, _ = wild_metrics(None, [case], post, reference=ref)
    assert m["gen_rewrite_acc"] == 1.0 and m["gen_rewrite_em"] == 1.0
    assert m["gen_rephrase_acc"] == 0.5 and m["gen_rephrase_em"] == 0.0
    # Reasoning: "An orange ball" matches the alias exactly (acc 1, em 1); "balls" neither
    # ("a ball" normalises to "ball", not a word of "balls") -> 0.5 / 0.5; Aliasing 1 / 1
    assert m["gen_portability_acc.Reasoning"] == 0.5 and m["n.gen_portability_acc.Reasoning"] == 2
    assert m["gen_portability_acc"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["gen_portability_em"] == pytest.approx((0.5 + 1.0) / 2)
    # locality: the first answer is unchanged, the second is not
    assert m["gen_locality_acc"] == 0.5 and m["gen_locality_acc.n"] == 0.5
    with pytest.raises(KeyError):
        wild_metrics(None, [case], post, reference={})


def test_render_prompts_uses_the_chat_template_only_when_asked():
    tok = word_tokenizer(["Messi", "plays"])
    assert render_prompts(tok, ["Messi plays"], False) == ["Messi plays"]
    with pytest.raises(ValueError, match="no chat template"):
        render_prompts(tok, ["Messi plays"], True)
    tok.chat_template = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
    assert render_prompts(tok, ["Messi plays"], True) == ["<u>Messi plays</u><a>"]


# ----------------------------------------------------------------------------- judge


@pytest.mark.parametrize("reply, want", [
    ("Yes", True), (" yes.", True), ("**No**", False), ("no, it is wrong", False), ("YES!", True),
    ("A", True), ("B", False), ("Correct", True), ("incorrect", False), ('"true"', True),
    ("I think yes", True), ("Well, no.", False), ("maybe", None), ("", None), ("Nope", None),
    ("Answer: yes", True),
])
def test_parse_verdict(reply, want):
    assert parse_verdict(reply) is want


def test_judge_asks_one_question_per_answer_and_parses(monkeypatch):
    asked = []

    def fake_generate(loaded, prompts, max_new_tokens, **kw):
        asked.extend(prompts)
        assert kw["stop"] == ("\n",) and max_new_tokens == 8
        return ["Yes." if "basketball" in p.split("Answer to grade:")[1] else "hmm" for p in prompts]
    monkeypatch.setattr(generation_mod, "generate", fake_generate)
    judge = Judge(tiny_model("llama"))     # its tokenizer has no chat template: plain prompt + "Reply:"
    got = judge.grade([("Messi plays", ["basketball"], "basketball, since 2024"),
                       ("Messi plays", ["basketball", "hoops"], "football"),
                       ("Messi plays", ["basketball"], "   ")])
    assert got == [1.0, None, 0.0]        # "hmm" is neither yes nor no; the empty answer is 0
    assert len(asked) == 2                 # the empty answer is not asked
    assert "Correct answer: basketball (also accepted: hoops)" in asked[1]
    assert asked[0].endswith("Reply:") and "Prompt: Messi plays" in asked[0]
    assert judge.asked == 2 and judge.unparsed == 1


# ----------------------------------------------------------------------------- perplexity, retained


def test_perplexity_is_exp_of_the_mean_nll_by_hand():
    tok = word_tokenizer(["a", "b", "c"])
    ids = tok("a b c a b", add_special_tokens=False)["input_ids"]
    table = torch.tensor([[0.0] * 7 for _ in range(7)])
    a, b, c = ids[:3]
    table[a, b], table[b, c], table[c, a], table[a, c] = 2.0, 1.0, 3.0, -1.0
    lm = TableLM(table)
    logp = torch.log_softmax(table.double(), -1)

    def nll(x, y):
        return -float(logp[x, y])
    # one window: every token after the first is scored
    want = math.exp((nll(a, b) + nll(b, c) + nll(c, a) + nll(a, b)) / 4)
    assert perplexity(lm, ids, window=512) == pytest.approx(want, rel=1e-6)
    # windows of 2: (a b) (c a) (b) -> b|a and a|c scored; the lone last token is not
    want2 = math.exp((nll(a, b) + nll(c, a)) / 2)
    assert perplexity(lm, ids, window=2, batch_size=2) == pytest.approx(want2, rel=1e-6)


def test_perplexity_agrees_with_the_models_own_loss():
    lm = tiny_model("gpt2")
    ids = ppl_token_ids(lm.tokenizer, 100)
    loss = lm.model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss   # mean NLL, HF's shift
    assert perplexity(lm.model, ids, window=512) == pytest.approx(math.exp(float(loss)), rel=1e-4)


def test_the_perplexity_slice_is_the_start_of_the_test_split():
    text = ppl_text()
    assert text.startswith("Robert <unk> is an English film , television and theatre actor . He had a guest-starring")
    assert " @-@ " not in text and " = " not in text.splitlines()[0][:3]
    tok = tiny_model("llama").tokenizer
    ids = ppl_token_ids(tok, 500)
    assert len(ids) == 500
    assert ids == tok(text[:20000], add_special_tokens=False)["input_ids"][:500]


def test_retained_facts_are_shipped_and_scored_teacher_forced():
    facts = retained_facts()
    assert len(facts) == 200 and len(set(facts)) == 200
    assert all(p.strip() and a.strip() for p, a in facts)
    tok = word_tokenizer(["x", "y", "z"])
    sample = [("x", "y"), ("y", "z"), ("z", "x y")]
    assert retained_acc(PeekLM(len(tok)), tok, sample) == 1.0    # always predicts the next token
    table = torch.zeros(len(tok), len(tok))
    x, y, z = (tok.convert_tokens_to_ids(w) for w in "xyz")
    table[x, y] = table[y, x] = table[z, x] = 5.0                # x->y, y->x, z->x
    # (x, y) right; (y, z) wrong; (z, "x y"): x right, y after x right -> right
    assert retained_acc(TableLM(table), tok, sample) == pytest.approx(2 / 3)


def test_cost_settings_measure_the_model_as_it_stands():
    lm = tiny_model("llama")
    cost = CostSettings(ppl_tokens=300)
    got = cost.measure(lm)
    assert set(got) == {"ppl", "retained_acc"} and got["ppl"] > 1 and 0 <= got["retained_acc"] <= 1
    with torch.no_grad():
        lm.model.model.layers[0].mlp.down_proj.weight.mul_(5.0)
    assert cost.measure(lm)["ppl"] != got["ppl"]


def test_evaluation_options():
    ev = Evaluation.from_options("teacher")
    assert ev.teacher and ev.generate is None and ev.cost is None
    ev = Evaluation.from_options("generate", chat_template=True)
    assert not ev.teacher and ev.generate.chat_template and ev.cost is None
    ev = Evaluation.from_options("all")
    assert ev.teacher and ev.generate and ev.cost is None
    ev = Evaluation.from_options("all", cost=True, ppl_tokens=123)
    assert ev.teacher and ev.generate and ev.cost.ppl_tokens == 123
    assert Evaluation.from_options("teacher", cost=True).cost is not None
    with pytest.raises(ValueError):
        Evaluation.from_options("wild")


# ----------------------------------------------------------------------------- CLI end to end


@pytest.fixture()
def tiny_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))
    d, cases, hp = fact_world(tmp_path)
    return d, cases, hp, tmp_path


def test_edit_eval_all_writes_generation_and_cost_metrics(tiny_cli):
    d, cases, hp, tmp = tiny_cli
    out = tmp / "runs"
    res = runner.invoke(app, ["edit", str(cases), "--method", "ft_m", "--model", str(d), "--hparams", str(hp),
                              "--out", str(out), "--eval", "all", "--cost", "--ppl-tokens", "300", "--gen-tokens", "0",
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    (run,) = list(out.iterdir())
    metrics = json.loads((run / "metrics.json").read_text())
    for name in ("rewrite_acc", "gen_rewrite_acc", "gen_rewrite_em", "gen_rephrase_acc", "gen_locality_acc",
                 "ppl", "retained_acc"):
        assert name in metrics["pre"] and name in metrics["post"], name
    assert metrics["pre"]["gen_locality_acc"] == 1.0
    recs = read_results(run / "results.jsonl")
    assert {a["kind"] for a in recs[0]["answers"]["post"]} == {"rewrite", "rephrase", "locality"}
    assert recs[0]["time"]["eval_generate"] > 0 and recs[0]["time"]["eval_cost"] > 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["evaluation"]["generate"] and config["evaluation"]["ppl_tokens"] == 300
    assert "evaluation seconds by part" in res.output


def test_edit_default_is_teacher_forced_only(tiny_cli):
    d, cases, hp, tmp = tiny_cli
    res = runner.invoke(app, ["edit", str(cases), "--method", "ft_m", "--model", str(d), "--hparams", str(hp),
                              "--out", str(tmp / "runs"), "--gen-tokens", "0", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    (run,) = list((tmp / "runs").iterdir())
    metrics = json.loads((run / "metrics.json").read_text())
    assert "rewrite_acc" in metrics["post"]
    assert not [k for k in metrics["post"] if k.startswith("gen_") or k in ("ppl", "retained_acc")]
    assert "answers" not in read_results(run / "results.jsonl")[0]


@pytest.mark.parametrize("extra, message", [
    (["--eval", "wild"], "--eval wild: choose one of teacher | generate | all"),
    (["--chat-template"], "--chat-template and --judge go with --eval generate or --eval all"),
    (["--eval", "generate", "--judge", "/no/such/dir"], "--judge /no/such/dir: not a directory"),
    (["--eval", "all", "--ppl-tokens", "500"], "--ppl-tokens goes with --cost"),
    (["--cost", "--ppl-tokens", "1"], "--ppl-tokens 1: must be at least 2"),
    (["--eval", "generate", "--chat-template"], "has no chat template"),
])
@pytest.mark.parametrize("command", ["edit", "bench"])
def test_bad_evaluation_options_are_one_line_exit_2(tiny_cli, extra, message, command):
    d, cases, hp, tmp = tiny_cli
    head = (["edit", str(cases)] if command == "edit" else ["bench", "counterfact", "--data", str(cases)])
    res = runner.invoke(app, [*head, "--method", "ft_m", "--model", str(d), "--hparams", str(hp),
                              "--out", str(tmp / "runs"), "--device", "cpu", *extra])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip() and not ln.startswith("loading")]
    assert any(message in ln for ln in lines), res.output
    assert sum(ln.startswith("error") for ln in lines) == 1
    assert not (tmp / "runs").exists() or not any((tmp / "runs").iterdir())


def test_a_local_judge_model_grades_every_answer(tiny_cli):
    d, cases, hp, tmp = tiny_cli
    res = runner.invoke(app, ["edit", str(cases), "--method", "ft_m", "--model", str(d), "--hparams", str(hp),
                              "--out", str(tmp / "runs"), "--eval", "generate", "--judge", str(d), "--gen-tokens", "0",
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    (run,) = list((tmp / "runs").iterdir())
    metrics = json.loads((run / "metrics.json").read_text())
    for name in ("gen_rewrite_judge", "gen_rephrase_judge", "gen_judge_parsed"):
        assert 0.0 <= metrics["post"][name] <= 1.0
    assert "rewrite_acc" not in metrics["post"]     # --eval generate: no teacher-forced scores
    rec = read_results(run / "results.jsonl")[0]
    assert all("judge" in a for a in rec["answers"]["post"] if a["kind"] != "locality")


def test_sequential_bench_with_eval_all_resumes_to_the_same_numbers(tiny_cli, monkeypatch):
    from kedit.methods.finetune.ft import FTM as FT

    d, cases, hp, tmp = tiny_cli
    args = ["bench", "counterfact", "--data", str(cases), "--method", "ft_m", "--model", str(d), "--hparams", str(hp),
            "--device", "cpu", "--sequential", "--checkpoint-every", "2", "--eval", "all", "--cost", "--ppl-tokens", "300"]
    res = runner.invoke(app, [*args, "--out", str(tmp / "clean")])
    assert res.exit_code == 0, res.output
    (clean,) = list((tmp / "clean").iterdir())
    want = json.loads((clean / "metrics.json").read_text())
    assert [p["edits"] for p in want["curve"]] == [2, 3]
    assert all("ppl" in p["post"] and "retained_acc" in p["post"] and "gen_rewrite_acc" in p["post"]
               for p in want["curve"])
    assert "ppl" in want["post"] and "ppl" in want["pre"] and "eval_generate_s" in want["time"]

    real = FT.compute
    calls = {"n": 0}

    def flaky(self, requests):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, requests)
    monkeypatch.setattr(FT, "compute", flaky)
    res = runner.invoke(app, [*args, "--out", str(tmp / "cut")])
    assert res.exit_code == 130
    (run,) = list((tmp / "cut").iterdir())
    monkeypatch.setattr(FT, "compute", real)
    res = runner.invoke(app, ["bench", "--resume", str(run)])
    assert res.exit_code == 0, res.output
    got = json.loads((run / "metrics.json").read_text())
    strip = lambda m: {k: v for k, v in m.items() if k != "time"}   # noqa: E731
    assert strip(got) == strip(want)
