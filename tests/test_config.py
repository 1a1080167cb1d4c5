"""Hyperparameter files: every shipped YAML loads; errors name file and key; EasyEdit YAML accepted."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import tiny_model

from kedit.config import ConfigError, load_params, resolve_params
from kedit.methods.registry import get_method, method_names
from kedit.util.paths import configs_dir


def all_method_configs():
    return sorted((configs_dir() / "methods").glob("*/*.yaml"))


@pytest.mark.parametrize("path", all_method_configs(), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_shipped_config_loads(path):
    cls = get_method(path.parent.name)
    params = load_params(cls.Params, path)
    assert params == load_params(cls.Params, path)  # frozen, comparable


def test_every_method_has_a_config_for_the_embedded_model():
    for name in method_names():
        assert (configs_dir() / "methods" / name / "smollm2-135m.yaml").exists(), name


def test_unknown_key_and_wrong_type_are_reported_together(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("layer: five\nv_lrr: 0.5\n")
    with pytest.raises(ConfigError) as e:
        load_params(get_method("rome").Params, f)
    msg = str(e.value)
    assert f"{f}: unknown key 'v_lrr'" in msg and "did you mean 'v_lr'" in msg
    assert f"{f}: key 'layer': expected int, got 'five'" in msg
    assert "\n" not in msg


def test_invalid_yaml_names_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("layer: 3\nkl_factor: [1,\n")
    with pytest.raises(ConfigError, match=rf"{f}:\d+: not valid YAML"):
        load_params(get_method("rome").Params, f)


EASYEDIT_ROME = """alg_name: "ROME"
model_name: "./hugging_cache/llama-7b"
stats_dir: "./data/stats"
device: 0
layers: [1]
fact_token: "subject_last"
v_num_grad_steps: 25
v_loss_layer: 2
v_lr: 5e-1
v_weight_decay: 1e-3
clamp_norm_factor: 4
kl_factor: 0.0625
mom2_adjustment: false
context_template_length_params: [[5, 10], [10, 10]]
rewrite_module_tmp: "model.layers.{}.mlp.down_proj"
layer_module_tmp: "model.layers.{}"
mlp_module_tmp: "model.layers.{}.mlp"
attn_module_tmp: "model.layers.{}.self_attn"
ln_f_module: "model.norm"
lm_head_module: "lm_head"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
model_parallel: false
fp16: false
"""


def test_easyedit_rome_yaml_is_accepted_unchanged(tmp_path):
    f = tmp_path / "ROME-llama.yaml"
    f.write_text(EASYEDIT_ROME)
    adapter = tiny_model("llama").adapter
    p = load_params(get_method("rome").Params, f, adapter)
    assert (p.layer, p.v_num_grad_steps, p.v_weight_decay, p.mom2_adjustment, p.mom2_samples) == (1, 25, 1e-3, False, 100000)
    assert p.v_loss_layer == -1  # EasyEdit's "last layer" (2 of 3) is kedit's -1
    assert p.context_template_length_params == ((5, 10), (10, 10))
    # EasyEdit's compute_v stops on the whole loss; kedit's own files on the target NLL
    assert p.early_stop_on == "total"
    assert load_params(get_method("rome").Params, f, adapter, {"early_stop_on": "nll"}).early_stop_on == "nll"
    own = load_params(get_method("rome").Params, configs_dir() / "methods/rome/llama.yaml", adapter)
    assert own.early_stop_on == "nll"


def test_easyedit_module_paths_checked_against_the_model(tmp_path):
    f = tmp_path / "ROME-gpt2.yaml"
    f.write_text(EASYEDIT_ROME)
    with pytest.raises(ConfigError) as e:
        load_params(get_method("rome").Params, f, tiny_model("gpt2").adapter)
    assert f"{f}: key 'rewrite_module_tmp'" in str(e.value) and "transformer.h.{}.mlp.c_proj" in str(e.value)


def test_resolve_params_prefers_model_then_family_and_errors_clearly():
    loaded = tiny_model("gpt2")
    params, source = resolve_params(get_method("rome"), "tiny-gpt2", loaded.adapter)
    assert Path(source).name == "gpt2.yaml"
    neox = tiny_model("gpt_neox")
    with pytest.raises(ConfigError, match="configs/methods/rome/gpt_neox.yaml or pass --hparams"):
        resolve_params(get_method("rome"), "tiny-neox", neox.adapter)
    _, source = resolve_params(get_method("rome"), "smollm2-135m", tiny_model("llama").adapter)
    assert Path(source).name == "smollm2-135m.yaml"


def test_overrides_are_validated_too():
    loaded = tiny_model("llama")
    with pytest.raises(ConfigError, match="unknown key 'layr'"):
        resolve_params(get_method("rome"), "smollm2-135m", loaded.adapter, overrides={"layr": 2})
    p, _ = resolve_params(get_method("rome"), "smollm2-135m", loaded.adapter, overrides={"layer": 2})
    assert p.layer == 2


def test_unknown_method_suggests_a_name():
    with pytest.raises(KeyError, match="did you mean 'rome'"):
        get_method("rom")


def test_a_layer_the_model_does_not_have_is_one_config_error():
    from kedit.runs.experiment import make_method

    loaded = tiny_model("llama")
    n = loaded.adapter.n_layers
    with pytest.raises(ConfigError, match=rf"--set: 'layer': layer 99 out of range, the model has {n} layers"):
        make_method(loaded, "rome", overrides={"layer": 99})
    with pytest.raises(ConfigError, match=rf"'layers': layer {n} out of range"):
        make_method(loaded, "memit", overrides={"layers": [n - 1, n]})
    method, _ = make_method(loaded, "rome", overrides={"layer": n - 1})
    assert method.params.layer == n - 1


def test_easyedit_lora_yaml_is_accepted_unchanged(tmp_path):
    f = tmp_path / "llama-7b.yaml"
    f.write_text('alg_name: "LoRA"\nmodel_name: "./hugging_cache/llama-2-7b"\ndevice: 0\nlora_type: "adalora"\n'
                 'layers: []\nnum_steps: 70\nbatch_size: 1\nmax_length: 30\nlr: 5e-3\nweight_decay: 0\n'
                 'kl_factor: 0\nrank: 8\nlora_alpha: 32\nlora_dropout: 0.1\nnorm_constraint: false\n'
                 'target_modules: ["q_proj", "v_proj"]\nmodel_parallel: False\n')
    p = load_params(get_method("lora").Params, f, tiny_model("llama").adapter)
    assert (p.variant, p.rank, p.lora_alpha, p.lora_dropout, p.lr, p.num_steps) == ("adalora", 8, 32, 0.1, 5e-3, 70)
    assert p.target_modules == ("q_proj", "v_proj") and p.layers == () and p.norm_constraint is None
