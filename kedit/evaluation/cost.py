"""What editing costs the model beyond the edited facts: perplexity and retained knowledge.

The ROME, MEMIT and AlphaEdit papers measure the general ability an edit leaves (MEMIT
and AlphaEdit show sequential editing ending in a broken model).  kedit measures two
things on the model as it stands, before the edit and after it (independent edits: after
each; sequential runs: at every checkpoint of the curve and after the last edit):

* ``ppl`` -- perplexity on held-out Wikipedia text: the first ``ppl_tokens`` (default
  20,000) tokens of the shipped WikiText-2 **test** split (``kedit/data/
  wikitext-2-test.tokens``; the statistics corpus reads the validation split first, and
  its default 1,000 paragraphs never reach the test split).  The text is the split's
  paragraphs in file order, headings dropped and WikiText's `` @-@ `` / `` @,@ `` /
  `` @.@ `` joined back, one paragraph a line; it is tokenised once without special
  tokens, cut to ``ppl_tokens`` tokens and into windows of ``window`` (default 512)
  tokens, each scored on its own (no context carried over).  With ``s`` the scored
  tokens (every token but the first of each window) and ``log p`` each one's
  log-probability given the window before it::

      ppl = exp( -(1/|s|) Σ_{t in s} log p(x_t | x_<t) )     (exp of the mean NLL)

* ``retained_acc`` -- the share of a fixed, shipped set of facts that the model still
  gets right: ``kedit/data/retained/counterfact-known-smollm2-135m.jsonl``, 200 true
  CounterFact facts (prompt, answer) that the unedited embedded SmolLM2-135M ranks first
  (see that folder's README for how they were chosen).  A fact is right when, teacher
  forced on prompt + " " + answer, the argmax at every answer position is the answer's
  token (token accuracy 1).  On the embedded model the pre-edit value is 1.00 by
  construction; another model starts from what it knows of the same 200 facts.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from kedit.data.corpus import CorpusError
from kedit.evaluation.scoring import model_device, score_targets
from kedit.util.paths import package_data

__all__ = ["CostSettings", "PPL_FILE", "RETAINED_FILE", "perplexity", "ppl_text", "ppl_token_ids",
           "retained_acc", "retained_facts"]

PPL_FILE = "wikitext-2-test.tokens"
RETAINED_FILE = "retained/counterfact-known-smollm2-135m.jsonl"

_HEADING = re.compile(r"^(= )+.*( =)+$")
_ARTEFACTS = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))


def ppl_text(path: str | Path | None = None) -> str:
    """The WikiText-2 test split as plain text: paragraphs in file order, one a line,
    headings dropped, `` @-@ `` / `` @,@ `` / `` @.@ `` joined back."""
    path = Path(path) if path else package_data() / PPL_FILE
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as e:
        raise CorpusError(f"perplexity text {path}: cannot read ({e.strerror or e})") from None
    out = []
    for line in raw.splitlines():
        line = line.strip()
        if not line or _HEADING.match(line):
            continue
        for old, new in _ARTEFACTS:
            line = line.replace(old, new)
        out.append(line)
    return "\n".join(out)


def ppl_token_ids(tokenizer: Any, n_tokens: int, text: str | None = None) -> list[int]:
    """The first ``n_tokens`` token ids of :func:`ppl_text` (no special tokens added)."""
    if n_tokens < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {n_tokens}")
    text = ppl_text() if text is None else text
    # tokenise a prefix long enough (about 4 characters a token; grow if short)
    chars = 8 * n_tokens
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) > n_tokens or chars >= len(text):
            break
        chars *= 2
    if len(ids) < n_tokens:
        raise CorpusError(f"the perplexity text has {len(ids)} tokens for this tokenizer, fewer than {n_tokens}")
    return [int(t) for t in ids[:n_tokens]]


def perplexity(model: Any, token_ids: Sequence[int], window: int = 512, batch_size: int = 4) -> float:
    """``exp`` of the mean negative log-likelihood of ``token_ids`` cut into windows of
    ``window`` tokens (each window's first token is not scored); float64 sums.  A model
    with fewer positions (``config.max_position_embeddings`` / ``n_positions``) gets
    windows of its length."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(limit, int) and limit > 0:
        window = min(window, limit)
    if window < 2:
        raise ValueError(f"window must be at least 2, got {window}")
    ids = torch.tensor(list(token_ids), dtype=torch.long)
    chunks = [ids[i: i + window] for i in range(0, len(ids), window)]
    chunks = [c for c in chunks if len(c) >= 2]
    if not chunks:
        raise ValueError("perplexity of fewer than 2 tokens")
    device = model_device(model)
    total, count = 0.0, 0
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.inference_mode():
            for b in range(0, len(chunks), batch_size):
                group = chunks[b: b + batch_size]
                width = max(len(c) for c in group)
                batch = torch.zeros(len(group), width, dtype=torch.long)
                mask = torch.zeros(len(group), width, dtype=torch.long)
                for r, c in enumerate(group):
                    batch[r, : len(c)] = c
                    mask[r, : len(c)] = 1
                out = model(input_ids=batch.to(device), attention_mask=mask.to(device))
                logits = out.logits if hasattr(out, "logits") else out[0]
                logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                nll = -logp.gather(-1, batch[:, 1:].to(logp.device)[..., None])[..., 0]
                keep = mask[:, 1:].to(nll.device).bool()
                total += float(nll[keep].double().sum())
                count += int(keep.sum())
    finally:
        if hasattr(model, "train"):
            model.train(was_training)
    return math.exp(total / count)


def retained_facts(path: str | Path | None = None) -> list[tuple[str, str]]:
    """``(prompt, answer)`` of the shipped retained-knowledge facts (or of ``path``, JSONL
    with ``prompt`` and ``answer``)."""
    path = Path(path) if path else package_data() / RETAINED_FILE
    facts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            facts.append((str(rec["prompt"]), str(rec["answer"])))
    return facts


def retained_acc(model: Any, tokenizer: Any, facts: Sequence[tuple[str, str]], batch_size: int = 32) -> float:
    """Share of ``facts`` whose answer tokens are all the argmax, teacher forced."""
    scores = score_targets(model, tokenizer, list(facts), batch_size=batch_size)
    return float(sum(bool((s.argmax_ids == s.target_ids).all()) for s in scores) / len(scores))


@dataclass
class CostSettings:
    """What ``ppl`` and ``retained_acc`` measure; token ids and facts are read once."""

    ppl_tokens: int = 20_000
    window: int = 512
    batch_size: int = 4
    retained: bool = True
    _ids: dict[int, list[int]] = field(default_factory=dict, repr=False, compare=False)
    _facts: list[tuple[str, str]] | None = field(default=None, repr=False, compare=False)

    def measure(self, loaded: Any) -> dict[str, float]:
        """``{"ppl": ..., "retained_acc": ...}`` of the model as it stands."""
        tok = loaded.tokenizer
        if id(tok) not in self._ids:
            self._ids[id(tok)] = ppl_token_ids(tok, self.ppl_tokens)
        out = {"ppl": perplexity(loaded.model, self._ids[id(tok)], self.window, self.batch_size)}
        if self.retained:
            if self._facts is None:
                self._facts = retained_facts()
            out["retained_acc"] = retained_acc(loaded.model, tok, self._facts)
        return out
