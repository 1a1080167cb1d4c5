"""EasyEdit's own ROME on the same model, cases and covariance as kedit: the README's
"EasyEdit 0.0.1.dev0's own ROME code, run here" row.

    pip download --no-deps easyeditor==0.0.1.dev0 -d /tmp/ee
    unzip -q /tmp/ee/easyeditor-0.0.1.dev0-py3-none-any.whl -d /tmp/ee/pkg
    python bench/easyedit_rome.py --easyedit /tmp/ee/pkg [--cases cases/anchor-31.jsonl]
                                  [--layer 5] [--out ee.jsonl] [--compare runs/<kedit run>]

Nothing of EasyEdit ships with kedit.  This script copies the three parts of the
unpacked wheel that ROME needs (``util/``, ``models/rome/``, ``evaluate/evaluate_utils.py``)
into a temporary package, changes only what stops them running here (the hard-coded
``cuda:{device}`` becomes this script's device; imports of packages those parts never
use are dropped) and runs them: EasyEdit's ``apply_rome_to_model`` for the edit and its
``test_prediction_acc`` for rewrite / rephrase / locality, weights restored between
cases.  Settings: EasyEdit's LLaMA ROME file (layer 5, 25 steps, lr 0.5, weight decay
1e-3, clamp 4, KL 0.0625, 20 prefixes, covariance on).  The covariance is handed in from
kedit's cache (the same WikiText-2 paragraphs), so the two toolkits differ by algorithm
code only.  EasyEdit samples its context prefixes from the global torch RNG; ``--seed``
seeds it.  ``--compare`` counts the cases whose rephrase outcome a kedit run matches.
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kedit.models.load import load_model  # noqa: E402
from kedit.methods.core.stats import get_stats  # noqa: E402

# imports the copied parts carry but never use, and that kedit does not install
UNUSED_IMPORTS = ("from matplotlib.style import context", "from datasets import load_dataset",
                  "import scipy", "import nltk")


def easyedit_package(src: Path, device: str) -> Path:
    """A minimal ``easyeditor`` package (ROME + metrics) under a temporary directory."""
    src = src / "easyeditor" if (src / "easyeditor").is_dir() else src
    if not (src / "models" / "rome" / "rome_main.py").is_file():
        raise SystemExit(f"{src}: not an unpacked easyeditor package (no models/rome/rome_main.py)")
    root = Path(tempfile.mkdtemp(prefix="easyedit-"))
    atexit.register(shutil.rmtree, root, True)          # imported for this run only
    pkg = root / "easyeditor"
    shutil.copytree(src / "util", pkg / "util")
    shutil.copytree(src / "models" / "rome", pkg / "models" / "rome")
    (pkg / "evaluate").mkdir()
    shutil.copy(src / "evaluate" / "evaluate_utils.py", pkg / "evaluate" / "evaluate_utils.py")
    for name in ("alg_dict.py", "alg_train_dict.py"):   # import every other method
        (pkg / "util" / name).unlink(missing_ok=True)
    for init in (pkg, pkg / "models", pkg / "evaluate"):
        (init / "__init__.py").write_text("")
    for py in pkg.rglob("*.py"):
        text = py.read_text()
        new = text.replace('f"cuda:{hparams.device}"', repr(device)).replace('f"cuda:{device}"', repr(device))
        for line in UNUSED_IMPORTS:
            new = new.replace(line + "\n", "\n")
        if new != text:
            py.write_text(new)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--easyedit", required=True, help="the unpacked easyeditor wheel (or its easyeditor/ folder)")
    ap.add_argument("--cases", default="cases/anchor-31.jsonl", help="EasyEdit flat layout, one case per line")
    ap.add_argument("-n", type=int, default=None)
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="per-case results (JSONL)")
    ap.add_argument("--compare", default=None, help="a kedit run directory on the same cases")
    args = ap.parse_args()

    sys.path.insert(0, str(easyedit_package(Path(args.easyedit), args.device)))
    from easyeditor.evaluate.evaluate_utils import test_prediction_acc
    from easyeditor.models.rome import compute_u, rome_main
    from easyeditor.models.rome.rome_hparams import ROMEHyperParams

    loaded = load_model(args.model, device=args.device, progress=lambda s: None)
    model, tok = loaded.model, loaded.tokenizer
    tok.pad_token_id = tok.eos_token_id                      # as EasyEdit's editor does
    C = get_stats(loaded, [args.layer], samples=1000, progress=False)[args.layer]
    inv = torch.inverse(C.to(loaded.device).float())
    compute_u.get_inv_cov = lambda *a, **k: inv               # kedit's covariance, EasyEdit's algebra
    adapter = loaded.adapter

    def template(kind: str) -> str:      # EasyEdit's module-path templates, from kedit's adapter
        last = adapter.n_layers - 1
        path = adapter.module_path(kind, last)
        block = adapter.module_path("block", last)
        return block.rsplit(".", 1)[0] + ".{}" + path[len(block):]

    hparams = ROMEHyperParams(
        layers=[args.layer], fact_token="subject_last", v_num_grad_steps=25, v_lr=0.5,
        v_loss_layer=adapter.n_layers - 1, v_weight_decay=1e-3, clamp_norm_factor=4, kl_factor=0.0625,
        mom2_adjustment=True, context_template_length_params=[[5, 10], [10, 10]],
        rewrite_module_tmp=template("mlp_out"), layer_module_tmp=template("block"),
        mlp_module_tmp=template("mlp"), attn_module_tmp=template("attn"),
        ln_f_module=adapter.module_path("final_norm", None), lm_head_module="lm_head",
        mom2_dataset="wikipedia", mom2_n_samples=1000, mom2_dtype="float32", alg_name="ROME", device=0,
        model_name=args.model, stats_dir="unused", max_length=40)
    torch.manual_seed(args.seed)
    cases = [json.loads(line) for line in open(args.cases) if line.strip()][: args.n]

    def acc(prompt: str, target: str) -> float:
        return float(np.mean(test_prediction_acc(model, tok, hparams, prompt, target, 0)))

    def answers(prompt: str, target: str):
        return test_prediction_acc(model, tok, hparams, prompt, target, 0, locality=True)

    params = dict(model.named_parameters())
    rows, times = [], []
    for c in cases:
        request = {k: c[k] for k in ("prompt", "subject", "target_new", "ground_truth")}
        loc_pre = answers(c["locality_prompt"], c["locality_ground_truth"])
        t0 = time.perf_counter()
        _, orig = rome_main.apply_rome_to_model(model, tok, [request], hparams, return_orig_weights=True,
                                                keep_original_weight=True)
        times.append(time.perf_counter() - t0)
        loc_post = answers(c["locality_prompt"], c["locality_ground_truth"])
        post = {"rewrite_acc": acc(c["prompt"], c["target_new"]),
                "rephrase_acc": acc(c["rephrase_prompt"], c["target_new"]),
                "locality_acc": float(np.mean([np.mean(np.equal(a, b)) for a, b in zip(loc_pre, loc_post)]))}
        with torch.no_grad():
            for name, w in orig.items():
                params[name][...] = w
        rows.append({"case_id": str(c["case_id"]), "post": post, "edit_s": times[-1]})
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    means = {k: statistics.mean(r["post"][k] for r in rows) for k in rows[0]["post"]}
    print(f"EasyEdit ROME, layer {args.layer}, {len(rows)} cases: median edit {statistics.median(times):.1f} s; "
          + ", ".join(f"{k} {v:.3f}" for k, v in means.items()))
    if args.compare:
        kedit_rows = {str(json.loads(line)["case_id"]): json.loads(line)["post"]
                      for line in open(Path(args.compare) / "results.jsonl")}
        same = sum(abs(kedit_rows[r["case_id"]]["rephrase_acc"] - r["post"]["rephrase_acc"]) < 1e-9 for r in rows)
        print(f"rephrase outcome the same as {args.compare} on {same} of {len(rows)} cases")


if __name__ == "__main__":
    main()
