"""GPU throughput of the statistics pass, ROME and MEMIT on full-size model shapes.

    python bench/bench_gpu.py [--models gpt2-xl,gpt-j-6b,llama-3-8b] [--stats-texts 1000]
                              [--rome 10] [--memit 100,1000] [--peak-tflops T] [--no-flops] [--json F]

For each shape a model is built from a transformers config written below (GPT-2 XL, GPT-J
6B, Llama-3 8B), randomly initialised in bfloat16 on ``cuda:0`` -- no weights are
downloaded -- with a byte-level BPE tokenizer trained here on the shipped WikiText-2 (8,192
tokens; the edits and the statistics need a tokenizer, not the model's own).  Then:

* statistics: ``E[k kᵀ]`` of every layer ROME and MEMIT edit, one pass over
  ``--stats-texts`` WikiText-2 paragraphs: tokens per second;
* ROME: ``--rome`` single edits (CounterFact validation cases), seconds per edit;
* MEMIT: one batch of each size in ``--memit`` (first CounterFact cases), seconds per batch.

The methods run with kedit's hyperparameter files for the shape (``configs/methods/``:
``gpt2-xl``, ``gpt-j-6b``, the ``llama`` family file for Llama-3), the covariance from the
statistics pass above (``mom2_samples`` = ``--stats-texts``); the edit alone is timed (no
evaluation).  FLOPs are counted with ``torch.utils.flop_counter`` on a second, untimed run
of the same work (matmuls and attention, forward and backward; the float64 solves are not
counted); printed per optimisation step (ROME, MEMIT: edit FLOPs / gradient steps) and per
token (statistics), with the share of the GPU's bfloat16 dense peak (known for
A100/H100/H200/L40S by name, else ``--peak-tflops``).  Random weights seldom reach the
target optimisation's early-stopping loss: an edit runs (nearly) all its steps, about the
upper bound of a trained model's time; each row gives the steps that ran.  Needs CUDA; on a machine without it, says so in one line and exits 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

#: bfloat16 dense tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name()
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}


def shape_configs() -> dict:
    """name -> (transformers config, hparams file stem) of each full-size shape."""
    from transformers import GPT2Config, GPTJConfig, LlamaConfig

    return {
        "gpt2-xl": (GPT2Config(vocab_size=50257, n_positions=1024, n_embd=1600, n_layer=48, n_head=25), "gpt2-xl"),
        "gpt-j-6b": (GPTJConfig(vocab_size=50400, n_positions=2048, n_embd=4096, n_layer=28, n_head=16,
                                rotary_dim=64, tie_word_embeddings=False), "gpt-j-6b"),
        "llama-3-8b": (LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                   max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                                   tie_word_embeddings=False, bos_token_id=0, eos_token_id=0), None),
    }


def bpe_tokenizer(vocab_size: int = 8192):
    """A byte-level BPE tokenizer trained on WikiText-2 (ids below every shape's vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from kedit.data.corpus import wikitext_paragraphs

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(wikitext_paragraphs(2000), trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", padding_side="right", model_max_length=1024)


def build(name: str, config, tok, device: torch.device):
    from transformers import AutoModelForCausalLM

    from kedit.models.arch import ModelAdapter
    from kedit.models.load import LoadedModel

    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.eval().requires_grad_(False)
    fp = hashlib.sha256(f"bench-gpu|{name}|{config.to_json_string()}".encode()).hexdigest()[:16]
    return LoadedModel(model, tok, ModelAdapter(model), name, "", fp, device, torch.bfloat16)


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def share(flop_per_s: float, peak: float | None) -> str:
    return f"{100 * flop_per_s / peak:.1f}%" if peak else "n/a (--peak-tflops)"


def bench_shape(name: str, config, hp_stem, tok, args, device, peak) -> list[dict]:
    from kedit.methods.base import EditRequest, RunContext
    from kedit.methods.core.stats import get_stats
    from kedit.runs.bench import load_benchmark
    from kedit.runs.experiment import make_method

    loaded = build(name, config, tok, device)
    n_params = sum(p.numel() for p in loaded.model.parameters())
    print(f"== {name}: {n_params / 1e9:.2f} B parameters, bfloat16, {torch.cuda.get_device_name(device)}")
    stats_dir = tempfile.mkdtemp(prefix="kedit-bench-gpu-")
    methods = {}
    for method in ("rome", "memit"):
        hp = Path(__file__).resolve().parent.parent / "configs" / "methods" / method / f"{hp_stem or 'llama'}.yaml"
        ctx = RunContext(stats_dir=stats_dir, progress=False)
        methods[method], _ = make_method(loaded, method, str(hp), {"mom2_samples": args.stats_texts}, ctx)
    layers = sorted({methods["rome"].params.layer, *methods["memit"].params.layers})
    rows = []

    got, secs = timed(lambda: get_stats(loaded, layers, samples=args.stats_texts, stats_dir=stats_dir, force=True,
                                        progress=False))
    tokens = got.info[layers[0]].tokens
    row = {"shape": name, "what": f"statistics, layers {layers[0]}-{layers[-1]}", "n": tokens, "seconds": secs,
           "tokens_per_s": tokens / secs}
    if not args.no_flops:
        row["flops"] = flops(lambda: get_stats(loaded, layers, samples=args.stats_texts, stats_dir=stats_dir,
                                               force=True, progress=False))
        row["flops_per_token"] = row["flops"] / tokens
        row["share_of_peak"] = share(row["flops"] / secs, peak)
    rows.append(row)
    print(f"   statistics: {tokens:,} tokens in {secs:.1f} s = {tokens / secs:,.0f} tokens/s"
          + (f", {row['flops_per_token'] / 1e9:.2f} GFLOP/token, {row['share_of_peak']} of peak"
             if "flops" in row else ""))

    cases = load_benchmark("counterfact", n=max([args.rome, *args.memit]))
    # ROME: --rome single edits, cases 0, 1, ...; MEMIT: one batch of each size from case 0
    work = [("rome", cases[i:i + 1]) for i in range(args.rome)] + [("memit", cases[:size]) for size in args.memit]
    for i, (method, chunk) in enumerate(work):
        meth = methods[method]
        meth.prepare()                                   # covariance from the pass above, context prefixes
        reqs = [EditRequest.from_case(c) for c in chunk]
        edit, secs = timed(lambda: meth.compute(reqs))
        steps = statistics.mean(c.get("steps", 0) for c in edit.meta.get("cases", [{}]))
        row = {"shape": name, "what": f"{method} batch {len(reqs)}", "n": len(reqs), "seconds": secs, "steps": steps}
        if not args.no_flops and (method == "memit" or i == 0):       # ROME: the first edit is counted
            row["flops"] = flops(lambda: meth.compute(reqs))
            row["flops_per_step"] = row["flops"] / max(1.0, steps)
            row["share_of_peak"] = share(row["flops"] / secs, peak)
        rows.append(row)
    rome = [r for r in rows if r["what"] == "rome batch 1"]
    if rome:
        counted = next((r for r in rome if "flops" in r), {})
        print(f"   rome: {len(rome)} edits, median {statistics.median(r['seconds'] for r in rome):.2f} s per edit, "
              f"{statistics.mean(r['steps'] for r in rome):.0f} steps"
              + (f", {counted['flops_per_step'] / 1e12:.2f} TFLOP/step, {counted['share_of_peak']} of peak"
                 if counted else ""))
    for r in rows:
        if r["what"].startswith("memit"):
            print(f"   {r['what']}: {r['seconds']:.1f} s ({r['n'] / r['seconds']:.1f} edits/s), "
                  f"{r['steps']:.0f} steps" + (f", {r['flops_per_step'] / 1e12:.2f} TFLOP/step, "
                                               f"{r['share_of_peak']} of peak" if "flops" in r else ""))
    del loaded, methods
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt2-xl,gpt-j-6b,llama-3-8b", help="shapes, comma-separated")
    ap.add_argument("--stats-texts", type=int, default=1000, help="WikiText-2 paragraphs for the statistics pass")
    ap.add_argument("--rome", type=int, default=10, help="ROME single edits")
    ap.add_argument("--memit", default="100,1000", help="MEMIT batch sizes")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's bfloat16 dense peak, TFLOP/s")
    ap.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting runs (half the time)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA device here (torch.cuda.is_available() is False); run it on an NVIDIA GPU",
              file=sys.stderr)
        raise SystemExit(2)
    shapes = shape_configs()
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in wanted if m not in shapes]
    if unknown:
        ap.error(f"--models {unknown[0]}: choose from {', '.join(shapes)}")
    try:
        args.memit = [int(x) for x in args.memit.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--memit {args.memit}: expected sizes such as 100,1000")
    device = torch.device("cuda", torch.cuda.current_device())
    name = torch.cuda.get_device_name(device)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next((v for k, v in PEAK_BF16.items() if k in name), None)
    tok = bpe_tokenizer()
    rows = []
    for m in wanted:
        config, stem = shapes[m]
        rows += bench_shape(m, config, stem, tok, args, device, peak)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "peak_flops": peak, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
