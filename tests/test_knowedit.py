"""KnowEdit and portability: the readers of every layout (alias lists, nested alias lists,
empty portability, missing ground truth, WikiBio, EasyEdit's portability files), one-line
errors, the per-kind metrics on hand-computed examples, the bench subsets, KnowEdit's
fluency and ``kedit report --table knowedit``."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
import yaml
from fakes import TableLM, word_tokenizer
from tiny import save_tiny_model_dir, tiny_model
from typer.testing import CliRunner

from kedit.cli import app
from kedit.data.cases import CasesError, PromptSet, case_from_dict, load_cases, validate_cases, write_cases
from kedit.evaluation import aggregate, evaluate_cases
from kedit.evaluation.fluency import fixed_length_samples, generation_metrics
from kedit.runs.bench import BenchError, get_benchmark, load_benchmark
from kedit.runs.report import knowedit_table, published_knowedit, render_knowedit, summarize
from kedit.runs.rundir import read_results
from kedit.runs.runner import metrics_summary

runner = CliRunner()
BENCH = Path(__file__).resolve().parents[1] / "kedit" / "data" / "benchmarks"


def array(tmp_path: Path, *records, name: str = "knowedit.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(list(records), indent=2), encoding="utf-8")
    return path


def error(path: Path, **kw) -> str:
    with pytest.raises(CasesError) as info:
        load_cases(path, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------- records

ZSRE = {  # KnowEdit ZsRE: ground_truth a list (alternatives), locality answers lists, one kind each
    "subject": "Petteri Nummelin", "target_new": "Columbus Blue Bombers",
    "prompt": "What sports team was Petteri Nummelin a member of?",
    "ground_truth": ["Minnesota Wild", "Columbus Blue Jackets"],
    "rephrase_prompt": "In which sports team was Petteri Nummelin a member?",
    "cond": "Columbus Blue Jackets >> Columbus Blue Bombers || What sports team was Petteri Nummelin a member of?",
    "locality": {"Relation_Specificity": [{"prompt": "The given name of Petteri Nummelin is", "ground_truth": ["Petteri"]},
                                          {"prompt": "Petteri Nummelin given name", "ground_truth": ["Petteri"]}]},
    "portability": {"Reasoning": [{"prompt": "In which league did Petteri Nummelin play?",
                                   "ground_truth": "National Hockey League"}]},
}

RECENT = {  # WikiData_recent: no ground_truth, answers as lists of alias lists, several prompts a kind
    "subject": "Leo Arons", "prompt": "The place of death of Leo Arons is", "target_new": "Berlin",
    "portability": {
        "Logical_Generalization": [{"prompt": "Is Leo Arons still alive?",
                                    "ground_truth": [["no"], ["incorrect"], ["false"], ["is not alive"], ["is dead"]]}],
        "Reasoning": [
            {"prompt": "The name of the head of government of the place of death of Leo Arons is",
             "ground_truth": [["Kai Wegner", "Kai Peter Wegner"]]},
            {"prompt": "The name of the continent which the place of death of Leo Arons is part of is",
             "ground_truth": [["Europe", "European continent", "Old Continent", " "]]},
            {"prompt": "The name of the mayor of the place of death of Leo Arons is", "ground_truth": [["", " "]]},
        ],
        "Subject_Aliasing": [{"prompt": "The place of death of Martin Leo Arons is",
                              "ground_truth": [["Berlin", "Berlin, Germany", "Berlin (Germany)", "DE-BE"]]}],
    },
    "locality": {"Relation_Specificity": [
        {"prompt": "The name of the father of Leo Arons is", "ground_truth": [["Albert Arons"]]},
        {"prompt": "The name of the field of work of Leo Arons is", "ground_truth": [["experimental physics"]]}]},
}

COUNTERFACT = {  # WikiData_counterfact: string answers, empty portability, two locality kinds
    "subject": "Shetuken", "prompt": "The name of the country of citizenship of Shetuken is",
    "target_new": "Giza", "ground_truth": "Qing dynasty", "portability": {},
    "locality": {"Relation_Specificity": [{"prompt": "The gender of Shetuken is", "ground_truth": "male"}],
                 "Forgetfulness": [{"prompt": "The name of the country of citizenship of Shetuken, which is not "
                                              "Giza, is", "ground_truth": "Qing dynasty"}]},
}

WIKIBIO = {
    "text": "This is a Wikipedia passage about rick mahler. Rick Mahler was an American baseball pitcher.",
    "labels": "Mahler was drafted by the Braves in the first round of the 1975 amateur draft.",
    "concept": "rick mahler",
    "locality": {"Relation_Specificity": [{"prompt": "The cause of death of rick mahler is",
                                           "ground_truth": ["myocardial infarction"]}]},
}


def test_knowedit_zsre_alias_list(tmp_path):
    path = array(tmp_path, ZSRE)
    [case] = load_cases(path)
    assert validate_cases(path) == (1, "knowedit")
    assert case.template == "What sports team was {} a member of?" and case.target_new == "Columbus Blue Bombers"
    assert case.ground_truth == "Minnesota Wild"  # the first, as EasyEdit
    assert case.ground_truth_aliases == ("Minnesota Wild", "Columbus Blue Jackets")
    assert case.rephrase_prompts == ("In which sports team was Petteri Nummelin a member?",)
    [loc] = case.locality
    assert loc.name == "Relation_Specificity" and len(loc) == 2 and loc.ground_truths == ("Petteri", "Petteri")
    assert case.portability == (PromptSet("Reasoning", ("In which league did Petteri Nummelin play?",),
                                          ("National Hockey League",)),)


def test_wikidata_recent_nested_alias_lists_and_missing_ground_truth(tmp_path, caplog):
    path = array(tmp_path, RECENT, name="recent_test.json")
    with caplog.at_level(logging.WARNING, logger="kedit.data.cases"):
        [case] = load_cases(path)
    assert case.ground_truth is None and case.ground_truth_aliases == ()
    kinds = {ps.name: ps for ps in case.portability}
    assert list(kinds) == ["Logical_Generalization", "Reasoning", "Subject_Aliasing"]
    # the outer list holds alternative answers, each inner list its aliases: all accepted
    assert kinds["Logical_Generalization"].answers == (("no", "incorrect", "false", "is not alive", "is dead"),)
    # several prompts a kind; blank aliases dropped; an item with no answer left is skipped (EasyEdit too)
    assert kinds["Reasoning"].answers == (("Kai Wegner", "Kai Peter Wegner"),
                                          ("Europe", "European continent", "Old Continent"))
    assert kinds["Reasoning"].ground_truths == ("Kai Wegner", "Europe")
    assert "portability.Reasoning[2].ground_truth': no non-empty answer" in caplog.text
    assert "recent_test.json:record 1" in caplog.text
    assert kinds["Subject_Aliasing"].answers[0][0] == "Berlin"
    assert [ps.ground_truths for ps in case.locality] == [("Albert Arons", "experimental physics")]


def test_wiki_counterfact_empty_portability_and_two_locality_kinds(tmp_path):
    path = array(tmp_path, COUNTERFACT)
    [case] = load_cases(path)
    assert validate_cases(path) == (1, "knowedit")
    assert case.portability == () and case.ground_truth == "Qing dynasty"
    assert [ps.name for ps in case.locality] == ["Relation_Specificity", "Forgetfulness"]
    # a record whose maps are both empty is still a case (kedit layout)
    [bare] = load_cases(array(tmp_path, {**COUNTERFACT, "locality": {}}, name="bare.json"))
    assert bare.locality == bare.portability == ()


def test_wikibio_layout(tmp_path):
    path = array(tmp_path, WIKIBIO)
    [case] = load_cases(path)
    assert validate_cases(path) == (1, "wikibio")
    assert case.subject == "rick mahler" and case.template.startswith("This is a Wikipedia passage about {}. Rick")
    assert case.prompt == WIKIBIO["text"] and case.target_new == WIKIBIO["labels"]
    assert case.ground_truth is None and case.rephrase_prompts == ()
    assert case.locality == (PromptSet("Relation_Specificity", ("The cause of death of rick mahler is",),
                                       ("myocardial infarction",)),)


def test_easyedit_portability_files(tmp_path):
    one_hop = {"subject": "IAAF Combined Events Challenge", "src": "When was the inception of IAAF Combined Events "
               "Challenge?", "alt": "2006", "answers": ["1998"], "rephrase": "When was the IAAF Combined Events "
               "Challenge launched?", "loc": "nq question: who sang", "loc_ans": "The String",
               "portability": {"Recalled Relation": "(x, event type, athletics)",
                               "New Question": "What type of sports event is it?", "New Answer": "Athletics"}}
    [case] = load_cases(array(tmp_path, one_hop))
    assert case.portability == (PromptSet("one_hop", ("What type of sports event is it?",), ("Athletics",)),)
    assert [ps.name for ps in case.locality] == ["nq"]
    alias = {"subject": "NGC 3953", "src": "Which was the constellation for NGC 3953?", "alt": "Triangulum",
             "answers": ["Ursa Major"], "alternative_subject": "UGC 6870",
             "alter_subject_question": "What is the constellation of UGC 6870?"}
    [case] = load_cases(array(tmp_path, alias, name="alias.json"))
    assert case.portability == (PromptSet("subject_replace", ("What is the constellation of UGC 6870?",),
                                          ("Triangulum",)),)
    inverse = {"subject": "Claire Clairmont", "src": "Who is Claire Clairmont's sister?", "alt": "Marian Clairmont",
               "answers": ["Mary Shelley"], "inverse question": "Who is Marian Clairmont's sister?"}
    [case] = load_cases(array(tmp_path, inverse, name="inverse.json"))
    assert case.portability == (PromptSet("inverse_relation", ("Who is Marian Clairmont's sister?",),
                                          ("Claire Clairmont",)),)
    rome = {"case_id": 4496, "requested_rewrite": {"prompt": "{} passed away in", "subject": "May Wright Sewall",
                                                   "target_new": {"str": "Birmingham"}, "target_true": {"str": "Indianapolis"}},
            "alternative_subject": "Mary Eliza Wright",
            "portability": {"New Question": "What is the city she died in known for?", "New Answer": "its canals"}}
    [case] = load_cases(array(tmp_path, rome, name="rome.json"))
    assert [(ps.name, ps.prompts, ps.ground_truths) for ps in case.portability] == [
        ("one_hop", ("What is the city she died in known for?",), ("its canals",)),
        ("subject_replace", ("Mary Eliza Wright passed away in",), ("Birmingham",))]


def test_round_trip_keeps_aliases(tmp_path):
    cases = load_cases(array(tmp_path, ZSRE, RECENT, COUNTERFACT)) + load_cases(array(tmp_path, WIKIBIO, name="b.json"))
    out = write_cases(cases, tmp_path / "out.jsonl")
    again = load_cases(out)
    assert again == cases
    assert again[1].portability[0].answers[0] == ("no", "incorrect", "false", "is not alive", "is dead")


def test_ground_truth_decides_its_aliases():
    from dataclasses import replace

    from kedit.data.cases import EditCase

    case = EditCase("a", "{} is in", "Rome", "Asia", "Europe", ground_truth_aliases=("EU", "Europe"))
    assert case.ground_truth_aliases == ("Europe", "EU")  # the ground truth first, no repeat
    assert replace(case, ground_truth=None).ground_truth_aliases == ()
    assert replace(case, ground_truth="Italy").ground_truth_aliases == ("Italy", "Europe", "EU")
    assert EditCase("b", "{} is in", "Rome", "Asia", "Europe").ground_truth_aliases == ("Europe",)
    with pytest.raises(CasesError, match="without answers"):
        PromptSet("k", ("p",), answers=((),))


def test_shipped_files_load_whole():
    counts = {"knowedit/zsre-test-all.json": 1301, "knowedit/wiki-counterfact-train.json": 1427,
              "knowedit/wikibio-test-all.json": 306, "portability/zsre-one-hop.json": 1037,
              "portability/counterfact-one-hop.json": 1031}
    for f, n in counts.items():
        assert len(load_cases(BENCH / f)) == n, f
    # the subject-replace and inverse files hold a few records whose subject is not in the question
    assert len(load_cases(BENCH / "portability/zsre-subject-replace.json", skip_invalid=True)) == 289
    assert len(load_cases(BENCH / "portability/counterfact-subject-replace.json")) == 213
    assert len(load_cases(BENCH / "portability/zsre-inverse-relation.json", skip_invalid=True)) == 380
    # kinds as published: ZsRE has Reasoning / Subject_Aliasing / Logical_Generalization, one each
    zsre = load_cases(BENCH / "knowedit/zsre-test-all.json")
    assert {ps.name for c in zsre for ps in c.portability} == {"Reasoning", "Subject_Aliasing",
                                                               "Logical_Generalization"}
    cf = load_cases(BENCH / "knowedit/wiki-counterfact-train.json")
    assert sum(not c.portability for c in cf) == 8


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("record, field, text", [
    ({**ZSRE, "portability": {"Reasoning": [{"ground_truth": "x"}]}}, "portability.Reasoning[0].prompt",
     "missing required field"),
    ({**ZSRE, "portability": {"Reasoning": [{"prompt": "p", "ground_truth": "x"}, {"prompt": "q", "ground_truth": 3}]}},
     "portability.Reasoning[1].ground_truth", "expected a string, got number 3"),
    ({**RECENT, "locality": {"Relation_Specificity": [{"prompt": "p", "ground_truth": [["a", None]]}]}},
     "locality.Relation_Specificity[0].ground_truth[0][1]", "expected a string, got null None"),
    ({**ZSRE, "portability": {"Reasoning": [{"prompt": "p", "ground_truth": [{"a": 1}]}]}},
     "portability.Reasoning[0].ground_truth[0]", "expected a string or a list of aliases, got object {'a': 1}"),
    ({**ZSRE, "portability": {"Reasoning": ["What?"]}}, "portability.Reasoning[0]",
     "expected an object with 'prompt' and 'ground_truth', got string 'What?'"),
    ({**ZSRE, "locality": {"Relation_Specificity": [{"prompt": "", "ground_truth": "x"}]}},
     "locality.Relation_Specificity[0].prompt", "empty prompt"),
    ({**ZSRE, "ground_truth": [["a"], 7]}, "ground_truth[1]", "expected a string or a list of aliases, got number 7"),
    ({**WIKIBIO, "labels": "  "}, "labels", "empty target (nothing left after stripping whitespace)"),
    ({k: v for k, v in WIKIBIO.items() if k != "labels"}, "labels", "missing required field"),
    ({**WIKIBIO, "concept": "Rick Mahler (pitcher)"}, "concept",
     "'Rick Mahler (pitcher)' does not occur in prompt"),
    ({"subject": "X", "src": "Who is X?", "alt": "Y", "portability": {"New Question": "Why?"}},
     "portability.New Answer", "missing required field"),
])
def test_bad_records_one_line_file_record_field(tmp_path, record, field, text):
    # the first record decides a file's layout: a good one of the same layout first
    first = WIKIBIO if "text" in record or "concept" in record else \
        {"subject": "A", "src": "Who is A?", "alt": "B"} if "src" in record else ZSRE
    path = array(tmp_path, first, record)
    msg = error(path)
    assert msg.startswith(f"{path}:record 2: field '{field}': {text}"), msg


def test_bad_file_exit_2_and_no_run_directory(tmp_path):
    path = array(tmp_path, ZSRE, {**ZSRE, "portability": {"Reasoning": [{"prompt": 5, "ground_truth": "x"}]}})
    res = runner.invoke(app, ["validate", str(path)])
    assert res.exit_code == 2
    assert f"{path}:record 2: field 'portability.Reasoning[0].prompt'" in " ".join(res.output.split())
    out = tmp_path / "runs"
    res = runner.invoke(app, ["bench", "knowedit", "--subset", "zsre", "--data", str(path), "--out", str(out)])
    assert res.exit_code == 2 and "record 2: field 'portability.Reasoning[0].prompt'" in " ".join(res.output.split())
    assert not out.exists()  # nothing half-written


# ----------------------------------------------------------------------------- per-kind metrics

WORDS = "The tower is in located Paris Rome city of capital Italy France speaks French Italian".split()
PRE = {"in": {"Paris": 0.5, "Rome": 0.25}, "located": {"Rome": 0.6, "Paris": 0.2}, "is": {"Paris": 0.7, "Rome": 0.1},
       "of": {"Rome": 0.5, "Paris": 0.3}, "speaks": {"Italian": 0.6}, "Italian": {"French": 0.5},
       "Rome": {"Italy": 0.5, "France": 0.1}}
POST = dict(PRE, **{"in": {"Rome": 0.8, "Paris": 0.1}, "located": {"Rome": 0.7, "Paris": 0.1},
                    "is": {"Paris": 0.6, "Rome": 0.3}, "Italian": {"Rome": 0.5, "French": 0.2}})


@pytest.fixture(scope="module")
def wtok():
    return word_tokenizer(WORDS)


def table_lm(tok, rows):
    """Bigram LM: row w = P(. | w) as given, the rest of the mass spread evenly."""
    v = len(tok)
    table = torch.full((v, v), math.log(1.0 / v), dtype=torch.float64)
    for cur, probs in rows.items():
        rest = (1.0 - sum(probs.values())) / (v - len(probs))
        row = torch.full((v,), rest, dtype=torch.float64)
        for w, p in probs.items():
            row[tok.convert_tokens_to_ids(w)] = p
        table[tok.convert_tokens_to_ids(cur)] = row.log()
    return TableLM(table)


def kinds_case():
    return case_from_dict({
        "case_id": "k1", "subject": "tower", "prompt": "The tower is in", "target_new": "Rome",
        "portability": {
            "Reasoning": [{"prompt": "tower capital of", "ground_truth": "Rome"},   # Rome after "of": 1
                          {"prompt": "city is", "ground_truth": "Rome"}],           # Paris after "is": 0
            "Subject_Aliasing": [{"prompt": "tower located", "ground_truth": [["Paris", "Rome"]]}],  # 0 or 1
        },
        "locality": {
            "Relation_Specificity": [{"prompt": "Italy speaks", "ground_truth": "Italian French"},  # French->Rome
                                     {"prompt": "The capital of France is", "ground_truth": "Paris"}],
            "Forgetfulness": [{"prompt": "The tower is located in", "ground_truth": "Paris"}],  # Paris -> Rome
        },
    })


def test_per_kind_metrics_hand_computed(wtok):
    case = kinds_case()
    _, ref = evaluate_cases(table_lm(wtok, PRE), wtok, [case])
    [m], _ = evaluate_cases(table_lm(wtok, POST), wtok, [case], reference=ref)
    assert m["rewrite_acc"] == 1.0  # Rome after "in"
    # portability: Reasoning (1 + 0) / 2; Subject_Aliasing: the second alias is the argmax -> 1
    # (EasyEdit keeps the first alias only and would score it 0)
    assert m["portability_acc.Reasoning"] == 0.5 and m["portability_acc.Subject_Aliasing"] == 1.0
    assert m["portability_acc"] == pytest.approx((0.5 + 1.0) / 2)  # mean over kinds, not prompts (2/3)
    # locality: "Italy speaks | Italian French": Italian kept, French -> Rome (0.5); "France is | Paris"
    # kept (1); "located in | Paris": Paris -> Rome (0)
    assert m["locality_acc.Relation_Specificity"] == pytest.approx(0.75)
    assert m["locality_acc.Forgetfulness"] == 0.0
    assert m["locality_acc"] == pytest.approx((0.75 + 0.0) / 2)  # not (0.5 + 1 + 0) / 3
    assert (m["n.portability_acc.Reasoning"], m["n.portability_acc.Subject_Aliasing"],
            m["n.locality_acc.Relation_Specificity"], m["n.locality_acc.Forgetfulness"]) == (2, 1, 2, 1)
    # before the edit: Rome after "of" (1), Paris after "is" (0); Paris (first alias) after "located"? no: Rome
    [pre], _ = evaluate_cases(table_lm(wtok, PRE), wtok, [case])
    assert pre["portability_acc.Reasoning"] == 0.5 and pre["portability_acc.Subject_Aliasing"] == 1.0
    assert pre["locality_acc"] == 1.0 and pre["locality_acc.Forgetfulness"] == 1.0
    json.dumps(m)


def test_wikibio_long_continuation_token_accuracy(wtok):
    case = case_from_dict({"text": "The tower is", "concept": "tower", "labels": "in Rome",
                           "locality": {"Relation_Specificity": [{"prompt": "Italy speaks", "ground_truth": ["Italian"]}]}})
    [m], _ = evaluate_cases(table_lm(wtok, POST), wtok, [case])
    # teacher forced over the whole continuation: Paris (not "in") after "is", Rome after "in"
    assert m["rewrite_acc"] == 0.5
    assert m["locality_acc.Relation_Specificity"] == 1.0  # the pre-edit call
    assert "portability_acc" not in m and "efficacy_success" not in m  # no portability, no ground truth


def test_aggregate_per_kind_over_the_cases_that_have_it():
    per_case = [
        {"rewrite_acc": 1.0, "portability_acc": 0.75, "portability_acc.Reasoning": 0.5,
         "n.portability_acc.Reasoning": 2, "portability_acc.Subject_Aliasing": 1.0,
         "n.portability_acc.Subject_Aliasing": 1},
        {"rewrite_acc": 0.0, "portability_acc": 0.0, "portability_acc.Reasoning": 0.0,
         "n.portability_acc.Reasoning": 1},
        {"rewrite_acc": 1.0},  # no portability at all (wiki_counterfact has such cases)
    ]
    agg = aggregate(per_case)
    assert agg["mean"]["portability_acc"] == pytest.approx(0.375)  # over the 2 cases that have some
    assert agg["mean"]["portability_acc.Reasoning"] == pytest.approx(0.25)
    assert agg["mean"]["portability_acc.Subject_Aliasing"] == 1.0
    assert agg["count"]["portability_acc.Reasoning"] == 2 and agg["count"]["portability_acc.Subject_Aliasing"] == 1
    assert agg["prompts"] == {"portability_acc.Reasoning": 3, "portability_acc.Subject_Aliasing": 1}
    assert not any(k.startswith("n.") for k in agg["mean"])
    assert list(agg["mean"]) == ["rewrite_acc", "portability_acc", "portability_acc.Reasoning",
                                 "portability_acc.Subject_Aliasing"]
    # metrics.json carries the prompt totals beside the case counts
    summary = metrics_summary([{"pre": m, "post": m} for m in per_case])
    assert summary["prompts"] == agg["prompts"] and summary["count"]["post"] == agg["count"]


# ----------------------------------------------------------------------------- benchmarks


def test_bench_subsets(tmp_path):
    assert get_benchmark("knowedit", "zsre").fluency == {"source": "prompt", "total_tokens": True}
    assert get_benchmark("counterfact").fluency == {}
    zs = load_benchmark("knowedit", n=3, offset=1, subset="zsre")
    assert [c.case_id for c in zs] == ["zsre-test-all-2", "zsre-test-all-3", "zsre-test-all-4"]
    assert load_benchmark("knowedit", subset="wikibio", n=1)[0].subject == "john russell reynolds"
    one_hop = load_benchmark("portability", subset="counterfact-one-hop", n=2)
    assert one_hop[0].portability[0].name == "one_hop" and one_hop[0].locality[0].name == "neighborhood"
    with pytest.raises(BenchError, match=r"knowedit needs --subset \(zsre \| wiki-counterfact"):
        load_benchmark("knowedit")
    with pytest.raises(BenchError, match="unknown knowedit subset 'counterfact'"):
        load_benchmark("knowedit", subset="counterfact")
    with pytest.raises(BenchError, match="'zsre' has no subsets"):
        load_benchmark("zsre", subset="one-hop")
    with pytest.raises(BenchError, match="knowedit/wiki-recent: not shipped"):
        load_benchmark("knowedit", subset="wiki-recent")
    recent = array(tmp_path, RECENT, {**RECENT, "subject": "Arons", "prompt": "Arons died in"})
    assert len(load_benchmark("knowedit", str(recent), subset="wiki-recent")) == 2


@pytest.fixture()
def tiny_knowedit(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))
    d = save_tiny_model_dir(tmp_path / "tiny-llama")
    subjects = ["France", "Tokyo", "the Thames"]
    data = array(tmp_path, *[{
        "subject": s, "prompt": f"A fact about {s}", "target_new": "of", "ground_truth": ["the", "a"],
        "rephrase_prompt": f"Another fact about {s}",
        "portability": {"Reasoning": [{"prompt": f"Because of {s}", "ground_truth": "the"},
                                      {"prompt": f"And {s}", "ground_truth": [["of", "in"]]}],
                        **({"Subject_Aliasing": [{"prompt": f"A fact about {s}s", "ground_truth": "of"}]} if i else {})},
        "locality": {"Relation_Specificity": [{"prompt": "The city of", "ground_truth": ["Paris"]}]},
    } for i, s in enumerate(subjects)], name="zsre.json")
    hp = tmp_path / "rome.yaml"
    hp.write_text(yaml.safe_dump({"layer": 1, "mom2_adjustment": False, "v_num_grad_steps": 5,
                                  "clamp_norm_factor": 1000.0, "kl_factor": 0.0, "v_weight_decay": 0.0,
                                  "context_template_length_params": [[3, 1]]}))
    return ["bench", "knowedit", "--subset", "zsre", "--data", str(data), "--model", str(d), "--hparams", str(hp),
            "--out", str(tmp_path / "runs"), "--device", "cpu"], tmp_path


def test_bench_knowedit_per_kind_values_with_their_n_and_the_table(tiny_knowedit):
    args, tmp = tiny_knowedit
    res = runner.invoke(app, [*args, "--generation", "--gen-tokens", "30"])
    assert res.exit_code == 0, res.output
    (run,) = list((tmp / "runs").iterdir())
    assert "bench-knowedit-zsre-rome" in run.name
    metrics = json.loads((run / "metrics.json").read_text())
    for part in ("pre", "post"):
        assert {"portability_acc", "portability_acc.Reasoning", "portability_acc.Subject_Aliasing",
                "locality_acc.Relation_Specificity", "fluency"} <= set(metrics[part])
    assert metrics["count"]["post"]["portability_acc.Reasoning"] == 3
    assert metrics["count"]["post"]["portability_acc.Subject_Aliasing"] == 2
    recs = read_results(run / "results.jsonl")
    assert [r["post"]["n.portability_acc.Reasoning"] for r in recs] == [2, 2, 2]
    assert "n.portability_acc.Subject_Aliasing" not in recs[0]["post"]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["bench"]["subset"] == "zsre" and config["bench"]["fluency"]["total_tokens"]

    out = tmp / "table"
    res = runner.invoke(app, ["report", "--table", "knowedit", str(run), "--out", str(out)])
    assert res.exit_code == 0, res.output
    md = (out / "knowedit.md").read_text()
    assert (out / "knowedit.png").read_bytes()[:4] == b"\x89PNG"
    assert "| dataset | metric | ROME · tiny-llama | ROME · Llama-2-7b-chat (published) |" in md
    edit_succ = 100 * metrics["post"]["rewrite_acc"]
    assert f"| **ZsRE** | Edit Succ. | {edit_succ:.2f} | 96.57 |" in md
    assert f"| | Fluency | {100 * metrics['post']['fluency']:.2f} | 570.47 |" in md
    assert "| | Portability: Reasoning |" in md and "| | n (cases) | 3 | full test set |" in md
    res = runner.invoke(app, ["report", "--table", "knowedit", str(run), "--out", str(out), "--no-published"])
    assert res.exit_code == 0 and "published" not in (out / "knowedit.md").read_text().split("\n\n")[2]
    res = runner.invoke(app, ["report", "--table", "knowedit", str(run), str(run), "--out", str(out)])
    assert res.exit_code == 2 and "two runs for ZsRE" in res.output
    assert runner.invoke(app, ["report", "--table", "easyedit", str(run)]).exit_code == 2


def test_bench_knowedit_resume_keeps_the_subset(tiny_knowedit, monkeypatch):
    from kedit.methods.locate.rome import ROME

    args, tmp = tiny_knowedit
    real, calls = ROME.compute, {"n": 0}

    def flaky(self, requests):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, requests)
    monkeypatch.setattr(ROME, "compute", flaky)
    assert runner.invoke(app, args).exit_code == 130
    (run,) = list((tmp / "runs").iterdir())
    monkeypatch.setattr(ROME, "compute", real)
    res = runner.invoke(app, ["bench", "--resume", str(run)])
    assert res.exit_code == 0, res.output
    assert "knowedit/zsre: 3 cases" in res.output
    assert [r["case_id"] for r in read_results(run / "results.jsonl")] == ["zsre-1", "zsre-2", "zsre-3"]


# ----------------------------------------------------------------------------- fluency


def test_knowedit_fluency_fixed_length_from_the_edit_prompt():
    loaded = tiny_model("llama")
    lengths, options = [], []
    real = loaded.model.generate

    def spy(*a, **kw):
        out = real(*a, **kw)
        lengths.append(out.shape[1])
        options.append(kw)
        return out
    loaded.model.generate = spy
    prompts = ["The city of", "A very long prompt " * 20]
    texts = fixed_length_samples(loaded, prompts, 12, seed=0)
    assert lengths == [12]  # prompt + continuation: exactly 12 tokens, EOS never ends it early
    assert options[0]["min_new_tokens"] == options[0]["max_new_tokens"] == 12 - len(loaded.tokenizer(prompts[0])["input_ids"])
    assert texts[1] == "" and texts[0]  # a prompt that long already gets nothing
    assert fixed_length_samples(loaded, prompts, 12, seed=0) == texts  # seeded

    case = case_from_dict({"subject": "France", "prompt": "A fact about France", "target_new": "x",
                           "rephrase_prompt": "Another fact about France"})
    lengths.clear()
    [m] = generation_metrics(loaded, [case], max_new_tokens=16, source="prompt", total_tokens=True)
    assert len(lengths) == 1 and lengths[0] == 16 and m["fluency"] > 0  # the edit prompt only


def test_published_table_parsed_from_the_dataset_card(tmp_path):
    pub = published_knowedit()
    assert list(pub)[:4] == ["WikiData_recent", "ZsRE", "WikiBio", "WikiData_counterfact"]
    assert pub["ZsRE"]["Edit Succ."]["ROME"] == 96.57
    assert pub["WikiData_recent"]["Portability"]["FT-M"] == 64.86  # printed "64,86"
    assert pub["WikiBio"]["Locality"]["FT-M"] == 93.38 and "Portability" not in pub["WikiBio"]
    assert pub["WikiData_counterfact"]["Fluency"]["MEMIT"] == 568.58
    bad = tmp_path / "card.md"
    bad.write_text("# no table here\n")
    with pytest.raises(Exception, match="no '| DataSet | Metric"):
        published_knowedit(bad)


def test_knowedit_table_rows_and_columns(tmp_path):
    def run(name, method, subset, post, n=20):
        d = tmp_path / name
        d.mkdir()
        cfg = {"method": method, "model": {"name": "smollm2-135m"}, "sequential": False, "batch_size": None,
               "cases": {"n": n}, "bench": {"name": "knowedit", "subset": subset, "note": f"KnowEdit {subset}"}}
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
        (d / "metrics.json").write_text(json.dumps({"n": n, "pre": {}, "post": post, "stderr": {"pre": {}, "post": {}}}))
        return summarize(d)

    runs = [run("a", "rome", "wikibio", {"rewrite_acc": 0.9, "locality_acc": 0.5, "fluency": 5.5}),
            run("b", "rome", "zsre", {"rewrite_acc": 1.0, "portability_acc": 0.25, "portability_acc.Reasoning": 0.25,
                                      "locality_acc": 0.5, "rephrase_acc": 0.75}),
            run("c", "alphaedit", "zsre", {"rewrite_acc": 0.5}, n=10)]
    t = knowedit_table(runs)
    assert t.datasets == ["ZsRE", "WikiBio"]  # KnowEdit's order
    assert t.columns == ["ROME · smollm2-135m", "ROME · Llama-2-7b-chat (published)", "AlphaEdit · smollm2-135m"]
    # Fluency: the published column has it
    assert t.rows["ZsRE"] == ["Edit Succ.", "Portability", "Locality", "Fluency", "Rephrase", "Portability: Reasoning"]
    assert t.cells[("WikiBio", "Fluency", "ROME · smollm2-135m")] == pytest.approx(550.0)
    assert t.cells[("WikiBio", "Fluency", "ROME · Llama-2-7b-chat (published)")] == 617.25
    md = render_knowedit(t)
    assert "| | n (cases) | 20 | full test set | 10 |" in md
    assert "| **WikiBio** | Edit Succ. | 90.00 | 95.05 | – |" in md
