"""Hyperparameter files: YAML -> a method's frozen ``Params`` dataclass.

One loader for every method.  Unknown keys and wrong types are errors that name the
file and the key, all reported at once.  An EasyEdit hparams YAML is accepted unchanged:
its keys are translated (``EASYEDIT_KEYS``), its module-path templates are checked
against the model's architecture adapter, and its bookkeeping keys are ignored.  Its
values keep EasyEdit's meaning: where the target optimisation takes ``early_stop_on``,
the file's threshold applies to the whole loss, as EasyEdit's ``compute_v`` /
``compute_z`` compare it (kedit's own files stop on the target NLL).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from kedit.util.paths import configs_dir


class ConfigError(ValueError):
    """A hyperparameter file that cannot be used (one line naming file and key)."""


# EasyEdit key -> kedit key (same meaning).  ``layers`` maps per method (see Params.from_easyedit).
EASYEDIT_KEYS = {
    "fact_token": "fact_token",
    "v_num_grad_steps": "v_num_grad_steps",
    "v_lr": "v_lr",
    "v_loss_layer": "v_loss_layer",
    "v_weight_decay": "v_weight_decay",
    "clamp_norm_factor": "clamp_norm_factor",
    "kl_factor": "kl_factor",
    "mom2_adjustment": "mom2_adjustment",
    "mom2_n_samples": "mom2_samples",
    "mom2_update_weight": "mom2_update_weight",
    "context_template_length_params": "context_template_length_params",
    # AlphaEdit, EMMET
    "nullspace_threshold": "nullspace_threshold",
    "L2": "l2",
    "emmet_lambda": "emmet_lambda",
    "update_norm_lambda": "update_norm_lambda",
    # FT (FT-L / FT-M): norm_constraint false -> null (no bound); objective_optimization
    # prompt_last is FT-L, target_new FT-M (methods/ft.py)
    "lr": "lr",
    "num_steps": "num_steps",
    "weight_decay": "weight_decay",
    "norm_constraint": "norm_constraint",
    "objective_optimization": "objective",
    # LoRA / AdaLoRA (methods/finetune/lora.py): lora_type adalora|lora is kedit's variant
    "lora_type": "variant",
    "rank": "rank",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "target_modules": "target_modules",
}
# EasyEdit keys whose ``false`` means "off", which kedit spells null.
EASYEDIT_FALSE_IS_NULL = {"norm_constraint"}
# EasyEdit module templates -> the adapter's module kind they must name.
EASYEDIT_MODULE_KEYS = {
    "rewrite_module_tmp": "mlp_out",
    "layer_module_tmp": "block",
    "mlp_module_tmp": "mlp",
    "attn_module_tmp": "attn",
    "ln_f_module": "final_norm",
}
# Bookkeeping keys with no effect on the science in kedit (devices, paths, dataset names).
EASYEDIT_IGNORED = {"alg_name", "model_name", "layer_selection", "stats_dir", "device", "model_parallel", "fp16",
                    "mom2_dataset", "mom2_dtype", "lm_head_module", "max_length", "batch_size"}
# AlphaEdit's precomputed projector file: kedit builds and caches P beside the statistics.
EASYEDIT_IGNORED |= {"P_loc"}


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_type_ok(v, a) for v, a in zip(value, args))
        return all(_type_ok(v, args[0]) for v in value) if args else True
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _coerce_float(value: Any, hint: Any) -> Any:
    """PyYAML reads ``5e-1`` (no dot) as a string, as YAML 1.1 says; EasyEdit files are full
    of such values, so a string that parses as a number is accepted for a float field."""
    wants_float = hint is float or (typing.get_origin(hint) in (typing.Union, types.UnionType)
                                    and float in typing.get_args(hint))
    if wants_float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def build_params(cls: type, data: dict, source: str) -> Any:
    """Validate ``data`` against dataclass ``cls`` (all errors at once) and construct it."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    data = {k: _coerce_float(v, hints[k]) if k in fields else v for k, v in data.items()}
    errors = []
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            errors.append(f"{source}: unknown key '{key}'{hint}")
    for key, value in data.items():
        if key in fields and not _type_ok(value, hints[key]):
            errors.append(f"{source}: key '{key}': expected {_hint_name(hints[key])}, got {value!r}")
    if errors:
        raise ConfigError("; ".join(errors))
    try:
        params = cls(**{k: _freeze(v) for k, v in data.items()})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {e}") from None
    check = getattr(params, "check", None)
    if check is not None:
        problem = check()
        if problem:
            raise ConfigError(f"{source}: {problem}")
    return params


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def is_easyedit(data: dict) -> bool:
    return "alg_name" in data or any(k in data for k in EASYEDIT_MODULE_KEYS)


def translate_easyedit(data: dict, source: str, adapter: Any, layer_key: str) -> dict:
    """EasyEdit hparams dict -> kedit keys; module templates checked against the adapter."""
    out: dict[str, Any] = {}
    errors = []
    layers = data.get("layers")
    probe = layers[0] if isinstance(layers, list) and layers else 0
    for key, value in data.items():
        if key == "layers":
            out[layer_key] = value[0] if layer_key == "layer" and isinstance(value, list) and len(value) == 1 else value
        elif key in EASYEDIT_KEYS:
            out[EASYEDIT_KEYS[key]] = None if key in EASYEDIT_FALSE_IS_NULL and value is False else value
        elif key in EASYEDIT_MODULE_KEYS:
            if adapter is None:
                continue
            kind = EASYEDIT_MODULE_KEYS[key]
            expected = adapter.module_path(kind, probe if kind != "final_norm" else None)
            given = str(value).replace("{}", str(probe)).removesuffix(".weight")  # FT files name the weight
            if given != expected:
                errors.append(f"{source}: key '{key}': '{value}' does not match this model "
                              f"({adapter.model.config.model_type}: {expected.replace(str(probe), '{}', 1) if kind != 'final_norm' else expected})")
        elif key in EASYEDIT_IGNORED:
            continue
        else:
            errors.append(f"{source}: unknown EasyEdit key '{key}'")
    if errors:
        raise ConfigError("; ".join(errors))
    if out.get("v_loss_layer") is not None and adapter is not None and out["v_loss_layer"] == adapter.n_layers - 1:
        out["v_loss_layer"] = -1
    return out


def load_params(cls: type, path: str | Path, adapter: Any = None, overrides: dict | None = None) -> Any:
    """Read a kedit or EasyEdit hparams YAML into ``cls``; ``overrides`` win over the file."""
    path = Path(path)
    source = str(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"{source}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{source}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of hyperparameters")
    if is_easyedit(data):
        data = translate_easyedit(data, source, adapter, getattr(cls, "LAYER_KEY", "layers"))
        if "early_stop_on" in {f.name for f in dataclasses.fields(cls)}:
            data.setdefault("early_stop_on", "total")
    data.pop("method", None)
    return build_params(cls, {**data, **(overrides or {})}, source)


def layer_fields(params: Any) -> list[str]:
    """The fields of a Params that name layers of the model: ``layer``, ``layers`` and every
    ``*_layer`` / ``*_layers`` (an int, a list of ints, or None for the method's default)."""
    return [f.name for f in dataclasses.fields(params)
            if f.name in ("layer", "layers") or f.name.endswith(("_layer", "_layers"))]


def check_layer_list(layers: Any, adapter: Any, what: str) -> None:
    """Every layer in ``layers`` exists in the model, else one ConfigError naming ``what``."""
    n = adapter.n_layers
    bad = [v for v in layers if not 0 <= v < n]
    if bad:
        raise ConfigError(f"{what}: layer {bad[0]} out of range, the model has {n} layers (0..{n - 1})")


def check_layers(params: Any, adapter: Any, source: str, overridden: set[str] = frozenset()) -> None:
    """Every layer a Params names exists in the model: one ConfigError naming the key.

    A field listed in the Params' ``LAST_LAYER_FIELDS`` may also be -1, the last layer."""
    n = adapter.n_layers
    last_ok = set(getattr(params, "LAST_LAYER_FIELDS", ()))
    for name in layer_fields(params):
        value = getattr(params, name, None)
        if value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        bad = [v for v in values if isinstance(v, int) and not 0 <= v < n and not (v == -1 and name in last_ok)]
        if bad:
            where = "--set" if name in overridden else source
            last = ", or -1 for the last" if name in last_ok else ""
            raise ConfigError(f"{where}: '{name}': layer {bad[0]} out of range, the model has {n} layers "
                              f"(0..{n - 1}{last})")
        offloaded = [v for v in values if isinstance(v, int) and v >= 0 and adapter.offloaded(v)]
        if offloaded:
            raise ConfigError(f"'{name}': layer {offloaded[0]} is offloaded by the device map (its weights are loaded "
                              f"only for each call) and cannot be edited: put it on a device in --device-map")


def default_hparams_file(method: str, model_name: str, family: str) -> Path | None:
    """``configs/methods/<method>/<model name>.yaml``, else ``<family>.yaml``."""
    base = configs_dir() / "methods" / method
    for stem in (model_name, family):
        f = base / f"{stem}.yaml"
        if f.exists():
            return f
    return None


def resolve_params(method_cls: type, model_name: str, adapter: Any, hparams: str | Path | None = None,
                   overrides: dict | None = None) -> tuple[Any, str]:
    """The method's Params for this model, and where they came from."""
    path = Path(hparams) if hparams else default_hparams_file(method_cls.name, model_name, adapter.spec.family)
    if path is None:
        raise ConfigError(f"no hyperparameters for method '{method_cls.name}' and model '{model_name}' "
                          f"(family {adapter.spec.family}): add configs/methods/{method_cls.name}/"
                          f"{adapter.spec.family}.yaml or pass --hparams FILE")
    return load_params(method_cls.Params, path, adapter, overrides), str(path)
