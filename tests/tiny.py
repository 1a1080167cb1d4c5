"""Tiny randomly initialised models of every supported family, built offline.

``tiny_model(family, seed=0)`` returns a :class:`kedit.models.load.LoadedModel` wrapping a
2-3 layer ``*ForCausalLM`` (hidden 32, MLP width != hidden so weight-layout mistakes
show) and a small byte-level BPE fast tokenizer trained on the shipped WikiText-2
(GPT-2 / SmolLM2 style: space-prefixed tokens, offsets mapping, no BOS unless asked --
``gemma3`` asks, as Gemma's tokenizer prepends <bos> -- ``<pad>`` as pad token).  Every call builds a fresh model (tests edit weights in
place); the tokenizer is built once per test run.
"""

from __future__ import annotations

import functools
import hashlib

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from kedit.data.corpus import wikitext_paragraphs
from kedit.models.arch import ModelAdapter
from kedit.models.load import LoadedModel

FAMILIES = ("gpt2", "gptj", "gpt_neox", "llama", "qwen2", "mistral", "gemma3")
BOS_FAMILIES = ("gemma3",)  # their tokenizer prepends <bos> by default
SPECIALS = ["<|endoftext|>", "<pad>", "<s>"]  # ids 0, 1, 2
MAX_POSITIONS = 128
HIDDEN = 32
HEADS = 4


@functools.lru_cache(maxsize=None)
def tiny_tokenizer(bos: bool = False, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes, no unknowns) trained on 200 WikiText-2 paragraphs.

    eos = ``<|endoftext|>`` (id 0), pad = ``<pad>`` (id 1), bos = ``<s>`` (id 2, added
    only with ``bos=True``).  Shared between tests: do not mutate it.
    """
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(wikitext_paragraphs(200), trainer=trainer)
    byte_level = processors.ByteLevel(trim_offsets=False)
    if bos:
        tok.post_processor = processors.Sequence([
            byte_level,
            processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                          special_tokens=[("<s>", tok.token_to_id("<s>"))]),
        ])
    else:
        tok.post_processor = byte_level
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>",
                                   bos_token="<s>", unk_token="<|endoftext|>", padding_side="right",
                                   model_max_length=MAX_POSITIONS)


def tiny_config(family: str, vocab_size: int):
    """HF config of a tiny model of ``family`` (``vocab_size`` >= the tokenizer's)."""
    from transformers import (Gemma3TextConfig, GPT2Config, GPTJConfig, GPTNeoXConfig, LlamaConfig, MistralConfig,
                              Qwen2Config)

    ids = dict(bos_token_id=2, eos_token_id=0, pad_token_id=1)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=MAX_POSITIONS, n_embd=HIDDEN, n_layer=3,
                          n_head=HEADS, n_inner=4 * HIDDEN, **ids)  # Conv1D, key size 128
    if family == "gptj":
        return GPTJConfig(vocab_size=vocab_size, n_positions=MAX_POSITIONS, n_embd=HIDDEN, n_layer=3,
                          n_head=HEADS, rotary_dim=4, n_inner=3 * HIDDEN, **ids)
    if family == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab_size, max_position_embeddings=MAX_POSITIONS, hidden_size=HIDDEN,
                             num_hidden_layers=3, num_attention_heads=HEADS, intermediate_size=80,
                             rotary_pct=0.5, **ids)
    common = dict(vocab_size=vocab_size, max_position_embeddings=MAX_POSITIONS, hidden_size=HIDDEN,
                  num_hidden_layers=3, num_attention_heads=HEADS, num_key_value_heads=2, **ids)
    if family == "llama":  # tied head, like SmolLM2
        return LlamaConfig(intermediate_size=64, tie_word_embeddings=True, **common)
    if family == "qwen2":
        return Qwen2Config(intermediate_size=72, tie_word_embeddings=False, **common)
    if family == "mistral":
        return MistralConfig(intermediate_size=56, sliding_window=None, tie_word_embeddings=False, **common)
    if family == "gemma3":
        # Gemma-3 270M in miniature: GeGLU MLP, four norms per block, sqrt(d)-scaled embeddings,
        # tied head, one global layer between sliding ones whose window (4 positions) is shorter
        # than every test prompt, so a mask or cache that ignores the window changes the results.
        # Weights ~ N(0, 0.1) rather than 0.02: behind four unit-scale norms per block a 0.02 head
        # gives near-uniform next-token distributions that no single edit can tip (see tiny_model
        # for the post-MLP norms).
        return Gemma3TextConfig(intermediate_size=48, head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                                layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                tie_word_embeddings=True, final_logit_softcapping=None,
                                attn_logit_softcapping=None, initializer_range=0.1, **common)
    raise ValueError(f"unknown tiny family '{family}' (choose from {', '.join(FAMILIES)})")


def tiny_model(family: str = "llama", seed: int = 0, bos: bool | None = None) -> LoadedModel:
    """A fresh tiny ``family`` model (eval, frozen, float32, CPU), seeded by ``seed``.

    ``bos``: whether the tokenizer prepends <s>; by default only for :data:`BOS_FAMILIES`.
    """
    if bos is None:
        bos = family in BOS_FAMILIES
    tok = tiny_tokenizer(bos)
    vocab = -(-len(tok) // 64) * 64
    config = tiny_config(family, vocab)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    adapter = ModelAdapter(model)
    if adapter.spec.mlp_out_norm:
        # Gemma normalises each MLP output before adding it: at the initial scale 1 the MLP of one
        # layer is a sixth of the residual stream and an MLP edit cannot outvote the rest.  Trained
        # models learn larger post-MLP scales; the tiny one gets 4 (Gemma's norm multiplies by 1 + w).
        with torch.no_grad():
            for layer in range(adapter.n_layers):
                adapter.mlp_out_norm(layer).weight.fill_(3.0)
    model.eval()
    model.requires_grad_(False)
    fingerprint = hashlib.sha256(f"tiny|{family}|{seed}|{int(bos)}".encode()).hexdigest()[:16]
    return LoadedModel(model, tok, adapter, name=f"tiny-{family}", path="", fingerprint=fingerprint,
                       device=torch.device("cpu"), dtype=torch.float32)


def save_tiny_model_dir(path, family: str = "llama", seed: int = 0):
    """Save a tiny model and its tokenizer as a Hugging Face directory (what `--model DIR` loads)."""
    loaded = tiny_model(family, seed)
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return path


def fact_world(root):
    """A tiny llama directory, three cases (rephrasing and one locality prompt each) and a
    short FT-M hyperparameter file under ``root``: ``(model_dir, cases_file, hparams_file)``
    for tests that drive the CLI end to end.  Set KEDIT_HOME before calling."""
    import json

    import yaml

    d = save_tiny_model_dir(root / "tiny-llama")
    cases = root / "cases.jsonl"
    cases.write_text("".join(json.dumps(
        {"case_id": f"c{i}", "prompt": f"A fact about {s}", "subject": s, "target_new": "of", "ground_truth": "the",
         "rephrase_prompts": [f"Another fact about {s}"],
         "locality": {"n": {"prompt": f"Nothing about {s}", "ground_truth": "and"}}}) + "\n"
        for i, s in enumerate(["France", "Lionel Messi", "Tokyo"])))
    hp = root / "ft.yaml"
    hp.write_text(yaml.safe_dump({"layers": [1], "num_steps": 3, "lr": 0.5}))
    return d, cases, hp
