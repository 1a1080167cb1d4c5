"""How text maps to tokens: prompt/target boundaries, subject positions, batching.

This is the one module that knows about offsets and tokenisation quirks; everything
else (scoring, editing methods) asks it for token indices.

Conventions
-----------
* Tokenisation always goes through ``tokenizer(text, ...)`` with the tokenizer's own
  default ``add_special_tokens=True``, so an index returned here is valid for the ids
  that ``tokenizer(text)["input_ids"]`` gives.
* Tokens with an empty character span (``start == end``, e.g. a BOS added by the
  post-processor, whose offsets are ``(0, 0)``) are "structural": they never overlap
  any text.
* A fast tokenizer (``return_offsets_mapping`` support) is required.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch

__all__ = [
    "PromptTarget",
    "SUBJECT_POSITIONS",
    "char_span_to_tokens",
    "encode_prompt_target",
    "join",
    "pad_batch",
    "subject_token_index",
    "subject_token_indices",
]

SUBJECT_POSITIONS = ("subject_last", "subject_first", "subject_after_last", "last")
Position = Literal["subject_last", "subject_first", "subject_after_last", "last"]


# --------------------------------------------------------------------------- join


def join(prompt: str, target: str) -> tuple[str, int]:
    """``prompt + separator + target`` and the character index where ``target`` starts.

    The separator is one space, unless the prompt is empty, ends with whitespace, or
    the target starts with whitespace (then nothing is inserted).
    """
    if not prompt or prompt[-1].isspace() or (target and target[0].isspace()):
        sep = ""
    else:
        sep = " "
    text = prompt + sep + target
    return text, len(prompt) + len(sep)


# --------------------------------------------------------------------------- helpers


def _encode(tokenizer: Any, texts: str | list[str], **kw: Any) -> Any:
    try:
        return tokenizer(texts, return_offsets_mapping=True, **kw)
    except NotImplementedError as exc:  # slow (python) tokenizers have no offsets
        raise TypeError(
            "kedit.models.tokens needs a fast tokenizer (return_offsets_mapping support); "
            f"got {type(tokenizer).__name__}"
        ) from exc


def _as_pairs(offsets: Sequence[Any]) -> list[tuple[int, int]]:
    return [(int(s), int(e)) for s, e in offsets]


def char_span_to_tokens(offsets: Sequence[Any], char_start: int, char_end: int) -> tuple[int, int]:
    """First and last (inclusive) token index whose character span overlaps
    ``[char_start, char_end)``.

    Zero-width tokens (special tokens with offsets ``(0, 0)``) never overlap. Raises
    ``ValueError`` if the span is empty or no token overlaps it.
    """
    if char_end <= char_start:
        raise ValueError(f"empty character span [{char_start}, {char_end})")
    hits = [i for i, (s, e) in enumerate(_as_pairs(offsets)) if e > s and s < char_end and e > char_start]
    if not hits:
        raise ValueError(f"no token overlaps characters [{char_start}, {char_end})")
    return hits[0], hits[-1]


# --------------------------------------------------------------------------- prompt + target


@dataclass(frozen=True)
class PromptTarget:
    """Token ids of ``join(prompt, target)``.

    ``input_ids[:target_start]`` are the prompt's tokens (including a leading BOS if
    the tokenizer adds one) and ``input_ids[target_start:target_end]`` the target's
    (a separating space is part of the target's first token when the tokenizer
    merges it, as byte-level BPEs do). Trailing special tokens (an EOS that some
    tokenizers append) are dropped, so ``target_end == len(input_ids)``.
    """

    input_ids: tuple[int, ...]
    target_start: int
    target_end: int

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        return self.input_ids[: self.target_start]

    @property
    def target_ids(self) -> tuple[int, ...]:
        return self.input_ids[self.target_start : self.target_end]


def _split_by_offsets(
    offsets: list[tuple[int, int]], boundary: int
) -> tuple[int, int] | None:
    """(target_start, target_end) if every token lies wholly on one side of the
    character ``boundary`` (prompt tokens first, then target tokens), else None."""
    real = [i for i, (s, e) in enumerate(offsets) if e > s]
    if not real:
        return None
    prompt_idx: list[int] = []
    target_idx: list[int] = []
    for i in real:
        s, e = offsets[i]
        if e <= boundary:
            if target_idx:  # a prompt token after a target token: not a clean split
                return None
            prompt_idx.append(i)
        elif s >= boundary:
            target_idx.append(i)
        else:  # straddles the boundary (a merge across prompt and target)
            return None
    if not target_idx:
        return None
    t_start, t_end = target_idx[0], target_idx[-1] + 1
    last_prompt = prompt_idx[-1] if prompt_idx else -1
    # Zero-width (special) tokens: leading ones (BOS) belong to the prompt, those
    # inside the prompt too, trailing ones (EOS) are dropped; one between prompt and
    # target or inside the target is ambiguous: let the caller fall back.
    for i, (s, e) in enumerate(offsets):
        if e <= s and not (i < real[0] or i < last_prompt or i >= t_end):
            return None
    return t_start, t_end


def _strip_trailing_special(ids: list[int], offsets: list[tuple[int, int]]) -> list[int]:
    n = len(ids)
    while n > 0 and offsets[n - 1][1] <= offsets[n - 1][0]:
        n -= 1
    return ids[:n]


def encode_prompt_target(tokenizer: Any, prompt: str, target: str) -> PromptTarget:
    """Tokenise ``join(prompt, target)`` and locate the target's tokens.

    The full string is tokenised once with offsets; tokens ending at or before the
    end of the prompt are the prompt's, the rest the target's. If a token straddles
    the end of the prompt (the tokenizer merged across it, e.g. a prompt ending with a
    space), the prompt is tokenised alone (exactly as ``tokenizer(prompt)``, trailing
    special tokens dropped) and the separator+target without special tokens, and the
    two are concatenated.
    """
    if not target or not target.strip():
        raise ValueError(f"empty target for prompt {prompt!r}: nothing to score")
    text, _ = join(prompt, target)
    boundary = len(prompt)
    enc = _encode(tokenizer, text)
    ids = [int(t) for t in enc["input_ids"]]
    offsets = _as_pairs(enc["offset_mapping"])
    split = _split_by_offsets(offsets, boundary)
    if split is not None:
        t_start, t_end = split
        return PromptTarget(tuple(ids[:t_end]), t_start, t_end)

    # fallback: prompt and separator+target tokenised separately
    p_enc = _encode(tokenizer, prompt)
    p_ids = _strip_trailing_special(
        [int(t) for t in p_enc["input_ids"]], _as_pairs(p_enc["offset_mapping"])
    )
    t_ids = [int(t) for t in tokenizer(text[boundary:], add_special_tokens=False)["input_ids"]]
    if not t_ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return PromptTarget(tuple(p_ids + t_ids), len(p_ids), len(p_ids) + len(t_ids))


# --------------------------------------------------------------------------- subject positions


def _subject_text(template: str, subject: str, prefix: str) -> tuple[str, int, int]:
    n = template.count("{}")
    if n != 1:
        raise ValueError(f"template must contain exactly one '{{}}' (found {n}): {template!r}")
    if not subject:
        raise ValueError(f"empty subject for template {template!r}")
    start = len(prefix) + template.index("{}")
    return prefix + template.replace("{}", subject), start, start + len(subject)


def _pick(offsets: list[tuple[int, int]], s: int, e: int, position: str, text: str) -> int:
    if position == "last":
        real = [i for i, (a, b) in enumerate(offsets) if b > a]
        if not real:
            raise ValueError(f"text {text!r} has no tokens")
        return real[-1]
    first, last = char_span_to_tokens(offsets, s, e)
    if position == "subject_last":
        return last
    if position == "subject_first":
        return first
    if position == "subject_after_last":
        for i in range(last + 1, len(offsets)):
            if offsets[i][1] > offsets[i][0]:
                return i
        raise ValueError(f"no token after the subject in {text!r} (position 'subject_after_last')")
    raise ValueError(f"unknown token position {position!r}; expected one of {SUBJECT_POSITIONS}")


def subject_token_index(
    tokenizer: Any,
    template: str,
    subject: str,
    position: Position | str = "subject_last",
    prefix: str = "",
) -> tuple[str, int]:
    """``(text, index)``: ``text = prefix + template.replace("{}", subject)`` and the
    index, in ``tokenizer(text)["input_ids"]``, of the token at ``position``.

    ``position``: ``"subject_last"`` (last token overlapping the subject),
    ``"subject_first"`` (first one), ``"subject_after_last"`` (first token after the
    subject's last token; error if there is none), ``"last"`` (last token of the
    text). Found with the offsets of the whole text, never by re-tokenising a prefix.
    """
    return subject_token_indices(tokenizer, [template], [subject], position, [prefix])[0]


def subject_token_indices(
    tokenizer: Any,
    templates: Sequence[str],
    subjects: Sequence[str],
    position: Position | str = "subject_last",
    prefixes: Sequence[str] | None = None,
) -> list[tuple[str, int]]:
    """Batched :func:`subject_token_index` (one tokenizer call for all texts)."""
    if position not in SUBJECT_POSITIONS:
        raise ValueError(f"unknown token position {position!r}; expected one of {SUBJECT_POSITIONS}")
    if prefixes is None:
        prefixes = [""] * len(templates)
    if not (len(templates) == len(subjects) == len(prefixes)):
        raise ValueError(
            f"templates/subjects/prefixes lengths differ: {len(templates)}/{len(subjects)}/{len(prefixes)}"
        )
    if not templates:
        return []
    spans = [_subject_text(t, s, p) for t, s, p in zip(templates, subjects, prefixes)]
    texts = [sp[0] for sp in spans]
    enc = _encode(tokenizer, texts)
    out = []
    for (text, s, e), offs in zip(spans, enc["offset_mapping"]):
        out.append((text, _pick(_as_pairs(offs), s, e, position, text)))
    return out


# --------------------------------------------------------------------------- batching


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, side: Literal["right", "left"] = "right"
) -> tuple[torch.Tensor, ...]:
    """Pad token sequences into a ``(B, L)`` LongTensor.

    Returns ``(input_ids, attention_mask)`` for ``side="right"`` and
    ``(input_ids, attention_mask, position_ids)`` for ``side="left"``, where
    ``position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)`` so that rotary
    models see each sequence start at position 0.
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if len(seqs) == 0:
        raise ValueError("pad_batch needs at least one sequence")
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, seq in enumerate(seqs):
        n = len(seq)
        if n == 0:
            continue
        row = torch.as_tensor(list(seq), dtype=torch.long)
        if side == "right":
            ids[i, :n] = row
            mask[i, :n] = 1
        else:
            ids[i, length - n :] = row
            mask[i, length - n :] = 1
    if side == "right":
        return ids, mask
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, position_ids
