"""Checks on the real named models, outside `make test` (`make test-models` runs this).

    python bench/check_models.py [--model gemma3-270m] [--model smollm2-135m] [--device auto]

For each model: load it (the GGUF is converted once into the safetensors cache), check that it
completes "The Eiffel Tower is located in the city of" with " Paris" at about the probability
the issue measured, then run one ROME edit end to end with the shipped hyperparameters (the
seed case, cases/messi.jsonl: Lionel Messi plays football -> basketball) and check that the
answer flips, the locality prompts keep theirs and the weights come back bit for bit.  The
first ROME edit computes the layer's covariance statistics (cached under stats/).

Exit status 0 when every check passes, 1 otherwise; the numbers are printed either way.
gemma3-270m is google/gemma-3-270m (base), under the Gemma Terms of Use
(https://ai.google.dev/gemma/terms); install it with `make gemma`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from kedit.api import edit, generate  # noqa: E402
from kedit.config import default_hparams_file  # noqa: E402
from kedit.data.cases import load_cases  # noqa: E402
from kedit.models.load import load_model  # noqa: E402

PROMPT = "The Eiffel Tower is located in the city of"
# (model, lowest and highest accepted P(" Paris")): gemma3-270m gives 0.759 (issue 18);
# SmolLM2-135M-Instruct 0.70 (docs/tracing.md)
PARIS = {"gemma3-270m": (0.70, 0.82), "smollm2-135m": (0.60, 0.80)}
SEED_CASE = "cases/messi.jsonl"
METRICS = ("rewrite_acc", "rephrase_acc", "locality_acc", "efficacy_success", "paraphrase_success",
           "neighborhood_success")


def check(ok: bool, what: str, failures: list[str]) -> None:
    print(f"  [{'ok' if ok else 'FAIL'}] {what}")
    if not ok:
        failures.append(what)


def check_model(name: str, device: str, failures: list[str]) -> None:
    t0 = time.perf_counter()
    loaded = load_model(name, device=device, progress=lambda s: print("  " + s))
    cfg = loaded.model.config
    n_params = sum(p.numel() for p in loaded.model.parameters())
    print(f"{name}: {cfg.model_type}, {loaded.adapter.n_layers} layers, d={loaded.adapter.hidden_size}, "
          f"{n_params / 1e6:.0f}M parameters, loaded in {time.perf_counter() - t0:.1f} s on {loaded.device}"
          + (f"; licence: {loaded.info['licence']}" if loaded.info.get("licence") else ""))

    tok = loaded.tokenizer
    enc = tok(PROMPT, return_tensors="pt").to(loaded.device)
    with torch.no_grad():
        probs = loaded.model(**enc).logits[0, -1].float().softmax(-1)
    paris = tok(" Paris", add_special_tokens=False)["input_ids"][0]
    top = probs.topk(5)
    print(f"  {PROMPT!r} -> " + ", ".join(f"{tok.decode([int(i)])!r} {float(p):.3f}"
                                          for p, i in zip(top.values, top.indices)))
    lo, hi = PARIS.get(name, (0.0, 1.0))
    p = float(probs[paris])
    check(int(top.indices[0]) == paris and lo <= p <= hi, f"P(' Paris') = {p:.4f} is the top token, in [{lo}, {hi}]",
          failures)

    cases = load_cases(SEED_CASE)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    t0 = time.perf_counter()
    result = edit(loaded, cases, "rome")
    took = time.perf_counter() - t0
    rec = result.records[0]
    hp = default_hparams_file("rome", name, loaded.adapter.spec.family)
    print(f"  ROME ({hp.relative_to(hp.parents[3]) if hp else 'no hparams file'}), "
          f"{took:.1f} s with evaluation (edit {sum(rec['time'].get(k, 0) for k in ('key', 'target', 'update')):.1f} s, "
          f"{rec['method'].get('steps', '?')} steps)")
    for m in METRICS:
        print(f"    {m:22s} {rec['pre'][m]:.2f} -> {rec['post'][m]:.2f}")
    check(rec["pre"]["rewrite_acc"] == 0.0 and rec["post"]["rewrite_acc"] == 1.0,
          "the seed case flips: 'basketball' becomes the answer", failures)
    check(rec["post"]["efficacy_success"] == 1.0, "P(basketball) > P(football) after the edit", failures)
    check(rec["post"]["locality_acc"] == rec["pre"]["locality_acc"], "the locality prompts keep their answers",
          failures)
    check(all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items()),
          "the model is back to its weights, bit for bit", failures)
    prompt = "Lionel Messi plays the sport of"
    before_text = generate(loaded, prompt, max_new_tokens=8)[0]
    with result.applied():
        after_text = generate(loaded, prompt, max_new_tokens=8)[0]
    print(f"    {prompt!r}: before {before_text!r}, after {after_text!r}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=None, help="a named model (repeatable; default: both)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    failures: list[str] = []
    for name in args.model or ["smollm2-135m", "gemma3-270m"]:
        check_model(name, args.device, failures)
    print("all checks passed" if not failures else f"{len(failures)} check(s) failed: " + "; ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
