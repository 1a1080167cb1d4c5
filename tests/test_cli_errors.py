"""Every user error is one line: each command of the CLI, driven with bad values, exits with
status 2 and says what is wrong in one line (``error: <option or file>: <what>``), with no
traceback and nothing new or half-written left where it would have written.

One table drives it.  A row: an id, the arguments (``{name}`` stands for a path of the
``world`` fixture or of the row's own output location ``{out}``), a fragment the error line
must hold, and optionally a fault (a file system that refuses writes) and ``after_work``:
the fault shows only when the command writes, after its progress lines, so there the error
must be the last line and the only error line.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import tempfile

import pytest
import yaml
from tiny import save_tiny_model_dir
from typer.testing import CliRunner

from kedit.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model directory, a cases file, fast ROME hyperparameters, and finished runs of
    three kinds (edit, bench, trace) to hand to commands that read run directories."""
    root = tmp_path_factory.mktemp("world")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KEDIT_HOME", str(root / "home"))
        model = save_tiny_model_dir(root / "tiny-llama")
        cases = root / "cases.jsonl"
        cases.write_text(json.dumps({"case_id": "a", "prompt": "The capital city of the Kingdom of France",
                                     "subject": "France", "target_new": "of", "ground_truth": "and"}) + "\n")
        hp = root / "rome.yaml"
        hp.write_text(yaml.safe_dump({"layer": 1, "mom2_adjustment": False, "v_num_grad_steps": 2,
                                      "context_template_length_params": [[3, 1]]}))
        common = ["--model", str(model), "--device", "cpu"]
        made = {}
        for kind, args in (("run", ["edit", str(cases), "--hparams", str(hp), "--gen-tokens", "0"]),
                           ("brun", ["bench", "counterfact", "-n", "1", "--hparams", str(hp)]),
                           ("trun", ["trace", "--prompt", "The capital city of France", "--subject", "France",
                                     "--samples", "1", "--kind", "hidden"])):
            res = runner.invoke(app, [*args, *common, "--out", str(root / kind)])
            assert res.exit_code == 0, res.output
            (made[kind],) = list((root / kind).iterdir())
        afile = root / "a-file"
        afile.write_text("not a directory\n")
        broken = root / "broken-weights"          # a model directory whose weights are not safetensors
        broken.mkdir()
        for f in model.iterdir():
            (broken / f.name).write_bytes(b"junk" if f.suffix == ".safetensors" else f.read_bytes())
        no_tokenizer = root / "no-tokenizer"
        no_tokenizer.mkdir()
        (no_tokenizer / "config.json").write_bytes((model / "config.json").read_bytes())
        (root / "bad.gguf").write_bytes(b"GGUF garbage")
        yield {"model": str(model), "cases": str(cases), "hp": str(hp), "file": str(afile),
               "root": str(root), "home": str(root / "home"), "broken": str(broken),
               "no_tokenizer": str(no_tokenizer), **{k: str(v) for k, v in made.items()}}


def refuse(err: int, module=os, attr: str = "fsync", after: int = 0):
    """A fault: the file system refuses with ``err`` every call of ``module.attr`` after the
    first ``after`` (default os.fsync: the atomic writes and the result log sync every file
    they write)."""
    def install(mp, where):
        real, calls = getattr(module, attr), []

        def refused(*a, **k):
            calls.append(1)
            if len(calls) > after:
                raise OSError(err, os.strerror(err))
            return real(*a, **k)
        mp.setattr(module, attr, refused)
    return install


def read_only(mp, where):
    """A directory without write permission.  chmod suffices for ordinary users; root ignores
    permissions, so there the check (os.access) and the write (mkstemp) are made to fail as
    they would."""
    where.mkdir(parents=True, exist_ok=True)
    where.chmod(0o555)
    if os.geteuid() == 0:
        real_access, real_mkstemp = os.access, tempfile.mkstemp
        mp.setattr(os, "access", lambda p, mode, **k: False if str(p).startswith(str(where)) else real_access(p, mode, **k))

        def mkstemp(*a, dir=None, **k):
            if dir is not None and str(dir).startswith(str(where)):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
            return real_mkstemp(*a, dir=dir, **k)
        mp.setattr(tempfile, "mkstemp", mkstemp)


def mkstemp_denied(mp, where):
    """Permission denied at the moment of writing (the directory was writable when checked)."""
    def mkstemp(*a, dir=None, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
    mp.setattr(tempfile, "mkstemp", mkstemp)


def not_installed(module: str):
    """A fault: ``module`` cannot be imported (an optional library that is not installed)."""
    def install(mp, where):
        mp.setitem(sys.modules, module, None)
    return install


M = ["--model", "{model}", "--device", "cpu"]
EDIT = ["edit", "{cases}", *M, "--hparams", "{hp}", "--gen-tokens", "0"]
TRACE = ["trace", *M, "--prompt", "The capital city of France", "--subject", "France", "--samples", "1",
         "--kind", "hidden"]
SMOL = "configs/methods/{}/smollm2-135m.yaml"

# id, arguments, fragment of the error line, fault (or None), after_work
ROWS = [
    # sweep: its own options, before any sweep directory is made
    ("sweep-no-method", ["sweep", "counterfact", *M, "--out", "{out}"], "at least one --method", None, False),
    ("sweep-unknown-method", ["sweep", "counterfact", "--method", "nope", *M, "--out", "{out}"], "nope", None, False),
    ("sweep-grid-key-unknown", ["sweep", "counterfact", "--method", "rome", "--grid", "nokey=1,2", *M, "--out", "{out}"],
     "nokey", None, False),
    ("sweep-negative-n", ["sweep", "counterfact", "--method", "rome", "-n", "-3", *M, "--out", "{out}"], "-n -3", None,
     False),
    ("sweep-out-is-a-file", ["sweep", "counterfact", "--method", "rome", *M, "--out", "{file}"], "--out", None, False),
    ("sweep-resume-not-a-sweep", ["sweep", "--resume", "{run}"], "not a kedit sweep directory", None, False),
    ("sweep-report-to-unknown", ["sweep", "counterfact", "--method", "rome", *M, "--report-to", "comet",
                                 "--out", "{out}"], "--report-to comet: unknown tracker", None, False),
    ("sweep-report-to-not-installed", ["sweep", "counterfact", "--method", "rome", *M, "--report-to", "mlflow",
                                       "--out", "{out}"], "pip install 'kedit[mlflow]'", not_installed("mlflow"), False),
    # usage errors of click itself, any command
    ("usage-unknown-option", ["edit", "{cases}", "--methd", "rome"], "No such option: --methd", None, False),
    ("usage-not-a-number", ["bench", "counterfact", "-n", "abc"], "'-n'", None, False),
    ("usage-missing-argument", ["apply", "--out", "{out}"], "Missing argument", None, False),
    ("usage-unknown-command", ["nope"], "No such command 'nope'", None, False),
    ("models-extra-argument", ["models", "extra"], "unexpected extra argument", None, False),
    ("methods-unknown-option", ["methods", "--all"], "No such option: --all", None, False),
    # validate
    ("validate-missing", ["validate", "{root}/nope.jsonl"], "no such file", None, False),
    ("validate-directory", ["validate", "{root}"], "is a directory", None, False),
    # stats
    ("stats-layer-out-of-range", ["stats", *M, "--layers", "99", "--stats-dir", "{out}"], "layer 99 out of range",
     None, False),
    ("stats-empty-layer-range", ["stats", *M, "--layers", "3-1", "--stats-dir", "{out}"], "--layers '3-1'", None,
     False),
    ("stats-dir-is-a-file", ["stats", *M, "--layers", "1", "--stats-dir", "{file}"], "--stats-dir", None, False),
    ("stats-dir-read-only", ["stats", *M, "--layers", "1", "--samples", "2", "--stats-dir", "{out}"],
     "--stats-dir", read_only, False),
    ("stats-disk-full", ["stats", *M, "--layers", "1", "--samples", "2", "--max-length", "8", "--stats-dir", "{out}"],
     "No space left on device", refuse(errno.ENOSPC), True),
    ("stats-bad-device", ["stats", "--model", "{model}", "--device", "tpu", "--layers", "1"], "--device tpu", None,
     False),
    # edit: layers every method names, checked before any work
    ("edit-rome-layer", [*EDIT, "--set", "layer=99", "--out", "{out}"], "'layer': layer 99 out of range", None, False),
    ("edit-rome-loss-layer", [*EDIT, "--set", "v_loss_layer=7", "--out", "{out}"], "'v_loss_layer': layer 7", None,
     False),
    *[(f"edit-{m}-layers", ["edit", "{cases}", *M, "--method", m, "--hparams", SMOL.format(m), *more,
                            "--set", f"{key}=[9]", "--out", "{out}"], f"'{key}': layer 9 out of range", None, False)
      for m, key, more in (("memit", "layers", []), ("alphaedit", "layers", []), ("emmet", "layers", []),
                           ("pmet", "layers", []), ("kn", "layers", []), ("ultraedit", "layers", []),
                           ("ft_l", "layers", []), ("ft_m", "layers", []), ("lora", "layers", []),
                           ("mend", "layers", []), ("serac", "cntr_layers", ["--set", "cls_layer=1"]))],
    *[(f"edit-{m}-layer", ["edit", "{cases}", *M, "--method", m, "--hparams", SMOL.format(m), "--set", f"{key}=9",
                           "--out", "{out}"], f"'{key}': layer 9 out of range", None, False)
      for m, key in (("grace", "layer"), ("wise", "layer"), ("serac", "cls_layer"))],
    ("edit-config-for-a-bigger-model", ["edit", "{cases}", *M, "--method", "wise", "--hparams", SMOL.format("wise"),
                                        "--out", "{out}"], "'layer': layer 21 out of range", None, False),
    ("edit-set-not-yaml", [*EDIT, "--set", "layer=[1", "--out", "{out}"], "not valid YAML", None, False),
    ("edit-seed-overflow", [*EDIT, "--seed", str(2 ** 70), "--out", "{out}"], "--seed", None, False),
    ("edit-mom2-samples", [*EDIT, "--set", "mom2_adjustment=true", "--set", "mom2_samples=0", "--out", "{out}"],
     "'mom2_samples'", None, False),
    ("edit-mom2-corpus", [*EDIT, "--set", "mom2_adjustment=true", "--set", "mom2_corpus={root}/nope.txt",
                          "--out", "{out}"], "'mom2_corpus'", None, False),
    ("edit-lora-modules", ["edit", "{cases}", *M, "--method", "lora", "--hparams", SMOL.format("lora"),
                           "--set", "target_modules=[nope]", "--out", "{out}"], "no module named nope", None, False),
    ("edit-wise-data", ["edit", "{cases}", *M, "--method", "wise", "--hparams", SMOL.format("wise"), "--set", "layer=1",
                        "--set", "irrelevant_data={root}/nope.json", "--out", "{out}"], "'irrelevant_data'", None,
     False),
    ("edit-ike-pool", ["edit", "{cases}", *M, "--method", "ike", "--hparams", SMOL.format("ike"),
                       "--set", "pool={root}/nope.jsonl", "--out", "{out}"], "'pool'", None, False),
    ("edit-editor-not-a-train-run", ["edit", "{cases}", *M, "--method", "mend", "--editor", "{run}",
                                     "--out", "{out}"], "no editor.safetensors", None, False),
    ("edit-out-is-a-file", [*EDIT, "--out", "{file}"], "--out", None, False),
    ("edit-out-below-a-file", [*EDIT, "--out", "{file}/runs"], "is a file", None, False),
    ("edit-out-read-only", [*EDIT, "--out", "{out}"], "--out", read_only, False),
    ("edit-disk-full", [*EDIT, "--out", "{out}"], "No space left on device", refuse(errno.ENOSPC), True),
    ("edit-broken-weights", ["edit", "{cases}", "--model", "{broken}", "--device", "cpu", "--out", "{out}"],
     "--model", None, False),
    ("edit-model-without-tokenizer", ["edit", "{cases}", "--model", "{no_tokenizer}", "--device", "cpu",
                                      "--out", "{out}"], "cannot load", None, False),
    ("edit-not-a-gguf", ["edit", "{cases}", "--model", "{root}/bad.gguf", "--device", "cpu", "--out", "{out}"],
     "cannot read it as a GGUF model", None, True),
    ("edit-judge-not-a-model", [*EDIT, "--eval", "generate", "--judge", "{root}", "--out", "{out}"],
     "--judge", None, False),
    ("edit-too-many-tokens", [*EDIT[:-1], str(10 ** 9), "--out", "{out}"], "--gen-tokens", None, False),
    ("edit-bad-device", ["edit", "{cases}", "--model", "{model}", "--device", "tpu"], "--device tpu", None, False),
    # bench
    ("bench-resume-missing", ["bench", "--resume", "{root}/nope"], "no config.yaml", None, False),
    ("bench-resume-edit-run", ["bench", "--resume", "{run}"], "not a bench run", None, False),
    ("bench-resume-trace-run", ["bench", "--resume", "{trun}"], "not a bench run", None, False),
    ("bench-resume-complete", ["bench", "--resume", "{brun}"], "already complete", None, False),
    ("bench-layer", ["bench", "counterfact", "-n", "1", *M, "--hparams", "{hp}", "--set", "v_loss_layer=5",
                     "--out", "{out}"], "'v_loss_layer': layer 5", None, False),
    ("bench-too-many-tokens", ["bench", "counterfact", "-n", "1", *M, "--hparams", "{hp}", "--generation",
                               "--gen-tokens", str(10 ** 9), "--out", "{out}"], "--gen-tokens", None, False),
    ("bench-report-to-unknown", ["bench", "counterfact", "-n", "1", *M, "--hparams", "{hp}", "--report-to",
                                 "tensorboard,comet", "--out", "{out}"], "--report-to comet: unknown tracker", None,
     False),
    ("bench-report-to-not-installed", ["bench", "counterfact", "-n", "1", *M, "--hparams", "{hp}", "--report-to",
                                       "wandb", "--out", "{out}"], "pip install 'kedit[wandb]'", not_installed("wandb"),
     False),
    ("bench-report-dir-alone", ["bench", "counterfact", "-n", "1", *M, "--hparams", "{hp}", "--report-dir", "{out}",
                                "--out", "{out}"], "--report-dir goes with --report-to", None, False),
    ("bench-out-is-a-file", ["bench", "counterfact", "-n", "1", *M, "--hparams", "{hp}", "--out", "{file}"], "--out",
     None, False),
    ("bench-disk-full", ["bench", "counterfact", "-n", "1", *M, "--hparams", "{hp}", "--out", "{out}"],
     "No space left on device", refuse(errno.ENOSPC), False),
    # compare-gen
    ("compare-missing-run", ["compare-gen", "{root}/nope"], "not a kedit run directory", None, False),
    ("compare-bench-run", ["compare-gen", "{brun}"], "no edit.safetensors", None, False),
    ("compare-trace-run", ["compare-gen", "{trun}"], "a causal-tracing run (kedit trace), not an edit run", None,
     False),
    ("compare-disk-full-second-file", ["compare-gen", "{run}", "--max-new-tokens", "2"], "No space left on device",
     refuse(errno.ENOSPC, after=1), False),
    ("compare-too-many-tokens", ["compare-gen", "{run}", "--max-new-tokens", str(10 ** 12)], "--max-new-tokens",
     None, False),
    ("compare-unknown-method", ["compare-gen", "--cases", "{cases}", *M, "--method", "romee"], "did you mean 'rome'",
     None, False),
    ("compare-cases-layer", ["compare-gen", "--cases", "{cases}", *M, "--hparams", "{hp}", "--set", "layer=7",
                             "--out", "{out}"], "'layer': layer 7 out of range", None, False),
    ("compare-out-is-a-file", ["compare-gen", "--cases", "{cases}", *M, "--hparams", "{hp}", "--out", "{file}"],
     "--out", None, False),
    # apply
    ("apply-missing-run", ["apply", "{root}/nope", "--out", "{out}"], "not a kedit run directory", None, False),
    ("apply-bench-run", ["apply", "{brun}", "--out", "{out}"], "no edit.safetensors", None, False),
    ("apply-trace-run", ["apply", "{trun}", "--out", "{out}"], "not an edit run", None, False),
    ("apply-out-is-a-file", ["apply", "{run}", "--out", "{file}"], "--out", None, False),
    ("apply-out-below-a-file", ["apply", "{run}", "--out", "{file}/model"], "is a file", None, False),
    ("apply-disk-full", ["apply", "{run}", "--out", "{out}/model"], "No space left on device",
     refuse(errno.ENOSPC, tempfile, "mkdtemp"), False),
    # runs
    ("runs-missing", ["runs", "{root}/nope"], "no such directory", None, False),
    ("runs-a-run-directory", ["runs", "{run}"], "a run directory", None, False),
    # report
    ("report-missing-run", ["report", "{root}/nope", "--out", "{out}"], "not a kedit run directory", None, False),
    ("report-trace-run", ["report", "{trun}", "--out", "{out}"], "not an edit or bench run", None, False),
    ("report-out-is-a-file", ["report", "{run}", "--out", "{file}"], "--out", None, False),
    ("report-out-read-only", ["report", "{run}", "--out", "{out}"], "--out", read_only, False),
    ("report-disk-full", ["report", "{run}", "--out", "{out}/report"], "No space left on device",
     refuse(errno.ENOSPC), False),
    ("report-permission-at-write", ["report", "{run}", "--out", "{out}/report"], "Permission denied",
     mkstemp_denied, False),
    # trace
    ("trace-subject-not-in-prompt", [*TRACE[:-6], "--prompt", "The capital city of France", "--subject", "Spain",
                                     "--out", "{out}"], "does not occur", None, False),
    ("trace-window", [*TRACE, "--window", "0", "--out", "{out}"], "--window 0", None, False),
    ("trace-out-is-a-file", [*TRACE, "--out", "{file}"], "--out", None, False),
    ("trace-disk-full", [*TRACE, "--out", "{out}"], "No space left on device", refuse(errno.ENOSPC), True),
    # train
    ("train-not-trained", ["train", "rome", *M, "--out", "{out}"], "is not trained", None, False),
    ("train-mend-layers", ["train", "mend", *M, "--set", "layers=[9]", "--out", "{out}"], "'layers': layer 9",
     None, False),
    ("train-serac-cls-layer", ["train", "serac", *M, "--set", "cls_layer=9", "--out", "{out}"], "'cls_layer': layer 9",
     None, False),
    ("train-resume-edit-run", ["train", "--resume", "{run}"], "not a training run directory", None, False),
    ("train-unknown-method", ["train", "mand", *M, "--out", "{out}"], "unknown method 'mand'", None, False),
    ("train-out-is-a-file", ["train", "mend", *M, "--out", "{file}"], "--out", None, False),
]


def snapshot(root) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and modification time."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            st = os.stat(p)
            out[p] = (st.st_size, st.st_mtime_ns)
    return out


def test_every_command_is_covered():
    names = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
    covered = {args[0] for _, args, *_ in ROWS}
    assert names and names <= covered, names - covered


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(row, world, tmp_path, monkeypatch):
    name, args, fragment, fault, after_work = row
    monkeypatch.setenv("KEDIT_HOME", world["home"])
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # configs/ paths
    out = tmp_path / "out"
    places = {**world, "out": str(out)}
    argv = [a.format(**places) if "{" in a else a for a in args]
    before_world, before_tmp = snapshot(world["root"]), snapshot(tmp_path)
    if fault is not None:
        fault(monkeypatch, out)
    res = runner.invoke(app, argv)
    monkeypatch.undo()
    if out.exists():
        out.chmod(0o755)
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2, f"{name}: exit {res.exit_code}\n{res.output}"
    assert isinstance(res.exception, SystemExit), f"{name}: {res.exception!r}"
    assert "Traceback" not in res.output
    errors = [line for line in lines if line.startswith("error: ")]
    if after_work:
        assert len(errors) == 1 and lines[-1] == errors[0], res.output
    else:
        assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert fragment in errors[0], errors[0]
    after_world = snapshot(world["root"])
    changed = {p for p in set(before_world) | set(after_world) if before_world.get(p) != after_world.get(p)}
    assert not {p for p in changed if f"{os.sep}home{os.sep}" not in p}, changed       # the model cache may grow
    assert snapshot(tmp_path) == before_tmp, "files left in the output location"
    assert not any(".partial" in p or p.endswith(".tmp") for p in snapshot(tmp_path)), "half-written files"


def test_an_unwritable_model_cache_costs_only_the_hash_memo(tmp_path, monkeypatch):
    """The GGUF hash memo under KEDIT_HOME is best effort: a KEDIT_HOME that cannot be written
    (here: below a file) still gives the hash, and the next load computes it again."""
    from kedit.models.load import _gguf_hash, file_sha256

    blocker = tmp_path / "home"
    blocker.write_text("a file, not a directory\n")
    monkeypatch.setenv("KEDIT_HOME", str(blocker / "kedit"))
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF" + bytes(100))
    assert _gguf_hash(fake) == file_sha256(fake)
    assert blocker.read_text() == "a file, not a directory\n"
