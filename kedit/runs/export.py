"""A run's edits as a patch: read them, check the base model, export the edited model.

The file ``edit.safetensors`` (written by :func:`kedit.runs.experiment.write_run`; runs
written before edit kinds have ``delta.safetensors``, weight deltas only) holds one tensor
per ``<label>/<tensor name>`` and the metadata ``mode`` (``independent`` |
``sequential``), ``model_fingerprint``, ``method``, ``cases`` (JSON: label -> the case ids
that label's edit edits) and ``edits`` (JSON: label -> the edit's class, data and meta).
A label is a case id (independent single-case edits) or ``batch<N>`` (a batch of a batch
method, or step N of a sequential run).  Which edits a choice means:
:func:`kedit.runs.result.select_edits`.

Export (:func:`export_model`): edits that merge into the weights (weight deltas, LoRA
adapters) give a plain Hugging Face model directory.  The others (GRACE, WISE, IKE) give
the base model's directory plus ``kedit-edit.safetensors``: :func:`load_edited` reads
such a directory back as a model that behaves edited; plain ``from_pretrained`` on it
gives the unedited base model.

Loading is safetensors only (never pickle).  Applying to a model whose fingerprint is
not the run's base model is refused unless forced.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kedit.methods.edit import Delta, Edit, EditError, class_path, import_class
from kedit.util.atomic import refused_as
from kedit.runs.rundir import RUN_KINDS, run_kind
from kedit.runs.result import (DELTA_FILE, EDIT_FILE, EditResult, PatchError, applied_edits, check_fingerprint,
                               select_edits)

if TYPE_CHECKING:
    from kedit.models.load import LoadedModel

PROVENANCE_FILE = "kedit-patch.json"
EDITED_FILE = "kedit-edit.safetensors"

__all__ = ["PatchError", "check_fingerprint", "export_model", "export_run", "load_edited", "load_run",
           "read_patch", "select_edits"]


# --------------------------------------------------------------------------- reading


def _read_edit_file(path: Path) -> tuple[dict[str, list[str]], dict[str, Edit], dict[str, str]]:
    """``edit.safetensors`` / ``delta.safetensors`` -> (label -> case ids, label -> edit, metadata)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise PatchError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0] if str(e) else e})") from None
    try:
        groups: dict[str, list[str]] = json.loads(meta.get("cases", "{}"))
        specs: dict[str, dict] = json.loads(meta.get("edits", "{}"))
    except ValueError:
        raise PatchError(f"{path}: metadata field 'cases' or 'edits' is not JSON") from None
    by_label: dict[str, dict[str, torch.Tensor]] = {label: {} for label in groups}
    for key, t in tensors.items():
        label, sep, name = key.partition("/")
        if not sep or label not in by_label:
            # labels are case ids or batch<N>; a case id may hold "/", so try the longest label
            label = next((lb for lb in sorted(by_label, key=len, reverse=True) if key.startswith(lb + "/")), None)
            if label is None:
                raise PatchError(f"{path}: tensor '{key}' is not '<label>/<name>' with a label in the metadata")
            name = key[len(label) + 1:]
        by_label[label][name] = t
    edits: dict[str, Edit] = {}
    for label, ids in groups.items():
        spec = specs.get(label)
        base_meta = {"label": label, "cases": list(ids)}
        if spec is None:
            edits[label] = Delta(by_label[label], base_meta)
            continue
        try:
            cls = import_class(spec["class"])
            edits[label] = cls.from_saved(by_label[label], spec.get("data", {}), {**spec.get("meta", {}), **base_meta})
        except (EditError, KeyError, TypeError) as e:
            raise PatchError(f"{path}: edit '{label}' cannot be read ({e})") from None
    return groups, edits, meta


def read_patch(run_dir: str | os.PathLike) -> tuple[dict[str, Edit], dict[str, Any]]:
    """A run's edit file -> (edits keyed as :attr:`EditResult.edits`, metadata).

    Keys follow :class:`kedit.runs.result.EditResult`: an independent run maps each case id
    to its edit (the cases of one batch share one object), a sequential run maps
    ``batch<N>`` to step N.  The metadata dict has ``mode``, ``sequential``,
    ``model_fingerprint``, ``method`` and ``groups`` (label -> case ids, file order).
    """
    path = Path(run_dir) / EDIT_FILE
    if not path.is_file():
        path = Path(run_dir) / DELTA_FILE
    if not path.is_file():
        raise PatchError(f"{run_dir}: no {EDIT_FILE} (bench runs keep no edits; 'kedit edit' runs do)")
    groups, by_label, meta = _read_edit_file(path)
    mode = meta.get("mode", "independent")
    if mode not in ("independent", "sequential"):
        raise PatchError(f"{path}: metadata field 'mode': expected independent or sequential, got {mode!r}")
    sequential = mode == "sequential"
    edits: dict[str, Edit] = {}
    for label, ids in groups.items():
        edit = by_label[label]
        if sequential:
            if not label.startswith("batch") or not label.removeprefix("batch").isdigit():
                raise PatchError(f"{path}: sequential run with label '{label}' (expected batch<N>)")
            edits[label] = edit
        else:
            for case_id in ids:
                edits[case_id] = edit
    info = {"mode": mode, "sequential": sequential, "model_fingerprint": meta.get("model_fingerprint", ""),
            "method": meta.get("method", ""), "groups": groups}
    return edits, info


def read_run_config(run_dir: str | os.PathLike) -> dict:
    import yaml

    f = Path(run_dir) / "config.yaml"
    if not f.is_file():
        raise PatchError(f"{run_dir}: no config.yaml (not a kedit run directory)")
    try:
        config = yaml.safe_load(f.read_text()) or {}
    except yaml.YAMLError as e:
        raise PatchError(f"{f}: not valid YAML ({str(e).splitlines()[0]})") from None
    kind = run_kind(config)
    if kind in ("train", "trace"):
        raise PatchError(f"{run_dir}: {RUN_KINDS[kind]}, not an edit run: it holds no edit")
    return config


def load_run(run_dir: str | os.PathLike, model: LoadedModel | None = None, *, force: bool = False) -> EditResult:
    """A finished run directory as an :class:`~kedit.runs.result.EditResult` (cases, records,
    metrics, edits), optionally bound to ``model`` (fingerprint checked unless ``force``)
    so that ``result.apply()`` / ``result.applied()`` work on it."""
    from kedit.data.cases import load_cases
    from kedit.runs.rundir import read_results

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PatchError(f"{run_dir}: no such run directory")
    config = read_run_config(run_dir)
    edits, info = read_patch(run_dir)
    cases = load_cases(run_dir / "cases.jsonl", "kedit") if (run_dir / "cases.jsonl").exists() else []
    metrics_file = run_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    result = EditResult(cases, read_results(run_dir / "results.jsonl"), metrics, edits, info["sequential"])
    result.base_fingerprint = info["model_fingerprint"] or (config.get("model") or {}).get("fingerprint", "")
    result.run_dir = run_dir
    if model is not None:
        check_fingerprint(result.base_fingerprint, model, force=force, what=str(run_dir))
        result.model = model
    return result


# --------------------------------------------------------------------------- exporting


def savable_model(model: torch.nn.Module) -> torch.nn.Module:
    """``model``, or a plain copy of it that ``save_pretrained`` accepts.

    A model read from GGUF keeps ``quantization_config`` (``quant_method: gguf``) in its
    config -- also the safetensors cache kedit converts GGUF into -- and transformers then
    refuses ``save_pretrained``, although its weights are ordinary dequantised tensors.
    Such a model is rebuilt from its config without the quantization entry, on the meta
    device, and given the same tensors (``assign=True``: shared, not copied).  Other
    quantisation methods (real low-bit weights) are refused.
    """
    from transformers import AutoModelForCausalLM

    qc = getattr(model.config, "quantization_config", None)
    if qc is None and getattr(model, "hf_quantizer", None) is None:
        return model
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if str(getattr(method, "value", method)) != "gguf":
        raise PatchError(f"cannot export a model quantized with {method} (load it unquantized)")
    config = copy.deepcopy(model.config)
    del config.quantization_config
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False, assign=True)
    fresh.tie_weights()
    still_meta = [n for n, p in fresh.named_parameters() if p.is_meta]
    if still_meta or unexpected:
        raise PatchError(f"cannot rebuild the model for saving: {(still_meta + list(unexpected))[:3]}")
    fresh.generation_config = model.generation_config
    return fresh


def check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PatchError(f"--out {out}: already exists and is not empty (choose a new directory)")


def _save_edit_chain(edits: Sequence[Edit], path: Path) -> None:
    """The edits, in order, as one safetensors file ``step<i>/<tensor>`` + their classes."""
    from safetensors.torch import save_file

    tensors, specs = {}, []
    for i, e in enumerate(edits):
        specs.append({"class": class_path(type(e)), "data": e.to_json(), "meta": e.meta})
        tensors.update({f"step{i}/{k}": v.detach().cpu().contiguous() for k, v in e.to_tensors().items()})
    save_file(tensors, str(path), metadata={"steps": json.dumps(specs, default=str)})


def _load_edit_chain(path: Path) -> list[Edit]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        specs = json.loads(meta["steps"])
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise PatchError(f"{path}: not a kedit edit file ({e})") from None
    out = []
    for i, spec in enumerate(specs):
        own = {k[len(f"step{i}/"):]: v for k, v in tensors.items() if k.startswith(f"step{i}/")}
        try:
            out.append(import_class(spec["class"]).from_saved(own, spec.get("data", {}), spec.get("meta", {})))
        except (EditError, KeyError, TypeError) as e:
            raise PatchError(f"{path}: step {i} cannot be read ({e})") from None
    return out


def export_model(loaded: LoadedModel, edits: Sequence[Edit], out_dir: str | os.PathLike,
                 provenance: dict | None = None) -> Path:
    """Write ``loaded`` with ``edits`` as a Hugging Face model directory.

    Mergeable edits (weight deltas, LoRA adapters) are merged into the weights: the
    directory is a plain model (``from_pretrained`` gives the edited model).  Otherwise
    (GRACE, WISE, IKE) the directory holds the unedited base model plus
    ``kedit-edit.safetensors`` (the edits, in order): :func:`load_edited` gives the edited
    model; plain ``from_pretrained`` gives the base model.

    ``save_pretrained`` (safetensors weights, config, generation config) and the
    tokenizer's ``save_pretrained`` go to a temporary directory beside ``out_dir``,
    with ``kedit-patch.json`` (where the weights came from); it is renamed to
    ``out_dir`` when complete.  An existing non-empty ``out_dir`` is refused.  The
    model is restored bit-identically afterwards.
    """
    out = Path(out_dir)
    check_out_dir(out)
    mergeable = all(e.mergeable for e in edits)
    if mergeable:
        try:
            to_apply: list[Edit] = [e.merged(loaded.model) for e in edits]
        except EditError as e:
            raise PatchError(str(e)) from None
    else:
        to_apply = []
    with refused_as(f"--out {out}"):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
        try:
            with applied_edits(loaded.model, to_apply):
                savable_model(loaded.model).save_pretrained(tmp, safe_serialization=True)
            loaded.tokenizer.save_pretrained(tmp)
            if not mergeable:
                _save_edit_chain(edits, tmp / EDITED_FILE)
            info = {"base_model": loaded.name, "base_fingerprint": loaded.fingerprint,
                    "edits": [e.meta.get("label", "") for e in edits], "kinds": sorted({e.kind for e in edits}),
                    "merged": mergeable,
                    "load_with": "transformers from_pretrained" if mergeable else "kedit.load_edited(DIR)",
                    **(provenance or {})}
            (tmp / PROVENANCE_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)   # mkdtemp (and some writers) make private files; a model is shared
            for f in tmp.iterdir():
                os.chmod(f, 0o666 & ~umask)
            if out.exists():
                out.rmdir()  # empty, checked above
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_edited(path: str | os.PathLike, *, device: str = "cpu", dtype: str = "float32",
                progress=None) -> LoadedModel:
    """A directory written by :func:`export_model` as a loaded model that behaves edited: the
    model, plus the edits of ``kedit-edit.safetensors`` applied in order (memories,
    contexts) when the directory has one.  A merged export needs nothing more."""
    from kedit.models.load import load_model

    path = Path(path)
    if not path.is_dir():
        raise PatchError(f"{path}: no such model directory")
    chain = _load_edit_chain(path / EDITED_FILE) if (path / EDITED_FILE).exists() else []
    loaded = load_model(str(path), device=device, dtype=dtype, progress=progress or (lambda *_: None))
    for e in chain:
        try:
            e.apply(loaded.model)
        except EditError as err:
            raise PatchError(f"{path}: {err}") from None
        e.forget_originals()
    return loaded


def base_model_spec(config: dict) -> str:
    """The ``--model`` spec that loads a run's base model: its name when that still
    resolves (a model config name, an existing path, a hub id), else the directory the
    run loaded."""
    from kedit.models.load import model_configs

    model = config.get("model") or {}
    name, path = str(model.get("name", "")), str(model.get("path", ""))
    if not name and not path:
        raise PatchError("config.yaml has no model.name (not a kedit run directory)")
    if name in model_configs() or Path(name).expanduser().exists():
        return name
    if path and Path(path).is_dir():
        return path
    return name


def load_base_model(config: dict, model: LoadedModel | str | None = None, *, device: str = "auto",
                    dtype: str | None = None, progress=print) -> LoadedModel:
    """``model`` if loaded, else load it (a spec) or the run's base model, in the run's dtype
    unless ``dtype`` says otherwise."""
    from kedit.models.load import load_model

    if model is not None and not isinstance(model, str):
        return model
    m = config.get("model") or {}
    return load_model(model or base_model_spec(config), device=device, dtype=dtype or str(m.get("dtype", "float32")),
                      progress=progress)


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, model: LoadedModel | str | None = None,
               case: str | None = None, all_: bool = False, force: bool = False, device: str = "cpu",
               dtype: str | None = None, progress=print) -> tuple[Path, list[Edit], LoadedModel]:
    """``kedit apply``: the run's base model (or ``model``) + the chosen edits -> ``out_dir``.

    Everything that can be refused (the choice of edits, an existing ``out_dir``) is
    checked before the model is loaded.  Returns (the directory, the edits applied, the model)."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    edits, info = read_patch(run_dir)
    chosen = select_edits(edits, info["sequential"], case, all_)
    out = Path(out_dir)
    check_out_dir(out)
    loaded = load_base_model(config, model, device=device, dtype=dtype, progress=progress)
    check_fingerprint(info["model_fingerprint"], loaded, force=force, what=f"run {run_dir}")
    path = export_model(loaded, chosen, out,
                        {"run": str(run_dir.resolve()), "method": info["method"], "case": case, "all": all_,
                         "mode": info["mode"]})
    return path, chosen, loaded
