"""`--device-map`: a model whose modules accelerate dispatched (here one block offloaded to
disk, the others on the CPU: the split a CPU-only machine allows) edits exactly as the
same model on one device; an offloaded layer is refused, bad maps are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import save_tiny_model_dir
from typer.testing import CliRunner

import kedit
from kedit.cli import app
from kedit.config import ConfigError
from kedit.data.cases import EditCase
from kedit.models.load import ModelError, load_model

runner = CliRunner()

MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu",
       "model.layers.2": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
CASES = [EditCase(case_id=f"c{i}", template="A fact about {}", subject=s, target_new="of", ground_truth="the",
                  rephrase_prompts=(f"Another fact about {s}",)) for i, s in enumerate(["France", "Tokyo"])]
COMMON = {"v_num_grad_steps": 10, "clamp_norm_factor": 1000.0, "kl_factor": 0.0, "v_weight_decay": 0.0,
          "context_template_length_params": [[3, 1]], "mom2_adjustment": True, "mom2_samples": 20}


@pytest.fixture()
def models(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))
    d = save_tiny_model_dir(tmp_path / "tiny-llama")
    (tmp_path / "map.json").write_text(json.dumps(MAP))
    plain = load_model(str(d), device="cpu")
    spread = load_model(str(d), device_map=str(tmp_path / "map.json"))
    return plain, spread, tmp_path


def deltas(result) -> dict[str, torch.Tensor]:
    return {f"{label}/{k}": v for label, e in result.edits.items() for k, v in e.tensors.items()}


def test_dispatched_model_edits_as_the_model_on_one_device(models):
    plain, spread, tmp = models
    assert spread.model.get_parameter("model.layers.0.mlp.down_proj.weight").device.type == "meta"
    assert spread.adapter.offloaded(0) and not spread.adapter.offloaded(1)
    assert spread.info["device_map"]["model.layers.0"] == "disk" and spread.device == torch.device("cpu")
    ids = plain.tokenizer(["A fact about France"], return_tensors="pt")
    assert torch.equal(plain.model(**ids).logits, spread.model(**ids).logits)
    for method, hp in (("rome", {"layer": 1}), ("memit", {"layers": [1, 2], "mom2_update_weight": 1e-2})):
        # each model computes its own statistics (the dispatched one through the offloaded block)
        runs = [kedit.edit(m, CASES, method, {**COMMON, **hp}, stats_dir=str(tmp / f"stats{i}"))
                for i, m in enumerate((plain, spread))]
        a, b = deltas(runs[0]), deltas(runs[1])
        assert a.keys() == b.keys() and a
        for k in a:
            assert torch.equal(a[k], b[k]), k
        assert runs[0].metrics == runs[1].metrics
        assert runs[1].metrics["post"]["rewrite_acc"] == 1.0
    assert len(list((tmp / "stats1").rglob("layer*.safetensors"))) == 2          # layers 1 and 2
    # the dispatched model's weights are as loaded after the edits were reverted
    assert torch.equal(plain.model(**ids).logits, spread.model(**ids).logits)


def test_offloaded_layer_and_bad_maps_are_refused(models):
    _, spread, tmp = models
    with pytest.raises(ConfigError, match="layer 0 is offloaded by the device map"):
        kedit.edit(spread, CASES, "rome", {**COMMON, "layer": 0}, stats_dir=str(tmp / "stats"))
    with pytest.raises(ModelError, match="neither auto"):
        load_model(str(tmp / "tiny-llama"), device_map="everywhere")
    (tmp / "bad.json").write_text("[1, 2]")
    res = runner.invoke(app, ["bench", "counterfact", "-n", "1", "--model", str(tmp / "tiny-llama"),
                              "--device-map", str(tmp / "bad.json"), "--out", str(tmp / "runs")])
    assert res.exit_code == 2 and "expected a JSON object" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_bench_with_a_device_map_scores_as_without(models):
    _, _, tmp = models
    data = tmp / "cases.jsonl"
    data.write_text("".join(json.dumps(c.to_dict()) + "\n" for c in CASES))
    hp = tmp / "rome.yaml"
    hp.write_text(json.dumps({**COMMON, "layer": 1, "mom2_adjustment": False}))
    base = ["bench", "counterfact", "--data", str(data), "--model", str(tmp / "tiny-llama"), "--hparams", str(hp)]
    got = {}
    for name, extra in (("plain", ["--device", "cpu"]), ("spread", ["--device-map", str(tmp / "map.json")])):
        res = runner.invoke(app, [*base, *extra, "--out", str(tmp / name)])
        assert res.exit_code == 0, res.output
        (run,) = list((tmp / name).iterdir())
        got[name] = {k: v for k, v in json.loads((run / "metrics.json").read_text()).items() if k != "time"}
        if name == "spread":
            assert "model.layers.0: disk" in (run / "config.yaml").read_text()
    assert got["plain"] == got["spread"]


@pytest.mark.parametrize("method, hp", [
    ("ft_m", {"layers": [1], "num_steps": 5, "lr": 1e-2}),
    ("lora", {"num_steps": 5, "variant": "lora", "layers": [1, 2]}),
    ("grace", {"layer": 1, "n_iter": 10}),
    ("wise", {"layer": 1, "n_iter": 5}),
    ("ike", {"k": 2}),
    ("mend", {"layers": [1, 2], "editor": "untrained", "edit_lr": 0.5}),
    ("serac", {"editor": "untrained", "cntr_layers": [1, 2]}),
])
def test_other_kinds_edit_a_dispatched_model_as_the_model_on_one_device(models, method, hp):
    """Weight, adapter, memory, context and learned edits (MEND, SERAC with untrained editors):
    the same scores with block 0 offloaded."""
    import yaml

    plain, spread, tmp = models
    hp_file = tmp / f"{method}.yaml"            # a whole file: no shipped config names the tiny model
    hp_file.write_text(yaml.safe_dump(hp))
    runs = [kedit.edit(m, CASES, method, str(hp_file), stats_dir=str(tmp / f"stats{i}"))
            for i, m in enumerate((plain, spread))]
    assert runs[0].metrics == runs[1].metrics


def test_an_adapter_on_an_offloaded_layer_is_refused_before_any_work(models):
    import yaml

    _, spread, tmp = models
    hp_file = tmp / "lora-all.yaml"                 # every layer: block 0 is offloaded
    hp_file.write_text(yaml.safe_dump({"num_steps": 5, "variant": "lora"}))
    with pytest.raises(ConfigError, match="offloaded by the device map"):
        kedit.edit(spread, CASES, "lora", str(hp_file))


def test_serac_refuses_a_counterfactual_change_on_an_offloaded_layer(models):
    import yaml

    _, spread, tmp = models
    hp_file = tmp / "serac.yaml"                    # cntr_layers: every layer, block 0 offloaded
    hp_file.write_text(yaml.safe_dump({"editor": "untrained"}))
    with pytest.raises(ConfigError, match="offloaded by the device map"):
        kedit.edit(spread, CASES, "serac", str(hp_file))
