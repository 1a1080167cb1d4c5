"""``kedit compare-gen``: free text before and after an edit, side by side.

The edit comes from a run directory (its ``edit.safetensors`` applied to its base
model, :mod:`kedit.runs.export`) or from an :class:`~kedit.runs.runner.EditResult` made just now.
Generation, prompt choice and rendering are :mod:`kedit.evaluation.generation`'s; the per-case
application of deltas is :func:`kedit.runs.experiment.generations_before_after`'s.  This
module decides which prompts go under which deltas and writes ``compare-gen.md`` /
``compare-gen.jsonl``.

Which model makes the "after" text:

* default prompts (each case's prompt, rephrasings, locality prompts, ``"<subject>,
  the"`` / ``"<subject> is"``): each case's prompts under that case's own delta (the
  model that case was evaluated on), or under every step of a sequential run;
* ``case``: only that case's prompts (or the given ones) under that case's delta;
* ``all_``: every independent edit at once (their sum, a model no run evaluated);
* prompts given by the user on a run with several independent edits need ``case`` or
  ``all_`` (there is no one edited model to ask).

Sampling (``sample=True``) is seeded: before and after draw from the same seed, so
for a single edit the two texts differ only because the weights do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kedit.util.atomic import output_dir, write_text
from kedit.runs.experiment import generations_before_after
from kedit.evaluation.generation import default_prompts, render_markdown
from kedit.runs.result import PatchError, check_fingerprint, select_edits

if TYPE_CHECKING:
    from kedit.models.load import LoadedModel
    from kedit.runs.result import EditResult

STEM = "compare-gen"
CUSTOM_KIND = "given"


def read_prompts_file(path: str | os.PathLike) -> list[str]:
    """Prompts from a file: one per line (blank lines skipped), or JSONL objects with a
    ``prompt`` string (a ``.jsonl`` file, or a file whose first line starts with ``{``)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PatchError(f"--prompts {path}: cannot read ({e.__class__.__name__}: {e})") from None
    is_jsonl = path.suffix == ".jsonl" or next((ln.lstrip().startswith("{") for ln in lines if ln.strip()), False)
    out: list[str] = []
    for no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not is_jsonl:
            out.append(line)
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise PatchError(f"{path}:{no}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise PatchError(f"{path}:{no}: field 'prompt': expected a non-empty string")
        out.append(obj["prompt"])
    if not out:
        raise PatchError(f"--prompts {path}: no prompts in the file")
    return out


def plan(result: EditResult, prompts: Sequence[str] | None = None, *, case: str | None = None,
         all_: bool = False) -> tuple[EditResult, list[dict]]:
    """(the result whose deltas make the "after" text, the prompt rows), per the rules above.

    When one edited model serves every row it is returned as a sequential result whose
    steps are the chosen deltas, so :func:`generations_before_after` applies them all."""
    from kedit.runs.result import EditResult

    single = prompts is not None or case is not None or all_ or result.sequential \
        or len({id(d) for d in result.edits.values()}) == 1
    if not single:
        return result, default_prompts(result.cases)
    chosen = select_edits(result.edits, result.sequential, case, all_)
    if prompts is not None:
        label = case if case is not None else ("all" if all_ or len(result.cases) != 1 else result.cases[0].case_id)
        rows = [{"case_id": label, "kind": CUSTOM_KIND, "prompt": p} for p in prompts]
    else:
        cases = [c for c in result.cases if case is None or c.case_id == case]
        rows = default_prompts(cases)
    steps = {f"batch{i}": d for i, d in enumerate(chosen)}
    return EditResult(list(result.cases), [], {}, steps, True), rows


def compare_result(loaded: LoadedModel, result: EditResult, prompts: Sequence[str] | None = None, *,
                   case: str | None = None, all_: bool = False, max_new_tokens: int = 24, sample: bool = False,
                   temperature: float = 1.0, seed: int = 0, top_k: int | None = None,
                   batch_size: int = 16) -> list[dict]:
    """Rows ``{"case_id", "kind", "prompt", "before", "after", "decoding"}``; the model's
    weights are the original ones again on return (bit-identical)."""
    if getattr(result, "_applied", None):
        raise PatchError("the edit is applied (result.apply()): revert() it first, compare generates with and "
                         "without it")
    if prompts is not None:
        prompts = [p for p in prompts if p.strip()]
        if not prompts:
            raise PatchError("no prompts given")
    source, rows = plan(result, prompts, case=case, all_=all_)
    if not rows:
        raise PatchError("no prompts to generate from (the cases have none)")
    options: dict[str, Any] = {"batch_size": batch_size}
    if sample:
        options.update(sample=True, temperature=temperature, seed=seed, top_k=top_k)
    out = generations_before_after(loaded, source, max_new_tokens, prompts=rows, **options)
    decoding = (f"sample (temperature {temperature:g}, seed {seed}" + (f", top-k {top_k}" if top_k else "") + ")"
                if sample else "greedy")
    return [{**r, "decoding": decoding, "max_new_tokens": max_new_tokens} for r in out]


def write_compare(rows: Sequence[dict], out_dir: str | os.PathLike, title: str) -> tuple[Path, Path]:
    """``<out_dir>/compare-gen.jsonl`` and ``compare-gen.md``, each written atomically."""
    with output_dir(out_dir) as out:
        jsonl, md = out / f"{STEM}.jsonl", out / f"{STEM}.md"
        new = not jsonl.exists()
        write_text(jsonl, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        try:
            write_text(md, render_markdown(rows, title=title))
        except BaseException:
            if new:                 # not one file of the pair without the other
                jsonl.unlink(missing_ok=True)
            raise
    return jsonl, md


def compare_run(run_dir: str | os.PathLike, *, model: LoadedModel | str | None = None,
                prompts: Sequence[str] | None = None, case: str | None = None, all_: bool = False,
                force: bool = False, write: bool = True, device: str = "auto", dtype: str | None = None,
                progress=print, **options) -> tuple[list[dict], tuple[Path, Path] | None]:
    """``kedit compare-gen RUN_DIR``: the run's base model (or ``model``, checked against
    it), generations before/after, and ``compare-gen.md`` / ``.jsonl`` written into the run."""
    from kedit.runs.export import load_base_model, load_run, read_run_config

    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    result = load_run(run_dir)
    if prompts is not None or case is not None or all_:
        select_edits(result.edits, result.sequential, case, all_)  # refuse a bad choice before loading
    loaded = load_base_model(config, model, device=device, dtype=dtype, progress=progress)
    check_fingerprint(result.base_fingerprint, loaded, force=force, what=f"run {run_dir}")
    loaded.check_new_tokens(options.get("max_new_tokens", 24), "--max-new-tokens")
    result.model = loaded
    rows = compare_result(loaded, result, prompts, case=case, all_=all_, **options)
    title = f"compare-gen: {config.get('run_id', run_dir.name)} ({rows[0]['decoding']}, " \
            f"{rows[0]['max_new_tokens']} new tokens)"
    paths = write_compare(rows, run_dir, title) if write else None
    return rows, paths
