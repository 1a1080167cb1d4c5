"""An edit experiment end to end: cases -> model -> method -> evaluation -> run directory.

The CLI's ``kedit edit`` and the Python API's :func:`kedit.edit` both come here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kedit.data.cases import EditCase, write_cases
from kedit.config import check_layers, resolve_params
from kedit.methods.base import Method, RunContext
from kedit.methods.registry import get_method
from kedit.models.load import LoadedModel
from kedit.methods.edit import Edit, class_path
from kedit.runs.result import EDIT_FILE, EditResult, applied_edits, combined, ordered_steps, unique_edits
from kedit.runs.rundir import RunDir, new_run_id, write_json, write_yaml
from kedit.util.atomic import refused_as


def versions() -> dict[str, str]:
    import transformers

    from kedit.util.version import __version__

    return {"kedit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def make_method(loaded: LoadedModel, method: str, hparams: str | None = None, overrides: dict | None = None,
                ctx: RunContext | None = None) -> tuple[Method, str]:
    """The method with its hyperparameters for this model, and where they came from.  Every
    configuration error is a :class:`~kedit.config.ConfigError` raised here, before any work:
    the file, the keys and their types, layers the model lacks, the method's own check."""
    cls = get_method(method)
    params, source = resolve_params(cls, loaded.name, loaded.adapter, hparams, overrides)
    check_layers(params, loaded.adapter, source, set(overrides or {}))
    meth = cls(loaded, params, ctx or RunContext())
    meth.check()
    return meth, source


def resolved_config(loaded: LoadedModel, method: Method, hparams_source: str, *, cases_file: str | None,
                    cases: Sequence[EditCase], sequential: bool, batch_size: int | None,
                    command: str | None) -> dict[str, Any]:
    case_hash = hashlib.sha256("\n".join(str(c.to_dict()) for c in cases).encode()).hexdigest()[:16]
    return {
        "model": loaded.describe(),
        "method": method.name,
        "hparams": dataclasses.asdict(method.params),
        "hparams_source": hparams_source,
        "seed": method.ctx.seed,
        "sequential": sequential,
        "batch_size": batch_size,
        "cases": {"file": cases_file, "n": len(cases), "sha256": case_hash},
        "stats_dir": method.ctx.stats_dir,
        "versions": versions(),
        "command": command if command is not None else " ".join(sys.argv),
    }


def edits_for_file(result: EditResult) -> tuple[dict[str, torch.Tensor], dict[str, list[str]], dict[str, dict]]:
    """The run's edits as one safetensors dict ``<label>/<tensor>`` -> tensor, label -> the
    case ids it edits, and label -> ``{"class", "data", "meta"}`` (how to rebuild the edit).

    Independent single-case edits are labelled by case id; a batch (MEMIT) or a sequential
    step is labelled ``batch<N>``.  A sequential run of cumulative edits (adapters,
    memories, contexts: each step holds the whole state of its sites) keeps only its last
    step, which alone gives the final model, with every case id of the run.
    """
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[str, list[str]] = {}
    specs: dict[str, dict] = {}
    items: list[tuple[str, list[str], Edit]] = []
    if result.sequential:
        steps = sorted(result.edits.items(), key=lambda kv: int(kv[0].removeprefix("batch")))
        if steps and all(e.cumulative for _, e in steps) and combined([e for _, e in steps]) is steps[-1][1]:
            steps = steps[-1:]
        done = -1          # a kept step covers the cases of the steps it superseded too
        for label, edit in steps:
            n = int(label.removeprefix("batch"))
            items.append((label, [r["case_id"] for r in result.records if done < r["batch"] <= n], edit))
            done = n
    else:
        for edit in unique_edits(result.edits):
            ids = [c for c, e in result.edits.items() if e is edit]
            items.append((ids[0] if len(ids) == 1 else f"batch{len(items)}", ids, edit))
    for label, ids, edit in items:
        groups[label] = ids
        specs[label] = {"class": class_path(type(edit)), "data": edit.to_json(), "meta": edit.meta}
        for name, t in edit.to_tensors().items():
            tensors[f"{label}/{name}"] = t
    return tensors, groups, specs


def write_run(out_root: str | Path, loaded: LoadedModel, method: Method, result: EditResult, config: dict,
              generations: list[dict] | None, log_lines: Sequence[str] = ()) -> Path:
    """Write the run directory under a temporary name, then rename it (see kedit.runs.rundir)."""
    from safetensors.torch import save_file

    from kedit.evaluation.generation import write_generations

    with refused_as(out_root):   # a full disk, a file where the directory should be: one line
        run_id = new_run_id(method.name, loaded.name, config)
        run = RunDir(Path(out_root), run_id)
        try:
            for line in log_lines:
                run.log(line)
            write_yaml(run.path / "config.yaml", {"run_id": run_id, **config})
            write_cases(result.cases, run.path / "cases.jsonl")
            for rec in result.records:
                run.append_result(rec)
            write_json(run.path / "metrics.json", result.metrics)
            tensors, groups, specs = edits_for_file(result)
            tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
            meta = {"mode": "sequential" if result.sequential else "independent",
                    "model_fingerprint": loaded.fingerprint, "method": method.name, "kind": result.kind,
                    "cases": json.dumps(groups), "edits": json.dumps(specs, default=str)}
            save_file(tensors, str(run.path / EDIT_FILE), metadata=meta)
            if generations is not None:
                write_generations(generations, run.path)
            run.log(f"timings: {result.timings}")
            return run.finish()
        except BaseException:
            run.abandon()
            raise


def generations_before_after(loaded: LoadedModel, result: EditResult, max_new_tokens: int = 24,
                             prompts: list[dict] | None = None, **options) -> list[dict]:
    """Continuations before and after the edit of each case's default prompts (or of
    ``prompts``, rows ``{"case_id", "kind", "prompt"}``): a row is generated under its own
    case's edit, or under every step of a sequential result.  ``options`` go to
    :func:`kedit.evaluation.generation.generate` (greedy by default)."""
    from kedit.evaluation.generation import default_prompts, generate

    prompts = default_prompts(result.cases) if prompts is None else list(prompts)
    before = generate(loaded, [p["prompt"] for p in prompts], max_new_tokens, **options)
    after: list[str] = [""] * len(prompts)
    if result.sequential:
        groups = [(ordered_steps(result.edits), list(range(len(prompts))))]
    else:
        groups = []
        for edit in unique_edits(result.edits):
            ids = {c for c, e in result.edits.items() if e is edit}
            groups.append(([edit], [i for i, p in enumerate(prompts) if p["case_id"] in ids]))
    for edits, idx in groups:
        if not idx:
            continue
        with applied_edits(loaded.model, edits):
            texts = generate(loaded, [prompts[i]["prompt"] for i in idx], max_new_tokens, **options)
        for i, t in zip(idx, texts):
            after[i] = t
    return [{**p, "before": b, "after": a} for p, b, a in zip(prompts, before, after)]
