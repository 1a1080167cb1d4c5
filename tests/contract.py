"""Checks every kind of edit must pass, shared by the method tests (not a test module).

* :func:`assert_revert_bit_identical` -- apply changes the model's output, revert gives
  back every tensor of the model's state and the same outputs, bit for bit;
* :func:`assert_save_load_same_logits` -- an edit saved and loaded gives the same logits;
* :func:`check_sequential_resume` -- a sequential ``kedit bench`` run interrupted (Ctrl-C
  in the method's n-th ``compute``) and resumed gives the metrics and the curve of an
  uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from tiny import save_tiny_model_dir
from typer.testing import CliRunner

from kedit.cli import app
from kedit.methods.edit import Edit
from kedit.runs.rundir import read_results

runner = CliRunner()

PROMPTS = ["A fact about France is", "Lionel Messi plays", "The Thames flows through"]


def logits(loaded, prompts=PROMPTS) -> torch.Tensor:
    """Right-padded batch logits (the padding as kedit's scoring pads)."""
    tok = loaded.tokenizer
    enc = tok(list(prompts), return_tensors="pt", padding=True).to(loaded.model.device)
    with torch.no_grad():
        return loaded.model(**enc).logits


def model_state(loaded) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}


def module_tree(loaded) -> list[tuple[str, int]]:
    return [(n, id(m)) for n, m in loaded.model.named_modules()]


def assert_revert_bit_identical(loaded, edit: Edit, prompts=PROMPTS) -> None:
    state, tree, before = model_state(loaded), module_tree(loaded), logits(loaded, prompts)
    edit.apply(loaded.model)
    assert edit.applied
    changed = logits(loaded, prompts)
    assert not torch.equal(changed, before), "the edit changes nothing on these prompts"
    edit.revert(loaded.model)
    assert module_tree(loaded) == tree, "revert did not put the original modules back"
    after = model_state(loaded)
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert torch.equal(logits(loaded, prompts), before)
    assert "forward" not in loaded.model.__dict__


def assert_save_load_same_logits(loaded, edit: Edit, tmp_path: Path, prompts=PROMPTS) -> Edit:
    edit.apply(loaded.model)
    want = logits(loaded, prompts)
    edit.revert(loaded.model)
    edit.save(tmp_path / "edit.safetensors")
    back = Edit.load(tmp_path / "edit.safetensors")
    assert type(back) is type(edit) and back.kind == edit.kind
    back.apply(loaded.model)
    got = logits(loaded, prompts)
    back.revert(loaded.model)
    assert torch.equal(got, want)
    return back


def ctrl_c_at_edit(monkeypatch, n: int, cls):
    """Make ``cls``'s n-th compute() raise KeyboardInterrupt (Ctrl-C); returns the real compute."""
    real = cls.compute
    calls = {"n": 0}

    def flaky(self, requests):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(self, requests)
    monkeypatch.setattr(cls, "compute", flaky)
    return real


SUBJECTS = ["France", "Lionel Messi", "the Thames", "Mount Everest", "Tokyo"]


def bench_args(tmp_path: Path, method: str, hparams: dict, family: str = "llama") -> list[str]:
    """A ``kedit bench`` command on a tiny model and five one-token cases."""
    d = save_tiny_model_dir(tmp_path / f"tiny-{family}", family)
    data = tmp_path / "bench.jsonl"
    data.write_text("".join(json.dumps({"case_id": f"c{i}", "prompt": f"A fact about {s}", "subject": s,
                                        "target_new": "of", "ground_truth": "the",
                                        "rephrase_prompts": [f"Another fact about {s}"],
                                        "locality": {"neighborhood": {"prompt": "The river flows",
                                                                      "ground_truth": " the"}}})
                            + "\n" for i, s in enumerate(SUBJECTS)))
    hp = tmp_path / f"{method}.yaml"
    hp.write_text(yaml.safe_dump(hparams))
    return ["bench", "counterfact", "--data", str(data), "--model", str(d), "--method", method, "--hparams", str(hp),
            "--device", "cpu"]


def science(metrics: dict) -> dict:
    """metrics.json without its wall-clock times."""
    return {k: v for k, v in metrics.items() if k != "time"}


def check_sequential_resume(tmp_path: Path, monkeypatch, method: str, hparams: dict, cls, cut_at: int = 4) -> dict:
    """Uninterrupted vs interrupted-at-``cut_at``-then-resumed sequential runs: same metrics
    and curve.  Returns the uninterrupted run's metrics."""
    monkeypatch.setenv("KEDIT_HOME", str(tmp_path / "home"))
    seq = [*bench_args(tmp_path, method, hparams), "--sequential", "--checkpoint-every", "2"]
    res = runner.invoke(app, [*seq, "--out", str(tmp_path / "clean")])
    assert res.exit_code == 0, res.output
    (clean,) = list((tmp_path / "clean").iterdir())
    want = science(json.loads((clean / "metrics.json").read_text()))
    real = ctrl_c_at_edit(monkeypatch, cut_at, cls)
    res = runner.invoke(app, [*seq, "--out", str(tmp_path / "cut")])
    assert res.exit_code == 130, res.output
    (run,) = list((tmp_path / "cut").iterdir())
    assert (run / "checkpoint.safetensors").exists() and len(read_results(run / "results.jsonl")) == cut_at - 1
    monkeypatch.setattr(cls, "compute", real)
    res = runner.invoke(app, ["bench", "--resume", str(run)])
    assert res.exit_code == 0, res.output
    assert science(json.loads((run / "metrics.json").read_text())) == want
    return want


def cached_step_logits(model, ids: list[int]) -> torch.Tensor:
    """The logits after ``ids``, computed as cached generation does: the prefix fills a
    key/value cache (passed under the name the forward takes), then the last id alone."""
    from kedit.models.cache import cache_arg, new_cache

    name = cache_arg(model.forward)
    cache = new_cache(model)
    with torch.no_grad():
        model(input_ids=torch.tensor([ids[:-1]]), **{name: cache}, use_cache=True)
        assert cache.get_seq_length() > 0
        return model(input_ids=torch.tensor([ids[-1:]]), **{name: cache}, use_cache=True).logits[0, -1]
