"""Tests of kedit.data.cases: readers, validation messages, writer (no model needed)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from kedit.data.cases import (
    CasesError,
    EditCase,
    PromptSet,
    case_from_dict,
    load_cases,
    validate_cases,
    write_cases,
)

ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT / "cases"
BENCH = ROOT / "kedit" / "data" / "benchmarks"

MESSI = {
    "prompt": "Question:What sport does Lionel Messi play? Answer:",
    "subject": "Lionel Messi",
    "target_new": "basketball",
}


def jsonl(tmp_path: Path, *records, name: str = "cases.jsonl") -> Path:
    """Write records (dicts, or raw strings written as they are) one per line."""
    path = tmp_path / name
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def array(tmp_path: Path, *records, name: str = "cases.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(list(records), indent=2), encoding="utf-8")
    return path


def error(path: Path, **kw) -> str:
    with pytest.raises(CasesError) as info:
        load_cases(path, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------- shipped files


def test_messi_kedit_layout():
    [case] = load_cases(CASES / "messi.jsonl")
    assert case.case_id == "seed-messi"
    assert case.template == "Question:What sport does {} play? Answer:"
    assert case.prompt == "Question:What sport does Lionel Messi play? Answer:"
    assert (case.subject, case.target_new, case.ground_truth) == ("Lionel Messi", "basketball", "football")
    assert case.rephrase_prompts == ("Which sport is Lionel Messi known for? Answer:",)
    assert case.locality == (
        PromptSet("neighborhood", ("Larry Bird is a professional",), ("basketball",)),
        PromptSet("known_fact", ("The Colosseum is located in the city of",), ("Rome",)),
    )
    assert case.portability == ()
    assert validate_cases(CASES / "messi.jsonl") == (1, "kedit")


def test_anchor_31_flat_easyedit():
    cases = load_cases(CASES / "anchor-31.jsonl")
    assert validate_cases(CASES / "anchor-31.jsonl") == (31, "easyedit")
    assert [c.case_id for c in cases[:3]] == ["seed-messi", "10", "42"]
    first = cases[0]
    assert first.prompt == MESSI["prompt"] and first.ground_truth == "football"
    assert first.rephrase_prompts == ("Which sport is Lionel Messi known for? Answer:",)
    assert first.locality == (PromptSet("neighborhood", ("Larry Bird is a professional",), ("basketball",)),)
    bbc = cases[1]
    assert (bbc.template, bbc.subject, bbc.target_new, bbc.ground_truth) == ("{}, by", "BBC One", "Sega", "BBC")
    assert bbc.source.endswith("anchor-31.jsonl:2")
    # the file is kept verbatim from the shared reference data
    raw = [json.loads(line) for line in (CASES / "anchor-31.jsonl").read_text().splitlines()]
    assert len(raw) == 31 and raw[0]["case_id"] == "seed-messi"


def test_counterfact_val_50_matches_benchmark_copy():
    cases = load_cases(CASES / "counterfact-val-50.jsonl")
    assert validate_cases(CASES / "counterfact-val-50.jsonl") == (50, "easyedit")
    full = load_cases(BENCH / "counterfact-val.json")
    assert len(full) == 1919
    assert cases == full[:50]
    assert load_cases(CASES / "anchor-31.jsonl")[1:] == cases[:30]


def test_rome_original_layout():
    path = BENCH / "counterfact-orig-500.json"
    cases = load_cases(path)
    assert validate_cases(path) == (500, "rome")
    raw = json.loads(path.read_text(encoding="utf-8"))
    for case, rec in zip(cases, raw):
        rw = rec["requested_rewrite"]
        assert case.case_id == str(rec["case_id"])
        assert case.template == rw["prompt"] and case.subject == rw["subject"]
        assert case.target_new == rw["target_new"]["str"].strip()
        assert case.ground_truth == rw["target_true"]["str"].strip()
        assert case.rephrase_prompts == tuple(rec["paraphrase_prompts"])
        [nb] = case.locality
        assert nb.name == "neighborhood" and nb.prompts == tuple(rec["neighborhood_prompts"])
        assert set(nb.ground_truths) == {case.ground_truth}
        assert case.attribute_prompts == tuple(rec["attribute_prompts"])
        assert case.generation_prompts == tuple(rec["generation_prompts"])
        assert (case.relation_id, case.target_new_id) == (rw["relation_id"], rw["target_new"]["id"])
    # the ids survive a round trip through the kedit layout (consistency needs them)
    assert case_from_dict(cases[0].to_dict()) == cases[0]
    first = cases[0]
    assert (first.case_id, first.prompt, first.target_new, first.ground_truth) == (
        "20952", "Angola is located in", "Antarctica", "Africa")
    assert first.source.endswith("counterfact-orig-500.json:record 1")


def test_zsre_mend_layout_and_its_two_empty_targets(caplog):
    path = BENCH / "zsre_mend_train-1k.json"
    # MEND's release has two records with an empty 'alt': strict loading refuses the file
    msg = error(path)
    assert msg.endswith("zsre_mend_train-1k.json:record 535: field 'alt': "
                        "empty target (nothing left after stripping whitespace)")
    with caplog.at_level(logging.WARNING, logger="kedit.data.cases"):
        cases = load_cases(path, skip_invalid=True)
    assert len(cases) == 998
    assert sum("record 535" in r.getMessage() or "record 724" in r.getMessage() for r in caplog.records) == 2
    first = cases[0]
    assert first.case_id == "zsre_mend_train-1k-1"
    assert first.prompt == "What is the product made by UniFirst?"
    assert first.template == "What is the product made by {}?"
    assert (first.target_new, first.ground_truth) == ("unmanned aircraft", "uniform")
    assert first.rephrase_prompts == ("What will be the product of UniFirst?",)
    assert first.locality == (PromptSet(
        "nq", ("nq question: john goodman's character in the big lebowski",), ("Walter Sobchak",)),)
    assert cases[533].case_id == "zsre_mend_train-1k-534" and cases[534].case_id == "zsre_mend_train-1k-536"


def test_zsre_small_file_and_explicit_format(tmp_path):
    rec = {"subject": "WEFS", "src": "When was WEFS established?", "alt": " 1997 ",
           "answers": ["1987", "1988"], "rephrase": "When has WEFS been established?",
           "loc": "nq question: who voiced gaston", "loc_ans": "Richard White", "pred": "1998"}
    path = array(tmp_path, rec)
    assert validate_cases(path) == (1, "zsre")
    [case] = load_cases(path, fmt="zsre")
    assert (case.target_new, case.ground_truth) == ("1997", "1987")
    assert case.template == "When was {} established?"
    # a record without 'loc' has no locality
    [case] = load_cases(jsonl(tmp_path, {k: v for k, v in rec.items() if k not in ("loc", "loc_ans")}))
    assert case.locality == ()


# --------------------------------------------------------------- small layouts


@pytest.mark.parametrize(
    "prompt, subject, template",
    [
        ("Lionel Messi plays the sport of", "Lionel Messi", "{} plays the sport of"),  # start
        ("The sport Lionel Messi plays is", "Lionel Messi", "The sport {} plays is"),  # middle
        ("The best player is Lionel Messi", "Lionel Messi", "The best player is {}"),  # end
        ("Paris is the capital of Paris", "Paris", "{} is the capital of Paris"),  # first occurrence
        ("The {} plays for {team}", "Messi", "The {} plays for {team}"),  # '{}' given: used as is
        ("{} is a {sport} player", "X", "{} is a {sport} player"),
    ],
)
def test_templates(tmp_path, prompt, subject, template):
    [case] = load_cases(jsonl(tmp_path, {"prompt": prompt, "subject": subject, "target_new": "x"}))
    assert case.template == template
    assert case.prompt == template.replace("{}", subject, 1)


def test_prompt_with_other_braces_is_not_formatted():
    case = EditCase("a", "{} likes {x} and {0}", "Bob", "tea")
    assert case.prompt == "Bob likes {x} and {0}"


def test_kedit_layout_details(tmp_path):
    rec = {
        **MESSI,
        "case_id": 7,
        "target_new": "  basketball\n",
        "ground_truth": " football ",
        "rephrase_prompts": "Which sport is Lionel Messi known for?",
        "locality": {
            "many": {"prompts": ["A is", "B is", "C is"], "ground_truths": "x"},  # broadcast
            "pairs": {"prompt": ["D is", "E is"], "ground_truth": ["d", "e"]},
        },
        "portability": {"one_hop": {"prompt": "Messi's sport uses a", "ground_truth": "ball"}},
        "notes": "extra keys are ignored",
    }
    path = jsonl(tmp_path, "", rec, "   ", {**MESSI, "rephrase_prompts": ["a?", "b?"]})
    first, second = load_cases(path)
    assert first.case_id == "7" and second.case_id == "cases-4"  # <stem>-<line>; blank lines skipped
    assert (first.target_new, first.ground_truth) == ("basketball", "football")
    assert first.rephrase_prompts == ("Which sport is Lionel Messi known for?",)
    assert second.rephrase_prompts == ("a?", "b?")
    assert second.ground_truth is None
    many, pairs = first.locality
    assert many.ground_truths == ("x", "x", "x") and pairs.pairs() == [("D is", "d"), ("E is", "e")]
    assert first.portability == (PromptSet("one_hop", ("Messi's sport uses a",), ("ball",)),)
    assert hash(first) == hash(load_cases(path)[0])  # frozen and hashable


def test_easyedit_flat_lists_portability_and_nested(tmp_path):
    rec = {
        **MESSI,
        "ground_truth": "football",
        "rephrase_prompt": ["r1", "r2"],
        "locality_prompt": ["l1", "l2"],
        "locality_ground_truth": "g",
        "portability_prompt": "p1",
        "portability_ground_truth": "pg",
        "locality": {"Relation_Specificity": {"prompt": "rs", "ground_truth": ["rsg"]}},
        "pred": "x", "cond": "y",
    }
    path = array(tmp_path, rec)
    [case] = load_cases(path)
    assert validate_cases(path) == (1, "easyedit")
    assert case.rephrase_prompts == ("r1", "r2")
    assert [s.name for s in case.locality] == ["Relation_Specificity", "neighborhood"]
    assert case.locality[1] == PromptSet("neighborhood", ("l1", "l2"), ("g", "g"))
    assert case.portability == (PromptSet("portability", ("p1",), ("pg",)),)
    # explicit format names are accepted
    assert load_cases(path, fmt="easyedit") == load_cases(path, fmt="kedit") == [case]


def test_rome_small_file_jsonl(tmp_path):
    rec = {
        "case_id": 0,
        "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                              "target_new": {"str": "English"}, "target_true": {"str": "French"}},
        "paraphrase_prompts": ["Danielle Darrieux spoke"],
        "neighborhood_prompts": ["Léon Blum's mother tongue is", "Colette speaks"],
        "attribute_prompts": ["J.R.R. Tolkien spoke"],
        "generation_prompts": ["Danielle Darrieux's mother tongue is"],
    }
    path = jsonl(tmp_path, rec)
    assert validate_cases(path) == (1, "rome")
    [case] = load_cases(path)
    assert case.prompt == "The mother tongue of Danielle Darrieux is"
    assert case.locality == (PromptSet("neighborhood", ("Léon Blum's mother tongue is", "Colette speaks"),
                                       ("French", "French")),)
    assert case.attribute_prompts == ("J.R.R. Tolkien spoke",)
    assert case.generation_prompts == ("Danielle Darrieux's mother tongue is",)


def test_case_from_dict():
    case = case_from_dict(dict(MESSI), case_id="cli")
    assert case.case_id == "cli" and case.template == "Question:What sport does {} play? Answer:"
    with pytest.raises(CasesError, match=r"^<record>: field 'target_new': missing required field$"):
        case_from_dict({"prompt": "a b", "subject": "a"})


# ------------------------------------------------------------------ bad input


def test_error_subject_absent(tmp_path):
    bad = {"prompt": "Question:What sport does Lionel plays? Answer:", "subject": "Messi", "target_new": "x"}
    path = jsonl(tmp_path, *[{**MESSI, "case_id": i} for i in range(6)], bad)
    assert error(path) == (
        f"{path}:7: field 'subject': 'Messi' does not occur in prompt "
        "'Question:What sport does Lionel plays? Answer:'")


def test_error_subject_absent_letter_case_hint(tmp_path):
    path = jsonl(tmp_path, {"prompt": "lionel messi plays", "subject": "Lionel Messi", "target_new": "x"})
    assert error(path).endswith("(it does with different letter case)")


def test_error_not_json_jsonl(tmp_path):
    path = jsonl(tmp_path, MESSI, '{"prompt": "a b", "subject": "a",}')
    msg = error(path)
    assert msg.startswith(f"{path}:2: not JSON: Expecting property name enclosed in double quotes")


def test_error_not_json_array(tmp_path):
    path = tmp_path / "cases.json"
    path.write_text('[\n  {"prompt": "a b"},\n  {"prompt" "x"}\n]\n')
    assert error(path).startswith(f"{path}:3: not JSON: Expecting ':' delimiter")


def test_error_pretty_printed_object(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(MESSI, indent=2))
    msg = error(path)
    assert msg.startswith(f"{path}:1: not JSON:") and "one object a line" in msg


def test_error_record_not_object(tmp_path):
    assert error(jsonl(tmp_path, MESSI, "[1, 2]")).endswith(":2: expected a JSON object, got list [1, 2]")
    assert error(array(tmp_path, MESSI, "text")).endswith(":record 2: expected a JSON object, got string 'text'")


@pytest.mark.parametrize("missing", ["prompt", "subject", "target_new"])
def test_error_missing_required_field(tmp_path, missing):
    rec = {k: v for k, v in MESSI.items() if k != missing}
    path = jsonl(tmp_path, MESSI, {**MESSI, "case_id": "b"}, rec)
    assert error(path) == f"{path}:3: field '{missing}': missing required field"


def test_error_missing_field_json_array_record_index(tmp_path):
    path = array(tmp_path, MESSI, {"prompt": "a b", "target_new": "x"})
    assert error(path) == f"{path}:record 2: field 'subject': missing required field"


def test_error_missing_rome_and_zsre_fields(tmp_path):
    rw = {"prompt": "{} is in", "subject": "Rome", "target_new": {"str": "Asia"}}
    path = array(tmp_path, {"requested_rewrite": rw})
    assert error(path) == f"{path}:record 1: field 'requested_rewrite.target_true': missing required field"
    path = array(tmp_path, {"src": "When was X made?", "subject": "X", "answers": ["1"]})
    assert error(path) == f"{path}:record 1: field 'alt': missing required field"
    path = array(tmp_path, {"src": "When was X made?", "subject": "X", "alt": "2", "loc": "nq question: q"})
    assert error(path) == f"{path}:record 1: field 'loc_ans': missing required field (given 'loc')"


@pytest.mark.parametrize(
    "change, field, text",
    [
        ({"target_new": 5}, "target_new", "expected a string, got number 5"),
        ({"subject": ["Lionel Messi"]}, "subject", "expected a string, got list ['Lionel Messi']"),
        ({"ground_truth": True}, "ground_truth", "expected a string, got boolean True"),
        ({"rephrase_prompts": {"a": "b"}}, "rephrase_prompts",
         "expected a string or a list of strings, got object {'a': 'b'}"),
        ({"rephrase_prompts": ["ok", 3]}, "rephrase_prompts[1]", "expected a string, got number 3"),
        ({"case_id": 1.5}, "case_id", "expected a string or an integer, got number 1.5"),
        ({"locality": ["x"]}, "locality", "expected an object of name -> {prompt, ground_truth}, got list ['x']"),
        ({"locality": {"nb": "x"}}, "locality.nb",
         "expected an object with 'prompt' and 'ground_truth', got string 'x'"),
        ({"locality": {"nb": {"prompt": "p"}}}, "locality.nb.ground_truth", "missing required field"),
        ({"portability": {"nb": {"prompt": 1, "ground_truth": "g"}}}, "portability.nb.prompt",
         "expected a string or a list of strings, got number 1"),
    ],
)
def test_error_wrong_type(tmp_path, change, field, text):
    path = jsonl(tmp_path, MESSI, {**MESSI, "case_id": "x", **change})
    assert error(path) == f"{path}:2: field '{field}': {text}"


def test_error_wrong_type_flat_and_rome(tmp_path):
    path = array(tmp_path, {**MESSI, "locality_prompt": "p", "locality_ground_truth": 3})
    assert error(path) == (f"{path}:record 1: field 'locality_ground_truth': "
                           "expected a string or a list of strings, got number 3")
    rw = {"prompt": "{} is in", "subject": "Rome", "target_new": "Asia", "target_true": {"str": "Europe"}}
    path = array(tmp_path, {"requested_rewrite": rw})
    assert error(path) == (f"{path}:record 1: field 'requested_rewrite.target_new': "
                           "expected an object with 'str', got string 'Asia'")


@pytest.mark.parametrize("target", ["", "   ", "\n\t"])
def test_error_empty_target_new(tmp_path, target):
    path = jsonl(tmp_path, {**MESSI, "target_new": target})
    assert error(path) == f"{path}:1: field 'target_new': empty target (nothing left after stripping whitespace)"


def test_error_empty_target_rome(tmp_path):
    rw = {"prompt": "{} is in", "subject": "Rome", "target_new": {"str": " "}, "target_true": {"str": "Europe"}}
    path = array(tmp_path, {"requested_rewrite": rw})
    assert error(path) == (f"{path}:record 1: field 'requested_rewrite.target_new.str': "
                           "empty target (nothing left after stripping whitespace)")


def test_error_duplicate_case_id_names_both_lines(tmp_path):
    path = jsonl(tmp_path, {**MESSI, "case_id": "a"}, "", {**MESSI, "case_id": "b"}, {**MESSI, "case_id": "a"})
    assert error(path) == f"{path}:4: field 'case_id': duplicate case_id 'a' (first at line 1, again at line 4)"
    # an int id and the same id as a string are the same id
    path = array(tmp_path, {**MESSI, "case_id": 3}, {**MESSI, "case_id": "3"})
    assert error(path) == (f"{path}:record 2: field 'case_id': duplicate case_id '3' "
                           "(first at record 1, again at record 2)")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_error_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    assert error(path) == f"{path}: no cases (the file is empty)"
    with pytest.raises(CasesError):
        validate_cases(path)


def test_error_empty_array(tmp_path):
    path = array(tmp_path)
    assert error(path) == f"{path}: no cases (the file holds no records)"


def test_error_missing_file(tmp_path):
    assert error(tmp_path / "nope.jsonl") == f"{tmp_path / 'nope.jsonl'}: no such file"


def test_error_more_than_one_placeholder(tmp_path):
    path = jsonl(tmp_path, MESSI, {"prompt": "{} and {} play", "subject": "Messi", "target_new": "x"})
    assert error(path) == f"{path}:2: field 'prompt': prompt '{{}} and {{}} play' holds '{{}}' 2 times (at most one is allowed)"
    rw = {"prompt": "{} met {}", "subject": "A", "target_new": {"str": "B"}, "target_true": {"str": "C"}}
    path = array(tmp_path, {"requested_rewrite": rw})
    assert error(path).startswith(f"{path}:record 1: field 'requested_rewrite.prompt': prompt '{{}} met {{}}'")


@pytest.mark.parametrize(
    "locality, field, text",
    [
        ({"nb": {"prompt": ["a", "b", "c"], "ground_truth": ["x", "y"]}}, "locality.nb.ground_truth",
         "3 prompts in 'locality.nb.prompt' but 2 ground truths "
         "(give one ground truth per prompt, or a single one for all)"),
        ({"nb": {"prompts": "a", "ground_truths": ["x", "y"]}}, "locality.nb.ground_truths",
         "1 prompts in 'locality.nb.prompts' but 2 ground truths "
         "(give one ground truth per prompt, or a single one for all)"),
        ({"nb": {"prompt": [], "ground_truth": []}}, "locality.nb.prompt", "no prompts"),
        ({"nb": {"prompt": ["a"], "ground_truth": []}}, "locality.nb.ground_truth", "no ground truths"),
        ({"nb": {"prompt": ["a", "b"], "ground_truth": ["x", " "]}}, "locality.nb.ground_truth[1]",
         "empty ground truth"),
    ],
)
def test_error_locality_lengths(tmp_path, locality, field, text):
    path = jsonl(tmp_path, {**MESSI, "locality": locality})
    assert error(path) == f"{path}:1: field '{field}': {text}"


def test_error_flat_locality_lengths_and_half_given(tmp_path):
    path = array(tmp_path, {**MESSI, "locality_prompt": ["a", "b"], "locality_ground_truth": ["x", "y", "z"]})
    assert error(path).startswith(f"{path}:record 1: field 'locality_ground_truth': 2 prompts in 'locality_prompt'")
    path = array(tmp_path, {**MESSI, "locality_prompt": "a"})
    assert error(path) == f"{path}:record 1: field 'locality_ground_truth': missing required field (given 'locality_prompt')"


def test_first_error_in_file_order_wins_and_nothing_is_returned(tmp_path):
    path = jsonl(tmp_path, MESSI, {**MESSI, "subject": "Nobody"}, {**MESSI, "target_new": ""})
    assert error(path).startswith(f"{path}:2: field 'subject':")


def test_skip_invalid(tmp_path):
    path = jsonl(tmp_path, MESSI, "not json", {**MESSI, "subject": "Nobody"}, {**MESSI, "case_id": "ok"})
    assert [c.case_id for c in load_cases(path, skip_invalid=True)] == ["cases-1", "ok"]
    path = jsonl(tmp_path, {**MESSI, "subject": "Nobody"}, name="allbad.jsonl")
    assert error(path, skip_invalid=True) == f"{path}: no valid cases (1 invalid records skipped)"


def test_unknown_format():
    with pytest.raises(CasesError, match="unknown case format 'csv'"):
        load_cases(CASES / "messi.jsonl", fmt="csv")


def test_wrong_explicit_format(tmp_path):
    path = CASES / "messi.jsonl"
    assert error(path, fmt="rome") == f"{path}:1: field 'requested_rewrite': missing required field"


# ----------------------------------------------------------------- round trip


def test_write_cases_round_trip_all_layouts(tmp_path):
    cases = (load_cases(CASES / "messi.jsonl") + load_cases(CASES / "anchor-31.jsonl")[1:]
             + load_cases(BENCH / "counterfact-orig-500.json")[:40]
             + load_cases(BENCH / "zsre_mend_train-1k.json", skip_invalid=True)[:40])
    out = tmp_path / "sub" / "out.jsonl"
    assert write_cases(cases, out) == out
    back = load_cases(out)
    assert back == cases
    assert validate_cases(out) == (len(cases), "kedit")
    assert not [p for p in out.parent.iterdir() if p.name != "out.jsonl"]  # no temp file left
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not the temp file's 0600


def test_round_trip_tricky_templates(tmp_path):
    cases = [
        EditCase("a", "Paris is the capital of {}", "Paris", "France"),  # subject also before the slot
        EditCase("b", "{} likes {x}", "Bob", "tea", ground_truth="coffee"),
        EditCase("c", "Who is {}?", "{", "x"),
        EditCase("d", "{} plays", "Messi", "golf", rephrase_prompts=["r"],
                 locality=[PromptSet("n", ["p1", "p2"], "g")], portability=(PromptSet("q", "p", "a"),)),
    ]
    path = write_cases(cases, tmp_path / "t.jsonl")
    assert load_cases(path) == cases
    first = json.loads(path.read_text().splitlines()[0])
    assert first["prompt"] == "Paris is the capital of {}"
    assert json.loads(path.read_text().splitlines()[3])["prompt"] == "Messi plays"


def test_write_cases_is_atomic_on_error(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    dup = [EditCase("a", "{} x", "s", "t"), EditCase("a", "{} y", "s", "t")]
    with pytest.raises(CasesError, match="duplicate case_id 'a'"):
        write_cases(dup, out)
    assert out.read_text() == "old\n" and os.listdir(tmp_path) == ["out.jsonl"]


def test_editcase_model():
    case = EditCase("a", "{} plays", "Messi", "golf", rephrase_prompts=["x"])
    assert case.rephrase_prompts == ("x",)
    assert case == EditCase("a", "{} plays", "Messi", "golf", rephrase_prompts=("x",), source="elsewhere:3")
    with pytest.raises(CasesError):
        EditCase("a", "no slot", "Messi", "golf")
    with pytest.raises(CasesError):
        PromptSet("n", ("a", "b", "c"), ("x", "y"))
    with pytest.raises(Exception):
        case.subject = "other"  # frozen
