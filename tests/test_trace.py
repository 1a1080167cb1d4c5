"""Causal tracing on tiny random models: the exact identities the definitions imply,
subject marking, batching invariance, and `kedit trace` writing a run directory."""

from __future__ import annotations

import json

import pytest
import yaml
from tiny import save_tiny_model_dir, tiny_model
from typer.testing import CliRunner

from kedit.data.cases import EditCase
from kedit.cli import app
from kedit.models.tokens import encode_prompt_target
from kedit.analysis.trace import (KINDS, Restoration, TraceError, Tracer, TraceSettings, embedding_std, prepare_prompt,
                         suggest_layers, trace_cases, trace_prompt, window_layers)

PROMPT = "The Eiffel Tower is in"
SUBJECT = "Eiffel Tower"
TWO_FAMILIES = ("gpt2", "llama")


@pytest.fixture(scope="module", params=TWO_FAMILIES)
def loaded(request):
    return tiny_model(request.param)


def test_zero_noise_gives_zero_indirect_effect(loaded):
    tp = prepare_prompt(loaded, PROMPT, SUBJECT, " Paris")
    pt = trace_prompt(loaded, tp, TraceSettings(samples=2, noise=0.0), embedding_std(loaded, 0.0))
    assert pt.p_corrupt == pytest.approx(pt.p_clean, abs=1e-9)
    for kind in KINDS:
        assert max(abs(v) for row in pt.ie(kind) for v in row) <= 1e-9, kind


def test_restoring_every_token_recovers_p_clean(loaded):
    tp = prepare_prompt(loaded, PROMPT, SUBJECT)
    tracer = Tracer(loaded, tp, noise_scale=embedding_std(loaded, 50.0).scale, samples=3)
    assert abs(tracer.p_corrupt - tracer.p_clean) > 1e-7   # the noise changes p by far more than the tolerance
    T, L = len(tp.input_ids), loaded.adapter.n_layers
    everything = tuple(range(T))
    reqs = [Restoration("hidden", (l,), everything) for l in range(L)]
    reqs.append(Restoration("hidden", tuple(range(L)), everything))
    assert tracer.probs(reqs).tolist() == pytest.approx([tracer.p_clean] * (L + 1), abs=1e-9)


def _reference_p(loaded, tp, tracer, kind, layers, token):
    """p_R by the definition, without the tracer's batching or block skipping: one full
    forward per noise draw with the noise added and the clean outputs written back."""
    import torch

    from kedit.models.hooks import edit_output
    from kedit.analysis.trace import _module

    ps = []
    for k in range(tracer.samples):
        def corrupt(x, k=k):
            x = x.clone()
            x[0, tp.subject_first:tp.subject_last + 1] += tracer.noise[k]
            return x

        hooks = [edit_output(loaded.adapter.embed(), corrupt)]
        for layer in layers:
            def put(x, layer=layer):
                x = x.clone()
                x[0, token] = tracer.clean[(kind, layer)][token]
                return x
            hooks.append(edit_output(_module(loaded.adapter, kind, layer), put))
        for h in hooks:
            h.__enter__()
        try:
            with torch.no_grad():
                logits = loaded.model(torch.tensor([tp.input_ids])).logits[0, -1]
        finally:
            for h in reversed(hooks):
                h.__exit__(None, None, None)
        ps.append(float(torch.softmax(logits.float(), -1)[tp.answer_id]))
    return sum(ps) / len(ps)


@pytest.mark.parametrize("batch_tokens", [None, 1])     # all in one pass from block 0; one pass each, blocks skipped
def test_batched_skipping_tracer_matches_the_definition(loaded, batch_tokens):
    tp = prepare_prompt(loaded, PROMPT, SUBJECT)
    tracer = Tracer(loaded, tp, noise_scale=embedding_std(loaded, 50.0).scale, samples=3, batch_tokens=batch_tokens)
    reqs = [Restoration("hidden", (1,), (tp.subject_last,)), Restoration("mlp", (1, 2), (tp.subject_last,)),
            Restoration("attn", (2,), (tp.subject_first,)), Restoration("mlp", (0,), (len(tp.input_ids) - 1,))]
    got = tracer.probs(reqs).tolist()
    want = [_reference_p(loaded, tp, tracer, r.kind, r.layers, r.tokens[0]) for r in reqs]
    assert got == pytest.approx(want, abs=1e-9)      # effects here are 1e-8 .. 1e-5
    assert tracer.p_corrupt == pytest.approx(_reference_p(loaded, tp, tracer, "hidden", (), 0), abs=1e-9)


def test_exact_cells_of_the_heatmap(loaded):
    """Tokens before the subject never see the noise (causal attention): restoring them changes
    nothing; the last block's output at the last token alone gives the clean logits."""
    tp = prepare_prompt(loaded, PROMPT, SUBJECT)
    assert tp.subject_first > 0
    pt = trace_prompt(loaded, tp, TraceSettings(samples=2, noise=50.0), embedding_std(loaded, 50.0))
    for kind in KINDS:
        ie = pt.ie(kind)
        assert max(abs(v) for t in range(tp.subject_first) for v in ie[t]) <= 1e-9, kind
    assert pt.scores["hidden"][-1][-1] == pytest.approx(pt.p_clean, abs=1e-9)
    assert abs(pt.p_clean - pt.p_corrupt) > 1e-7


def test_batching_and_seed():
    loaded = tiny_model("llama")
    tp = prepare_prompt(loaded, PROMPT, SUBJECT)
    noise = embedding_std(loaded, 50.0)
    per_forward = 4 * len(tp.input_ids) * 2            # 4 restorations a pass: the last pass is partial
    one = trace_prompt(loaded, tp, TraceSettings(kinds=("mlp",), samples=2, window=2, batch_tokens=per_forward),
                       noise)
    many = trace_prompt(loaded, tp, TraceSettings(kinds=("mlp",), samples=2, window=2), noise)
    assert len(tp.input_ids) * 3 % 4 != 0 and one.p_corrupt == many.p_corrupt
    for a, b in zip(one.scores["mlp"], many.scores["mlp"]):
        assert a == pytest.approx(b, abs=1e-9)
    other = Tracer(loaded, tp, noise_scale=noise.scale, samples=2, seed=1)
    again = Tracer(loaded, tp, noise_scale=noise.scale, samples=2, seed=0)
    assert again.p_corrupt == one.p_corrupt and other.p_corrupt != one.p_corrupt


def test_window_layers_follow_rome_centring():
    assert window_layers("hidden", 7, 30, 10) == (7,)
    assert window_layers("mlp", 0, 30, 10) == tuple(range(0, 5))
    assert window_layers("mlp", 3, 30, 10) == tuple(range(0, 8))
    assert window_layers("attn", 15, 30, 10) == tuple(range(10, 20))
    assert window_layers("mlp", 29, 30, 10) == tuple(range(24, 30))
    assert window_layers("mlp", 4, 30, 3) == (3, 4, 5)
    assert window_layers("mlp", 4, 30, 1) == (4,)


@pytest.mark.parametrize("prompt,subject", [
    ("Eiffel Tower is in the city of", "Eiffel Tower"),         # start
    ("The Eiffel Tower is in the city of", "Eiffel Tower"),     # middle
    ("The city that has the Eiffel Tower", "Eiffel Tower"),     # end
])
def test_subject_tokens_are_marked_and_target_is_its_first_token(prompt, subject):
    loaded = tiny_model("llama")
    tp = prepare_prompt(loaded, prompt, subject, "Paris is nice")
    start = prompt.index(subject)
    covered = "".join(tp.tokens[tp.subject_first:tp.subject_last + 1])
    assert subject in covered and len(covered) - len(subject) <= 1          # at most the leading space
    assert "".join(tp.tokens) == prompt
    marked = [i for i, label in enumerate(tp.labels) if label.endswith("*")]
    assert marked == list(range(tp.subject_first, tp.subject_last + 1))
    assert "".join(tp.tokens[:tp.subject_first]) == prompt[:start].rstrip(" ") or start == 0
    assert tp.answer_id == encode_prompt_target(loaded.tokenizer, prompt, "Paris is nice").target_ids[0]
    assert tp.answer_source == "target"


def test_bad_input_is_a_trace_error():
    loaded = tiny_model("llama")
    with pytest.raises(TraceError, match="does not occur in the prompt"):
        prepare_prompt(loaded, PROMPT, "Louvre")
    with pytest.raises(TraceError, match="--kind"):
        TraceSettings(kinds=("mlp", "resid"))
    with pytest.raises(TraceError, match="--samples"):
        TraceSettings(samples=0)


def test_suggest_layers_by_hand():
    ie = [0.0, 0.1, 0.6, 0.0, 0.4, 0.45, 0.3, 0.0]
    assert suggest_layers(ie, span=3) == {"rome_layer": 2, "memit_layers": [4, 5, 6]}
    assert suggest_layers(ie, span=2)["memit_layers"] == [4, 5]


def test_cases_curve_is_the_heatmap_row_of_the_last_subject_token():
    loaded = tiny_model("llama")
    settings = TraceSettings(kinds=("mlp", "hidden"), samples=2, noise=50.0, window=2)
    noise = embedding_std(loaded, settings.noise)
    cases = [EditCase("a", "The {} is in the city of", SUBJECT, "Rome", ground_truth="Paris"),
             EditCase("b", "{} plays the sport of", "Lionel Messi", "tennis", ground_truth="football")]
    ct = trace_cases(loaded, cases, settings, noise)
    tp = prepare_prompt(loaded, cases[0].prompt, SUBJECT, "Paris")
    pt = trace_prompt(loaded, tp, settings, noise)
    for kind in settings.kinds:
        assert ct.per_case[0]["indirect_effect"][kind] == pytest.approx(pt.ie(kind)[tp.subject_last], abs=1e-9)
        mean = [(a + b) / 2 for a, b in zip(*(c["indirect_effect"][kind] for c in ct.per_case))]
        assert ct.average()["mean"][kind] == pytest.approx(mean, abs=1e-12)
    assert ct.suggestion()["rome_layer"] == max(range(3), key=lambda l: ct.average()["mean"]["mlp"][l])


runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("trace")
    save_tiny_model_dir(d / "tiny-llama")
    (d / "cases.jsonl").write_text(
        json.dumps({"case_id": "a", "prompt": "The Eiffel Tower is in the city of", "subject": "Eiffel Tower",
                    "target_new": "Rome", "ground_truth": "Paris"}) + "\n"
        + json.dumps({"case_id": "b", "prompt": "Lionel Messi plays", "subject": "Lionel Messi",
                      "target_new": "tennis", "ground_truth": "football"}) + "\n")
    return d


def test_cli_writes_run_directory_with_json_and_pngs(tiny_dir, monkeypatch):
    monkeypatch.setenv("KEDIT_HOME", str(tiny_dir / "home"))
    out = tiny_dir / "runs"
    res = runner.invoke(app, ["trace", "--model", str(tiny_dir / "tiny-llama"), "--prompt", PROMPT,
                              "--subject", SUBJECT, "--target", "Paris", "--kind", "hidden", "--kind", "mlp",
                              "--samples", "2", "--cases", str(tiny_dir / "cases.jsonl"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    (run,) = [p for p in out.iterdir()]
    assert not run.name.startswith(".")
    names = {p.name for p in run.iterdir()}
    assert {"config.yaml", "trace.json", "summary.md", "log.txt", "heatmap-hidden.png", "heatmap-mlp.png",
            "average-ie.png"} <= names and "heatmap-attn.png" not in names
    for png in ("heatmap-hidden.png", "heatmap-mlp.png", "average-ie.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((run / "trace.json").read_text())
    p = data["prompt"]
    assert len(p["kinds"]["mlp"]["p"]) == len(p["tokens"]) and len(p["kinds"]["mlp"]["p"][0]) == 3
    assert p["answer"]["source"] == "target" and p["kinds"]["mlp"]["window"] == 10
    assert len(data["cases"]["per_case"]) == 2 and data["cases"]["suggested"]["rome_layer"] in (0, 1, 2)
    assert set(data["seconds"]) == {"prompt", "cases"}
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["settings"]["samples"] == 2 and config["settings"]["noise_std"]["multiplier"] == 3.0
    assert "suggested ROME layer" in res.output


@pytest.mark.parametrize("args,message", [
    (["--prompt", PROMPT, "--subject", "Louvre"], "subject 'Louvre' does not occur in the prompt"),
    (["--prompt", PROMPT], "--prompt needs --subject"),
    ([], "give --prompt and --subject"),
    (["--prompt", PROMPT, "--subject", SUBJECT, "--kind", "resid"], "--kind resid"),
])
def test_cli_bad_input_is_one_line_exit_2(tiny_dir, monkeypatch, args, message):
    monkeypatch.setenv("KEDIT_HOME", str(tiny_dir / "home"))
    res = runner.invoke(app, ["trace", "--model", str(tiny_dir / "tiny-llama"), "--out", str(tiny_dir / "bad"),
                              *args])
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], res.output
    assert not (tiny_dir / "bad").exists()
