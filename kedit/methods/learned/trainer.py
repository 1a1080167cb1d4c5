"""Training of learned editors (MEND, SERAC): data, split, loop, checkpoints, curve, lookup.

A method that is trained before it edits gives a :class:`Learner` (its editor network and
what one training step and one validation compute); :func:`train_editor` runs the loop
the same way for every such method and writes a *training run directory*::

    config.yaml            method, model (name, fingerprint), every hyperparameter, data, seed,
                           versions, command line
    split.json             the cases trained on and validated on (ids), the cases held back
    curve.jsonl            one line per point: {"step", "kind": "train"|"val", ...losses and rates}
    curve.png              the curve: losses (train, validation) and validation edit success
    checkpoint.safetensors the whole training state at the last validation (editor, optimiser,
                           step, early-stopping state) -- what ``--resume`` continues from
    editor.safetensors     the best editor so far (validation edit success): what edits use
    summary.json           written when training ends: steps, why it stopped, best step and scores
    log.txt                what happened, with times

Every file is written atomically (``kedit.util.atomic``); tensors only ever go through
safetensors, with JSON for everything else.

The loop (``train_editor``): the editor starts from its seeded initialisation; step
``s`` trains on ``batch_size`` cases, the ``s``-th slice of a seeded permutation of the
training cases (a new permutation each epoch, so the data order is a function of the
seed and the step alone); Adam; the gradient is clipped to ``grad_clip`` (a step whose
gradient is not finite is skipped, as MEND's ``safe_backward`` does).  Every
``val_every`` steps (and at step 0, the untrained editor) the editor edits every
validation case and is scored; a better validation edit success saves
``editor.safetensors``; ``patience`` validations without improvement stop the run.
The checkpoint is written after each validation; a run interrupted (Ctrl-C) and
resumed from it repeats the steps since and ends with the same editor, bit for bit on
the same machine and thread count.

Where editors are found: a finished run registers itself under
``$KEDIT_HOME/editors/<method>/<model fingerprint>/``; an edit without ``--editor``
uses the newest run registered for its model's fingerprint.  An editor trained for
another model (other fingerprint) is refused.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml

from kedit.util.yamlio import read_dir_yaml
from kedit.config import ConfigError
from kedit.data.cases import EditCase, load_cases
from kedit.util.atomic import atomic_path, refused_as, write_text
from kedit.util.paths import kedit_home, package_data

EDITOR_FILE = "editor.safetensors"
CHECKPOINT_FILE = "checkpoint.safetensors"
CURVE_FILE = "curve.jsonl"
SUMMARY_FILE = "summary.json"

# ============================================================================ data


@dataclass(frozen=True)
class LearnCase:
    """One training or validation edit: the fact, a rephrasing, and an unrelated prompt
    with its answer (the locality term)."""

    case_id: str
    prompt: str
    subject: str
    target: str
    rephrase: str
    loc_prompt: str
    loc_answer: str
    ground_truth: str | None = None


def learn_case(case: EditCase) -> LearnCase | None:
    """An :class:`EditCase` as a training case (first rephrasing, first locality prompt);
    ``None`` when it has no locality prompt.  A case without a rephrasing uses its own prompt."""
    loc = next(((p, a) for ps in case.locality for p, a in ps.pairs()), None)
    if loc is None:
        return None
    rephrase = case.rephrase_prompts[0] if case.rephrase_prompts else case.prompt
    return LearnCase(case.case_id, case.prompt, case.subject, case.target_new, rephrase, loc[0], loc[1],
                     case.ground_truth)


#: ``--data`` name -> (file under kedit/data, layout, cases reserved at the start, note).
TRAINING_DATA = {
    "counterfact": ("ike/counterfact-train-pool.jsonl", "easyedit", 0,
                    "CounterFact's train split (Meng et al. 2022; MIT), minus every case id kedit evaluates on"),
    "zsre": ("benchmarks/zsre_mend_train-1k.json", "zsre", 200,
             "zsRE as split by MEND (MIT); its first 200 cases are what `kedit bench zsre` measures, never trained on"),
}


@dataclass
class Split:
    train: list[LearnCase]
    val: list[LearnCase]
    info: dict[str, Any]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def training_split(data: str, val_cases: int, max_train: int | None = None) -> Split:
    """The training and validation cases of ``data`` (``counterfact``, ``zsre`` or a cases
    file).  Validation: the last ``val_cases`` usable cases of the file, held apart;
    training: the ones before (after the cases a shipped benchmark reserves)."""
    if data in TRAINING_DATA:
        rel, fmt, reserved, note = TRAINING_DATA[data]
        path, skip = package_data() / rel, True
    else:
        path, fmt, reserved, note, skip = Path(data), "auto", 0, "a cases file", False
        if not path.exists():
            raise ConfigError(f"--data {data}: no such file (or use counterfact | zsre)")
    cases = load_cases(path, fmt, skip_invalid=skip)
    usable, dropped = [], []
    for c in cases[reserved:]:
        lc = learn_case(c)
        (usable.append(lc) if lc is not None else dropped.append(c.case_id))
    if len(usable) < val_cases + 1:
        raise ConfigError(f"--data {data}: {len(usable)} usable cases (with a locality prompt); "
                          f"needs more than val_cases={val_cases}")
    val = usable[len(usable) - val_cases:]
    train = usable[: len(usable) - val_cases]
    if max_train is not None:
        train = train[:max_train]
    info = {"data": data, "file": str(path), "sha256": file_sha256(path), "note": note,
            "reserved": [c.case_id for c in cases[:reserved]], "dropped_no_locality": dropped,
            "train": [c.case_id for c in train], "val": [c.case_id for c in val]}
    return Split(train, val, info)


def cases_from_split(data: str, info: dict[str, Any]) -> Split:
    """The split a run recorded (its case ids), read again from the same data."""
    if data in TRAINING_DATA:
        rel, fmt, _, _ = TRAINING_DATA[data]
        path, skip = package_data() / rel, True
    else:
        path, fmt, skip = Path(data), "auto", False
    if file_sha256(path) != info["sha256"]:
        raise ConfigError(f"{path}: the training data changed since this run started (sha256 differs)")
    by_id = {}
    for c in load_cases(path, fmt, skip_invalid=skip):
        lc = learn_case(c)
        if lc is not None:
            by_id[c.case_id] = lc
    return Split([by_id[i] for i in info["train"]], [by_id[i] for i in info["val"]], info)


# ============================================================================ the learner


class Learner(Protocol):
    """What a trainable editor gives the loop."""

    method: str

    def module(self) -> torch.nn.Module:
        """The editor: its parameters are trained, its state (parameters and buffers) saved."""

    def param_groups(self) -> list[dict[str, Any]]:
        """Adam parameter groups (``params``, ``lr``)."""

    def train_loss(self, cases: Sequence[LearnCase]) -> tuple[torch.Tensor, dict[str, float]]:
        """The meta-loss of one batch (to backpropagate) and what to log."""

    def validate(self, cases: Sequence[LearnCase]) -> dict[str, float]:
        """Edit each case with the editor as it is; means of ``edit_success`` (the mean of
        ``rewrite`` and ``rephrase``), ``rewrite``, ``rephrase``, ``locality``, ``score`` (the
        harmonic mean of edit success and locality) and losses."""

    def editor_config(self) -> dict[str, Any]:
        """JSON that, with the state, rebuilds the editor."""


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch_size: int
    val_every: int
    patience: int
    grad_clip: float
    seed: int
    log_every: int = 10
    early_stop_on: str = "edit_success"   # a key of Learner.validate, higher is better

    def check(self) -> str | None:
        for k in ("steps", "batch_size", "val_every", "patience", "log_every"):
            if getattr(self, k) < 1:
                return f"key '{k}': must be >= 1"
        return None


def batch_at(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of step ``step``'s batch: consecutive slices of one seeded permutation of
    ``range(n)`` per epoch (a function of seed and step only, so a resumed run sees the
    same batches)."""
    out: list[int] = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, off = divmod(pos, n)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g).tolist()
        take = perm[off: off + batch_size - len(out)]
        out += take
        pos += len(take)
    return out


# ============================================================================ files


def _meta(d: dict[str, Any]) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in d.items()}


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=_meta(meta))


def read_metadata(path: Path) -> dict[str, str]:
    """The string header of a safetensors file; no tensor is read."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    return tensors, meta


def save_editor(path: Path, learner: Learner, model: dict[str, Any], step: int, scores: dict[str, float]) -> None:
    """The editor as one safetensors file: its state, and in the header what rebuilds it
    (``config``), the model it was trained for and the step and scores it had."""
    save_tensors(path, learner.module().state_dict(),
                 {"kedit": "editor", "method": learner.method, "config": learner.editor_config(),
                  "model": model, "step": step, "scores": scores})


def read_editor_header(path: Path, method: str) -> dict[str, Any]:
    """The header of an editor file (or of a training run directory holding one), checked:
    cheap, no tensor is read."""
    from safetensors import SafetensorError

    path = Path(path)
    file = path / EDITOR_FILE if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"editor {path}: no {EDITOR_FILE} there (a `kedit train {method}` run directory)")
    try:
        raw = read_metadata(file)
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"editor {file}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    if raw.get("kedit") != "editor":
        raise ConfigError(f"editor {file}: not a kedit editor file")
    meta = {k: (v if k in ("kedit", "method") else json.loads(v)) for k, v in raw.items()}
    if meta["method"] != method:
        raise ConfigError(f"editor {file}: a {meta['method']} editor, not a {method} one")
    meta["file"] = str(file)
    return meta


def read_editor(path: Path, method: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An editor file (or a training run directory holding one): state and header."""
    meta = read_editor_header(path, method)
    tensors, _ = load_tensors(Path(meta["file"]))
    return tensors, meta


def check_editor_model(meta: dict[str, Any], loaded: Any) -> None:
    """Refuse (one line) an editor trained for another model."""
    want = meta["model"]
    if want.get("fingerprint") != loaded.fingerprint:
        raise ConfigError(f"editor {meta['file']} was trained for model '{want.get('name')}' (fingerprint "
                          f"{want.get('fingerprint')}), not for '{loaded.name}' (fingerprint {loaded.fingerprint})")


def registry_dir(method: str, fingerprint: str) -> Path:
    return kedit_home() / "editors" / method / fingerprint


def register_editor(method: str, fingerprint: str, run_dir: Path) -> None:
    entry = {"run": str(Path(run_dir).resolve()), "finished": _dt.datetime.now(_dt.timezone.utc).isoformat()}
    write_text(registry_dir(method, fingerprint) / f"{Path(run_dir).name}.json", json.dumps(entry) + "\n")


def find_editor(method: str, loaded: Any) -> Path:
    """The newest finished training run of ``method`` for this model (by fingerprint)."""
    found = []
    d = registry_dir(method, loaded.fingerprint)
    for f in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            entry = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if (Path(entry["run"]) / EDITOR_FILE).is_file():
            found.append((entry["finished"], entry["run"]))
    if not found:
        raise ConfigError(f"no trained {method} editor for model '{loaded.name}' (fingerprint "
                          f"{loaded.fingerprint}): run `kedit train {method} --model {loaded.name}` first, "
                          f"or pass --editor RUN (or --set editor=untrained for the untrained editor)")
    return Path(max(found)[1])


def editor_path(method: str, editor: str | None, loaded: Any) -> Path:
    """Where the editor a method's ``editor`` hyperparameter names is (``None``: the newest
    for this model), its header checked against the method and the model (no tensors read)."""
    path = find_editor(method, loaded) if editor is None else Path(editor)
    check_editor_model(read_editor_header(path, method), loaded)
    return path


def resolve_editor(method: str, editor: str | None, loaded: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The editor a method's ``editor`` hyperparameter names (``None``: the newest for this
    model), read and checked against the model."""
    tensors, meta = read_editor(editor_path(method, editor, loaded), method)
    return tensors, meta


# ============================================================================ curve


def read_curve(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_curve(path: Path, points: Sequence[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(p) + "\n" for p in points))


def plot_curve(points: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Losses (train and validation) and validation scores against the step, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [p for p in points if p["kind"] == "train"]
    val = [p for p in points if p["kind"] == "val"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    losses = [k for k in dict.fromkeys([*(train[0] if train else {}), *(val[0] if val else {})]) if k.startswith("loss")]
    for key, style in zip(losses, ("-", "--", ":", "-.") * 3):
        if train and key in train[0]:
            a.plot([p["step"] for p in train], [p[key] for p in train], style, color="C0", label=f"train {key}")
        if val and key in val[0]:
            a.plot([p["step"] for p in val], [p[key] for p in val], style, color="C1", marker="o", ms=3,
                   label=f"val {key}")
    a.set_xlabel("step")
    a.set_ylabel("loss")
    a.set_yscale("log")
    a.legend(fontsize=7)
    for key, color in (("edit_success", "C3"), ("rewrite", "C2"), ("rephrase", "C4"), ("locality", "C5"),
                       ("cls_pos_acc", "C6"), ("cls_neg_acc", "C7")):
        if val and key in val[0]:
            b.plot([p["step"] for p in val], [p[key] for p in val], marker="o", ms=3, color=color, label=key)
    b.set_xlabel("step")
    b.set_ylim(-0.02, 1.02)
    b.set_title("validation")
    b.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# ============================================================================ the loop


def _run_id(method: str, model: str, payload: Any) -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:6]
    name = Path(model).name if os.sep in model else model
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")[:40] or "x"
    return f"{stamp}-train-{method}-{slug}-{digest}"


def new_run_dir(out: Path, method: str, model: str, config: dict[str, Any]) -> Path:
    run_id = _run_id(method, model, config)
    path, k = Path(out) / run_id, 1
    while path.exists():
        k += 1
        path = Path(out) / f"{run_id}-{k}"
    with refused_as(out):
        path.mkdir(parents=True)
    return path


def _plain(o: Any) -> Any:
    if isinstance(o, dict):
        return {str(k): _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_plain(v) for v in o]
    if o is None or isinstance(o, (bool, int, float, str)):
        return o if not isinstance(o, str) else str(o)
    return str(o)


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    write_text(run_dir / "config.yaml", yaml.safe_dump(_plain(config), sort_keys=False, allow_unicode=True))


def read_config(run_dir: Path) -> dict[str, Any]:
    config = read_dir_yaml(run_dir, "config.yaml", ConfigError, "training run")
    if not isinstance(config, dict) or config.get("kind") != "train":
        raise ConfigError(f"--resume {run_dir}: not a training run directory (its config.yaml is not kedit train's)")
    missing = [k for k in ("method", "data", "seed", "model", "hparams", "hparams_source") if k not in config]
    missing += [f"model.{k}" for k in ("name", "device", "dtype", "fingerprint") if k not in (config.get("model") or {})]
    if missing:
        raise ConfigError(f"--resume {run_dir}: config.yaml lacks {', '.join(missing)} (not written by kedit train)")
    return config


@dataclass
class _State:
    step: int = 0
    best: float | None = None
    best_step: int | None = None
    bad: int = 0
    skipped: int = 0
    stopped: str | None = None
    acc: dict[str, float] = field(default_factory=dict)   # train metrics summed since the last log point
    acc_n: int = 0


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"opt/{idx}/{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    return tensors, sd["param_groups"]


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, v in tensors.items():
        _, idx, k = name.split("/", 2)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(run_dir: Path, learner: Learner, opt: torch.optim.Optimizer, st: _State) -> None:
    tensors = {f"editor/{k}": v for k, v in learner.module().state_dict().items()}
    opt_t, groups = _optimizer_tensors(opt)
    tensors.update(opt_t)
    save_tensors(run_dir / CHECKPOINT_FILE, tensors, {"state": asdict(st), "param_groups": groups})


def load_checkpoint(run_dir: Path, learner: Learner, opt: torch.optim.Optimizer) -> _State:
    tensors, meta = load_tensors(run_dir / CHECKPOINT_FILE)
    editor = {k.removeprefix("editor/"): v for k, v in tensors.items() if k.startswith("editor/")}
    learner.module().load_state_dict(editor)
    _load_optimizer(opt, {k: v for k, v in tensors.items() if k.startswith("opt/")}, json.loads(meta["param_groups"]))
    return _State(**json.loads(meta["state"]))


def checkpoint_step(run_dir: Path) -> int | None:
    """The step of a training run's checkpoint (None without one), read from its metadata only."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.exists():
        return None
    return int(json.loads(read_metadata(path)["state"])["step"])


def _log(run_dir: Path, msg: str) -> None:
    stamp = _dt.datetime.now().strftime("%H:%M:%S")
    with refused_as(run_dir / "log.txt"), open(run_dir / "log.txt", "a", encoding="utf-8") as f:
        f.write(f"{stamp} {msg}\n")


Progress = Callable[[int, int, dict[str, float]], None]


def train_editor(learner: Learner, split: Split, run_dir: Path, settings: TrainSettings, model: dict[str, Any],
                 *, resume: bool = False, progress: Progress | None = None,
                 say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train ``learner`` on ``split`` into ``run_dir`` (see the module docstring); returns
    the summary (also written to ``summary.json``).  ``model``: name and fingerprint of
    the model the editor is for.  ``progress(step, steps, last train metrics)`` after each step."""
    run_dir = Path(run_dir)
    say = say or (lambda _m: None)
    problem = settings.check()
    if problem:
        raise ConfigError(problem)
    module = learner.module()
    opt = torch.optim.Adam(learner.param_groups())
    params = [p for g in opt.param_groups for p in g["params"]]
    curve_path = run_dir / CURVE_FILE
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    title = f"{learner.method} on {model.get('name')}: {len(split.train)} training cases, batch {settings.batch_size}"

    def validate(st: _State, points: list[dict[str, Any]]) -> None:
        t0 = time.perf_counter()
        module.train(False)
        scores = learner.validate(split.val)
        point = {"step": st.step, "kind": "val", **scores}
        points.append(point)
        value = scores[settings.early_stop_on]
        if st.best is None or value > st.best:
            st.best, st.best_step, st.bad = value, st.step, 0
            save_editor(run_dir / EDITOR_FILE, learner, model, st.step, scores)
        else:
            st.bad += 1
            if st.bad >= settings.patience:
                st.stopped = "early_stop"
        _log(run_dir, f"step {st.step}: validation " + " ".join(f"{k} {v:.4f}" for k, v in scores.items())
             + f" ({time.perf_counter() - t0:.1f} s; this process so far {time.perf_counter() - t_wall:.0f} s wall, "
               f"{time.process_time() - t_cpu:.0f} s CPU)")
        say(f"step {st.step}: validation {settings.early_stop_on} {value:.3f} (best {st.best:.3f} at step {st.best_step})")

    if resume and (run_dir / CHECKPOINT_FILE).exists():
        st = load_checkpoint(run_dir, learner, opt)
        points = [p for p in read_curve(curve_path) if p["step"] <= st.step]
        write_curve(curve_path, points)
        _log(run_dir, f"resumed at step {st.step}")
        say(f"resuming at step {st.step} of {settings.steps}")
    else:
        st, points = _State(), []
        validate(st, points)
        write_curve(curve_path, points)
        save_checkpoint(run_dir, learner, opt, st)
    last_plot = time.perf_counter()
    n = len(split.train)
    while st.step < settings.steps and st.stopped is None:
        batch = [split.train[i] for i in batch_at(n, settings.batch_size, st.step, settings.seed)]
        module.train(True)
        opt.zero_grad(set_to_none=True)
        loss, info = learner.train_loss(batch)
        loss.backward()
        finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)
        if finite:
            info["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, settings.grad_clip))
            opt.step()
        else:
            st.skipped += 1
            _log(run_dir, f"step {st.step}: gradient not finite, step skipped")
        st.step += 1
        for k, v in info.items():
            st.acc[k] = st.acc.get(k, 0.0) + float(v)
        st.acc_n += 1
        if st.step % settings.log_every == 0 or st.step == settings.steps:
            point = {"step": st.step, "kind": "train", **{k: v / st.acc_n for k, v in st.acc.items()}}
            points.append(point)
            st.acc, st.acc_n = {}, 0
            with open(curve_path, "a", encoding="utf-8") as f:   # appended; rewritten whole at each validation
                f.write(json.dumps(point) + "\n")
        if progress is not None:
            progress(st.step, settings.steps, info)
        if st.step % settings.val_every == 0 or st.step == settings.steps:
            validate(st, points)
            write_curve(curve_path, points)
            save_checkpoint(run_dir, learner, opt, st)
            if time.perf_counter() - last_plot > 60:       # the PNG is redrawn at most once a minute, and at the end
                plot_curve(points, run_dir / "curve.png", title)
                last_plot = time.perf_counter()
    stopped = st.stopped or "steps"
    summary = {"method": learner.method, "model": model, "steps": st.step, "max_steps": settings.steps,
               "stopped": stopped, "best_step": st.best_step, "early_stop_on": settings.early_stop_on,
               "best": next((p for p in points if p["kind"] == "val" and p["step"] == st.best_step), None),
               "untrained": next((p for p in points if p["kind"] == "val" and p["step"] == 0), None),
               "last": next((p for p in reversed(points) if p["kind"] == "val"), None),
               "skipped_steps": st.skipped, "train_cases": len(split.train), "val_cases": len(split.val),
               "seconds_this_session": round(time.perf_counter() - t_wall, 1),
               "cpu_seconds_this_session": round(time.process_time() - t_cpu, 1)}
    plot_curve(points, run_dir / "curve.png", title)
    write_text(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    register_editor(learner.method, model["fingerprint"], run_dir)
    _log(run_dir, f"finished: {stopped} after {st.step} steps; best step {st.best_step}")
    return summary


def run_config(method: str, loaded: Any, params: Any, hparams_source: str, data: str, seed: int) -> dict[str, Any]:
    """What a training run's config.yaml holds (everything ``--resume`` needs)."""
    import transformers

    from kedit.util.version import __version__

    return {"kind": "train", "method": method, "model": loaded.describe(), "hparams": asdict(params),
            "hparams_source": hparams_source, "data": data, "seed": seed,
            "versions": {"kedit": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
            "torch_threads": torch.get_num_threads(), "command": " ".join(["kedit", *sys.argv[1:]])}


def settings_from(params: Any, seed: int) -> TrainSettings:
    return TrainSettings(steps=params.steps, batch_size=params.batch_size, val_every=params.val_every,
                         patience=params.patience, grad_clip=params.grad_clip, seed=seed,
                         log_every=max(1, min(params.log_every, params.val_every)),
                         early_stop_on=params.early_stop_on)
