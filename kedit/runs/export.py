"""A run's ``delta.safetensors`` as a patch: read it, choose what to apply, check the base
model, and export the edited model as a Hugging Face directory.

The file (written by :func:`kedit.runs.experiment.write_run`) holds one tensor per
``<label>/<parameter name>`` and the metadata ``mode`` (``independent`` |
``sequential``), ``model_fingerprint``, ``method`` and ``cases`` (JSON: label -> the
case ids that label's delta edits).  A label is a case id (independent single-case
edits) or ``batch<N>`` (a batch of a batch method, or step N of a sequential run).

Which delta(s) a patch puts into a model (:func:`select_deltas`):

* one delta in the run: that one;
* a sequential run: every step, in order (``--case`` is refused: the steps build on
  each other, and only the state after the last one was evaluated);
* several independent edits: the one of ``case`` (the batch that contains it), or with
  ``all_`` every one of them added up -- a model no run evaluated (independent edits are
  measured from the original weights one at a time); without either, an error.

Loading is safetensors only (never pickle).  Applying to a model whose fingerprint is
not the run's base model is refused unless forced.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kedit.methods.base import Delta

if TYPE_CHECKING:
    from kedit.models.load import LoadedModel
    from kedit.runs.runner import EditResult

DELTA_FILE = "delta.safetensors"
PROVENANCE_FILE = "kedit-patch.json"


class PatchError(ValueError):
    """A patch that cannot be read, chosen or applied as asked (one-line message)."""


# --------------------------------------------------------------------------- reading


def read_patch(run_dir: str | os.PathLike) -> tuple[dict[str, Delta], dict[str, Any]]:
    """``run_dir/delta.safetensors`` -> (deltas keyed as :attr:`EditResult.deltas`, metadata).

    Keys follow :class:`kedit.runs.runner.EditResult`: an independent run maps each case id
    to its delta (the cases of one batch share one :class:`Delta` object), a sequential
    run maps ``batch<N>`` to step N.  The metadata dict has ``mode``, ``sequential``,
    ``model_fingerprint``, ``method`` and ``groups`` (label -> case ids, file order).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(run_dir) / DELTA_FILE
    if not path.is_file():
        raise PatchError(f"{run_dir}: no {DELTA_FILE} (bench runs keep no weights; "
                         f"'kedit edit' runs do)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise PatchError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0] if str(e) else e})") from None
    try:
        groups: dict[str, list[str]] = json.loads(meta.get("cases", "{}"))
    except ValueError:
        raise PatchError(f"{path}: metadata field 'cases' is not JSON") from None
    mode = meta.get("mode", "independent")
    if mode not in ("independent", "sequential"):
        raise PatchError(f"{path}: metadata field 'mode': expected independent or sequential, got {mode!r}")
    by_label: dict[str, dict[str, torch.Tensor]] = {label: {} for label in groups}
    for key, t in tensors.items():
        label, sep, name = key.rpartition("/")
        if not sep or label not in by_label:
            raise PatchError(f"{path}: tensor '{key}' is not '<label>/<parameter>' with a label in the metadata")
        by_label[label][name] = t
    sequential = mode == "sequential"
    deltas: dict[str, Delta] = {}
    for label, ids in groups.items():
        delta = Delta(by_label[label], {"label": label, "cases": list(ids)})
        if sequential:
            if not label.startswith("batch") or not label.removeprefix("batch").isdigit():
                raise PatchError(f"{path}: sequential run with label '{label}' (expected batch<N>)")
            deltas[label] = delta
        else:
            for case_id in ids:
                deltas[case_id] = delta
    info = {"mode": mode, "sequential": sequential, "model_fingerprint": meta.get("model_fingerprint", ""),
            "method": meta.get("method", ""), "groups": groups}
    return deltas, info


def read_run_config(run_dir: str | os.PathLike) -> dict:
    import yaml

    f = Path(run_dir) / "config.yaml"
    if not f.is_file():
        raise PatchError(f"{run_dir}: no config.yaml (not a kedit run directory)")
    try:
        return yaml.safe_load(f.read_text()) or {}
    except yaml.YAMLError as e:
        raise PatchError(f"{f}: not valid YAML ({str(e).splitlines()[0]})") from None


def load_run(run_dir: str | os.PathLike, model: LoadedModel | None = None, *, force: bool = False) -> EditResult:
    """A finished run directory as an :class:`~kedit.runs.runner.EditResult` (cases, records,
    metrics, deltas), optionally bound to ``model`` (fingerprint checked unless ``force``)
    so that ``result.apply()`` / ``result.applied()`` work on it."""
    from kedit.data.cases import load_cases
    from kedit.runs.runner import EditResult
    from kedit.runs.rundir import read_results

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PatchError(f"{run_dir}: no such run directory")
    config = read_run_config(run_dir)
    deltas, info = read_patch(run_dir)
    cases = load_cases(run_dir / "cases.jsonl", "kedit") if (run_dir / "cases.jsonl").exists() else []
    metrics_file = run_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    result = EditResult(cases, read_results(run_dir / "results.jsonl"), metrics, deltas, info["sequential"])
    result.base_fingerprint = info["model_fingerprint"] or (config.get("model") or {}).get("fingerprint", "")
    result.run_dir = run_dir
    if model is not None:
        check_fingerprint(result.base_fingerprint, model, force=force, what=str(run_dir))
        result.model = model
    return result


# --------------------------------------------------------------------------- choosing


def select_deltas(deltas: dict[str, Delta], sequential: bool, case: str | None = None,
                  all_: bool = False) -> list[Delta]:
    """The deltas to apply, in order (see the module docstring for the rules)."""
    if not deltas:
        raise PatchError("the run has no weight change to apply")
    if case is not None and all_:
        raise PatchError("choose one case (--case) or all edits (--all), not both")
    if sequential:
        if case is not None:
            raise PatchError("a sequential run's edits build on each other and were evaluated together: "
                             "apply all of them (leave out --case)")
        return [d for _, d in sorted(deltas.items(), key=lambda kv: int(kv[0].removeprefix("batch")))]
    unique = list({id(d): d for d in deltas.values()}.values())
    if case is not None:
        if case not in deltas:
            shown = ", ".join(list(deltas)[:5]) + (", ..." if len(deltas) > 5 else "")
            raise PatchError(f"no case '{case}' in this run (cases: {shown})")
        return [deltas[case]]
    if len(unique) == 1 or all_:
        return unique
    first = next(iter(deltas))
    raise PatchError(f"the run holds {len(unique)} independent edits: choose one case (--case ID, e.g. "
                     f"--case {first}) or --all for their sum (a model that no run evaluated)")


def check_fingerprint(expected: str, loaded: LoadedModel, *, force: bool = False, what: str = "the patch") -> None:
    """Refuse a model that is not the run's base model (unless ``force``)."""
    if force or not expected or expected == loaded.fingerprint:
        return
    raise PatchError(f"{what} was made on the model with fingerprint {expected}; '{loaded.name}' has "
                     f"{loaded.fingerprint} (a different model or different weights); use --force "
                     f"(force=True) to apply it anyway")


def check_shapes(module: torch.nn.Module, deltas: Sequence[Delta]) -> None:
    """Every parameter the deltas name exists in ``module`` with the same shape."""
    params = dict(module.named_parameters())
    for d in deltas:
        for name, t in d.tensors.items():
            if name not in params:
                raise PatchError(f"the patch changes '{name}', which this model does not have")
            if tuple(params[name].shape) != tuple(t.shape):
                raise PatchError(f"the patch changes '{name}' with shape {tuple(t.shape)}; this model's is "
                                 f"{tuple(params[name].shape)}")


def apply_deltas(module: torch.nn.Module, deltas: Sequence[Delta]) -> list[Delta]:
    """Apply ``deltas`` to ``module`` in order; returns the applied copies for :func:`revert_deltas`.

    Each delta is applied through a private :class:`Delta` (the caller's objects keep
    their own state).  If one fails, those already applied are reverted first.
    """
    check_shapes(module, deltas)
    done: list[Delta] = []
    try:
        for d in deltas:
            done.append(Delta(d.tensors, d.meta).apply(module))
    except BaseException:
        revert_deltas(module, done)
        raise
    return done


def revert_deltas(module: torch.nn.Module, done: Sequence[Delta]) -> None:
    """Undo :func:`apply_deltas` bit-identically: reverse order, so a parameter that several
    deltas change gets back the copy taken before the first one."""
    for d in reversed(done):
        d.revert(module)


@contextlib.contextmanager
def applied(module: torch.nn.Module, deltas: Sequence[Delta]) -> Iterator[None]:
    """The block runs with ``deltas`` applied; the weights are restored after it."""
    done = apply_deltas(module, deltas)
    try:
        yield
    finally:
        revert_deltas(module, done)


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


def export_model(loaded: LoadedModel, deltas: Sequence[Delta], out_dir: str | os.PathLike,
                 provenance: dict | None = None) -> Path:
    """Write ``loaded`` with ``deltas`` applied as a Hugging Face model directory.

    ``save_pretrained`` (safetensors weights, config, generation config) and the
    tokenizer's ``save_pretrained`` go to a temporary directory beside ``out_dir``,
    with ``kedit-patch.json`` (where the weights came from); it is renamed to
    ``out_dir`` when complete.  An existing non-empty ``out_dir`` is refused.  The
    model's weights are restored bit-identically afterwards.
    """
    out = Path(out_dir)
    check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    try:
        with applied(loaded.model, deltas):
            savable_model(loaded.model).save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
        info = {"base_model": loaded.name, "base_fingerprint": loaded.fingerprint,
                "deltas": [d.meta.get("label", "") for d in deltas], **(provenance or {})}
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
               dtype: str | None = None, progress=print) -> tuple[Path, list[Delta], LoadedModel]:
    """``kedit apply``: the run's base model (or ``model``) + the chosen deltas -> ``out_dir``.

    Everything that can be refused (the choice of deltas, an existing ``out_dir``) is
    checked before the model is loaded.  Returns (the directory, the deltas applied, the model)."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    deltas, info = read_patch(run_dir)
    chosen = select_deltas(deltas, info["sequential"], case, all_)
    out = Path(out_dir)
    check_out_dir(out)
    loaded = load_base_model(config, model, device=device, dtype=dtype, progress=progress)
    check_fingerprint(info["model_fingerprint"], loaded, force=force, what=f"run {run_dir}")
    path = export_model(loaded, chosen, out,
                        {"run": str(run_dir.resolve()), "method": info["method"], "case": case, "all": all_,
                         "mode": info["mode"]})
    return path, chosen, loaded
