"""What ``kedit trace`` writes: heatmaps, the averaged curve, summary.md, the run directory.

Run directory (staged under ``.<id>.partial``, renamed when complete, see kedit.runs.rundir)::

    config.yaml          model, settings (kinds, samples, noise, window, seed), noise scale, command
    trace.json           {"prompt": PromptTrace.to_dict() | null, "cases": CasesTrace.to_dict() | null,
                          "seconds": {phase: wall-clock seconds}}
    heatmap-<kind>.png   p(t, l) for one prompt: tokens down, layers across, subject tokens marked *
    average-ie.png       average indirect effect at the last subject token, per layer (with --cases)
    summary.md           the headline numbers
    log.txt
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from kedit.util.atomic import atomic_path, write_text
from kedit.runs.rundir import RunDir, new_run_id, write_json, write_yaml
from kedit.analysis.trace import CasesTrace, PromptTrace

__all__ = ["plot_average", "plot_heatmap", "summary_markdown", "write_trace_run"]

CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
NAMES = {"hidden": "hidden state (block output)", "mlp": "MLP output", "attn": "attention output"}
COLOURS = {"hidden": "tab:purple", "mlp": "tab:green", "attn": "tab:red"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight")


def plot_heatmap(trace: PromptTrace, kind: str, path: Path, model: str = "") -> None:
    """``p(t, l)`` as an image: one row per token (subject tokens marked ``*``), one column per
    layer; colour from p_corrupt (white) upwards."""
    plt = _pyplot()
    import numpy as np

    p = np.array(trace.scores[kind])
    T, L = p.shape
    fig, ax = plt.subplots(figsize=(max(6.0, 0.26 * L + 3.0), max(3.0, 0.34 * T + 1.6)))
    vmin = min(trace.p_corrupt, float(p.min()))
    vmax = max(float(p.max()), vmin + 1e-9)
    im = ax.imshow(p, cmap=CMAPS[kind], aspect="auto", vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_yticks(range(T))
    ax.set_yticklabels([repr(s)[1:-1] for s in trace.prompt.labels], fontsize=9)
    step = 1 if L <= 16 else 2
    ax.set_xticks(range(0, L, step))
    ax.tick_params(axis="x", labelsize=8)
    w = trace.windows[kind]
    ax.set_xlabel("layer" if w == 1 else f"centre layer of the {w} restored layers")
    for t in range(trace.prompt.subject_first, trace.prompt.subject_last + 1):
        ax.get_yticklabels()[t].set_fontweight("bold")
    tp = trace.prompt
    title = (f"Restoring the {NAMES[kind]}" + (f", window {w}" if w > 1 else "")
             + (f" — {model}" if model else "") + "\n"
             + "\n".join(textwrap.wrap(tp.prompt, 70))
             + f"\nanswer {tp.answer!r} ({tp.answer_source}): p_clean {trace.p_clean:.3f}, "
             f"p_corrupt {trace.p_corrupt:.3f}   (* = subject token)")
    ax.set_title(title, fontsize=9, loc="left")
    cb = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    cb.set_label(f"p({tp.answer!r})", fontsize=9)
    _save(fig, path)
    plt.close(fig)


def plot_average(cases: CasesTrace, path: Path, model: str = "", configured: dict | None = None) -> None:
    """Average indirect effect at the last subject token per layer, ± one standard error,
    one line per kind; the suggested ROME layer and MEMIT window marked."""
    plt = _pyplot()
    import numpy as np

    avg = cases.average()
    fig, ax = plt.subplots(figsize=(8.0, 4.2))
    layers = np.arange(cases.n_layers)
    for kind in cases.kinds:
        m, se = np.array(avg["mean"][kind]), np.array(avg["stderr"][kind])
        ax.plot(layers, m, marker="o", ms=3, color=COLOURS[kind], label=f"{NAMES[kind]} (band: ± 1 s.e.)")
        ax.fill_between(layers, m - se, m + se, color=COLOURS[kind], alpha=0.2, lw=0)
    sug = cases.suggestion()
    if sug:
        a, b = sug["memit_layers"][0], sug["memit_layers"][-1]
        ax.axvspan(a - 0.5, b + 0.5, color="tab:green", alpha=0.08, label=f"suggested MEMIT layers {a}–{b}")
        ax.axvline(sug["rome_layer"], color="tab:green", ls="--", lw=1,
                   label=f"suggested ROME layer {sug['rome_layer']} (MLP argmax)")
    if configured and configured.get("rome_layer") is not None and configured["rome_layer"] < cases.n_layers:
        ax.axvline(configured["rome_layer"], color="black", ls=":", lw=1,
                   label=f"configured ROME layer {configured['rome_layer']}")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("layer (centre of the restored window for MLP / attention)")
    ax.set_ylabel("average indirect effect  p_restored − p_corrupt")
    ax.set_xticks(layers[:: 1 if cases.n_layers <= 32 else 2])
    ax.tick_params(axis="x", labelsize=8)
    ax.set_title(f"Causal tracing{' of ' + model if model else ''}: last subject token, {avg['n']} cases "
                 f"(mean p_clean {avg.get('p_clean', 0):.3f}, p_corrupt {avg.get('p_corrupt', 0):.3f})",
                 fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def summary_markdown(config: dict, prompt: PromptTrace | None, cases: CasesTrace | None) -> str:
    noise = config["settings"]["noise_std"]
    lines = [f"# kedit trace — {config['model']['name']}", "",
             f"noise: {noise['multiplier']} × embedding std {noise['std']:.4g} = {noise['scale']:.4g} "
             f"({noise['tokens']} tokens of {noise['corpus']}); {config['settings']['samples']} draws, "
             f"seed {config['settings']['seed']}, window {config['settings']['window']}", ""]
    if prompt is not None:
        tp = prompt.prompt
        lines += [f"## {tp.prompt!r} (subject {tp.subject!r})", "",
                  f"answer {tp.answer!r} ({tp.answer_source}); p_clean {prompt.p_clean:.4f}, "
                  f"p_corrupt {prompt.p_corrupt:.4f}", "",
                  "| kind | max IE | at token | layer | heatmap |", "|---|---|---|---|---|"]
        for kind in prompt.scores:
            ie = prompt.ie(kind)
            t, l = max(((t, l) for t in range(len(ie)) for l in range(len(ie[0]))), key=lambda x: ie[x[0]][x[1]])
            lines.append(f"| {kind} | {ie[t][l]:.4f} | {t} {tp.labels[t]!r} | {l} | heatmap-{kind}.png |")
        lines.append("")
    if cases is not None:
        avg, known = cases.average(), cases.average(known_only=True)
        sug = cases.suggestion()
        lines += [f"## Average indirect effect at the last subject token ({avg['n']} cases, "
                  f"{known['n']} known: answer = greedy prediction)", "",
                  "| layer | " + " | ".join(cases.kinds) + " |", "|---|" + "---|" * len(cases.kinds)]
        for l in range(cases.n_layers):
            lines.append(f"| {l} | " + " | ".join(f"{avg['mean'][k][l]:.4f} ± {avg['stderr'][k][l]:.4f}"
                                                 for k in cases.kinds) + " |")
        if sug:
            lines += ["", f"suggested ROME layer **{sug['rome_layer']}**, MEMIT layers "
                      f"**{sug['memit_layers'][0]}–{sug['memit_layers'][-1]}** (average-ie.png)"]
        lines.append("")
    return "\n".join(lines)


def write_trace_run(out: str | Path, config: dict, prompt: PromptTrace | None, cases: CasesTrace | None,
                    configured: dict | None = None, seconds: dict | None = None) -> Path:
    """The run directory (see the module docstring); returns its final path.  ``seconds``:
    wall-clock time per phase, written to trace.json and log.txt."""
    model = config["model"]["name"]
    rd = RunDir(Path(out), new_run_id("trace", model, config))
    try:
        rd.log(f"trace {model}: {config.get('command', '')}")
        for phase, secs in (seconds or {}).items():
            rd.log(f"{phase}: {secs:.1f} s")
        write_yaml(rd.path / "config.yaml", {**config, "run_id": rd.run_id})
        write_json(rd.path / "trace.json", {"prompt": prompt.to_dict() if prompt else None,
                                            "cases": cases.to_dict() if cases else None,
                                            "seconds": seconds or {}})
        if prompt is not None:
            for kind in prompt.scores:
                plot_heatmap(prompt, kind, rd.path / f"heatmap-{kind}.png", model)
                rd.log(f"heatmap-{kind}.png written")
        if cases is not None:
            plot_average(cases, rd.path / "average-ie.png", model, configured)
            rd.log(f"average-ie.png written ({len(cases.per_case)} cases)")
        write_text(rd.path / "summary.md", summary_markdown(config, prompt, cases))
        return rd.finish()
    except BaseException:
        rd.abandon()
        raise
