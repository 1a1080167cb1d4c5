"""Free-text generations of a model before and after an edit, and how to show them.

* :func:`generate` -- batched generation (left padding + attention mask), greedy by
  default, seeded sampling that leaves the global RNG untouched; returns only the
  continuation of each prompt.
* :func:`default_prompts` -- the prompts worth generating from for a list of cases.
* :func:`common_prefix`, :func:`render_markdown`, :func:`render_table` -- show a
  before/after pair with the shared prefix and the point where they diverge.
* :func:`write_generations` -- ``<stem>.jsonl`` + ``<stem>.md``, written atomically.

A row is a dict ``{"case_id", "kind", "prompt", "before", "after"}`` (extra keys are
kept in the JSONL file and ignored by the renderers).

Position ids: the batch is left-padded; greedy decoding (:func:`kedit.evaluation.decode.greedy_decode`)
and sampling (``model.generate``) alike give the model ``position_ids`` from the attention
mask (``cumsum - 1``, the same as :func:`kedit.models.tokens.pad_batch`) and extend them at
each step.  ``tests/test_generation.py`` checks that a padded batch gives the same greedy
text as one prompt at a time for every tiny model family (absolute and rotary positions
alike); ``tests/test_decode.py`` that greedy decoding gives the ids ``model.generate`` gives.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from kedit.evaluation.decode import greedy_decode
from kedit.util.atomic import write_text
from kedit.models.tokens import pad_batch

__all__ = [
    "KINDS",
    "common_prefix",
    "cut_at",
    "default_prompts",
    "generate",
    "render_markdown",
    "render_table",
    "stop_token_ids",
    "write_generations",
]

#: The ``kind`` of each prompt that :func:`default_prompts` yields, in its order.
KINDS = ("prompt", "rephrase", "locality", "generation", "subject")

#: Subject-only prompts ("{}" is the subject) added by :func:`default_prompts`.
SUBJECT_TEMPLATES = ("{}, the", "{} is")


# --------------------------------------------------------------------------- generate


def _pad_id(tokenizer: Any, model: Any) -> int:
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None),
                  getattr(getattr(model, "generation_config", None), "pad_token_id", None),
                  getattr(getattr(model, "config", None), "pad_token_id", None)):
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def _start_id(tokenizer: Any, pad_id: int) -> int:
    """A token to stand for an empty prompt (one that encodes to no ids)."""
    for value in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if value is not None:
            return int(value)
    return pad_id


def _model_device(loaded: Any) -> torch.device:
    device = getattr(loaded, "device", None)
    if device is not None:
        return torch.device(device)
    try:
        return next(loaded.model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the RNGs that sampling on ``device`` draws from, restoring them after.

    Only the CPU generator and, for a CUDA model, that one device's generator are
    forked and seeded (``torch.manual_seed`` would also reseed every CUDA device).
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index], device_type="cuda"):
            torch.default_generator.manual_seed(seed)
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
            yield
    else:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield


def _continuation(tokenizer: Any, prompt_ids: list[int], new_ids: list[int]) -> str:
    """Text of ``new_ids`` as it reads after the prompt.

    Decoding the new ids alone can lose a leading space (SentencePiece drops it from a
    sequence's first token), so the prompt+continuation is decoded and the decoded
    prompt cut off; if that does not line up, the new ids are decoded alone.
    """
    if not new_ids:
        return ""
    if prompt_ids:
        head = tokenizer.decode(prompt_ids, skip_special_tokens=True)
        full = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
        if full.startswith(head):
            return full[len(head):]
    return tokenizer.decode(new_ids, skip_special_tokens=True)


def generate(
    loaded: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 24,
    *,
    sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    stop: Sequence[str] = (),
    special_tokens: bool = True,
    stop_ids: torch.Tensor | None = None,
) -> list[str]:
    """Continue each prompt with ``loaded.model``; return the continuations, in order.

    Prompts are tokenised as ``tokenizer(prompt)`` (special tokens as the tokenizer
    adds them), left-padded with :func:`kedit.models.tokens.pad_batch` (the tokenizer itself
    never pads, so its ``padding_side`` and pad token are left as they are) and run
    ``batch_size`` at a time under ``torch.inference_mode`` with the attention mask
    and an explicit ``pad_token_id``.  Greedy decoding runs kedit's own cached loop
    (:func:`kedit.evaluation.decode.greedy_decode`: the same ids as ``model.generate``, rows
    that ended leave the batch); sampling runs ``model.generate``.  Generation stops at
    the model's EOS or after ``max_new_tokens``; the text returned is what follows the
    prompt, decoded with ``skip_special_tokens=True`` (so it usually starts with a space).

    Greedy unless ``sample``; sampling uses ``temperature`` and ``top_k`` (``None``:
    no top-k cut) with ``top_p = 1``, seeded with ``seed`` inside a forked RNG, so
    the same call gives the same text and the global RNG state is untouched.
    Generation settings stored with the model (``model.generation_config``: top-p,
    repetition penalty, ...) are overridden by neutral values so that before/after
    generations differ only by the weights.  The model is put in eval mode for the
    call (its previous mode is restored).

    ``stop``: strings that end a continuation (the WILD protocol's ``"."`` and ``"\\n"``):
    a row stops generating after the first token whose text holds one of them (the
    other rows of its batch go on) and its text is cut before the first occurrence.
    ``stop_ids`` may pass :func:`stop_token_ids` computed once for the tokenizer.
    ``special_tokens=False`` tokenises without the tokenizer's added special tokens
    (a prompt already rendered through a chat template carries its own).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 or None, got {top_k}")
    prompts = list(prompts)
    if not prompts:
        return []
    model, tokenizer = loaded.model, loaded.tokenizer
    device = _model_device(loaded)
    pad_id = _pad_id(tokenizer, model)
    start_id = _start_id(tokenizer, pad_id)

    options: dict[str, Any] = dict(
        max_new_tokens=int(max_new_tokens), min_new_tokens=0, num_beams=1, num_return_sequences=1,
        pad_token_id=pad_id, repetition_penalty=1.0, no_repeat_ngram_size=0, top_p=1.0,
    )
    if sample:
        options.update(do_sample=True, temperature=float(temperature), top_k=int(top_k or 0))
    else:
        options.update(do_sample=False, temperature=1.0, top_k=None)

    encoded = [[int(t) for t in ids] for ids in tokenizer(prompts, add_special_tokens=special_tokens)["input_ids"]]
    stop = tuple(s for s in stop if s)
    if stop:
        if stop_ids is None:
            stop_ids = stop_token_ids(tokenizer, stop)
        if sample:
            options["stopping_criteria"] = _stopping(stop_ids.to(device))
    outputs: list[str] = []
    was_training = model.training
    model.eval()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            if sample:
                stack.enter_context(_seeded(int(seed), device))
            for lo in range(0, len(prompts), batch_size):
                seqs = [ids if ids else [start_id] for ids in encoded[lo: lo + batch_size]]
                input_ids, attention_mask, _ = pad_batch(seqs, pad_id, side="left")
                input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
                if sample:
                    new_ids = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                             **options)[:, input_ids.shape[1]:]
                else:
                    new_ids = greedy_decode(model, input_ids, attention_mask, int(max_new_tokens),
                                            stop_ids=stop_ids if stop else (), pad_id=pad_id)
                for i, ids in enumerate(encoded[lo: lo + batch_size]):
                    new = [int(t) for t in new_ids[i].tolist()]
                    outputs.append(cut_at(_continuation(tokenizer, ids, new), stop))
    finally:
        model.train(was_training)
    return outputs


def cut_at(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the first occurrence of any string in ``stop``."""
    end = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if 0 <= i < end:
                end = i
    return text[:end]


def stop_token_ids(tokenizer: Any, stop: Sequence[str]) -> torch.Tensor:
    """Ids of every vocabulary token whose decoded text contains one of ``stop`` (a
    single token is decoded alone: a stop string split over two tokens is not seen
    by this set, only by :func:`cut_at` afterwards)."""
    n = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False)
    return torch.tensor([i for i, t in enumerate(texts) if any(s in t for s in stop)], dtype=torch.long)


def _stopping(ids: torch.Tensor):
    """A stopping criterion, per row: done once the last token is one of ``ids``."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _StopTokens(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
            return torch.isin(input_ids[:, -1], ids)

    return StoppingCriteriaList([_StopTokens()])


# --------------------------------------------------------------------------- prompts


def default_prompts(cases: Iterable[Any]) -> list[dict]:
    """``[{"case_id", "kind", "prompt"}, ...]`` to generate from, case by case.

    For each case, in this order: its prompt (kind ``"prompt"``), its rephrase prompts
    (``"rephrase"``), the prompts of each locality set (``"locality"``), its
    generation prompts if any (``"generation"``), and ``"<subject>, the"`` /
    ``"<subject> is"`` (``"subject"``).  A prompt repeated within a case is kept once,
    under its first kind; the same prompt in two cases is kept for each.
    """
    out: list[dict] = []
    for case in cases:
        seen: set[str] = set()

        def add(kind: str, prompt: str) -> None:
            if prompt and prompt.strip() and prompt not in seen:
                seen.add(prompt)
                out.append({"case_id": case.case_id, "kind": kind, "prompt": prompt})

        add("prompt", case.prompt)
        for p in case.rephrase_prompts:
            add("rephrase", p)
        for prompt_set in case.locality:
            for p in prompt_set.prompts:
                add("locality", p)
        for p in getattr(case, "generation_prompts", ()) or ():
            add("generation", p)
        for template in SUBJECT_TEMPLATES:
            add("subject", template.replace("{}", case.subject))
    return out


# --------------------------------------------------------------------------- diffs


def common_prefix(a: str, b: str, *, word_boundary: bool = True) -> int:
    """Length of the prefix shared by ``a`` and ``b`` (the index where they diverge).

    With ``word_boundary`` (default) a divergence inside a word moves back to the
    start of that word, so ``"the city of Paris"`` / ``"the city of Parma"`` give 12
    (``"the city of "``), not 15.  ``a[:k] == b[:k]`` always holds; equal strings
    give ``len(a)``.
    """
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    if not word_boundary or (k == len(a) and k == len(b)):
        return k

    def splits_word(i: int) -> bool:
        return (i < len(a) and a[i].isalnum()) or (i < len(b) and b[i].isalnum())

    while k > 0 and a[k - 1].isalnum() and splits_word(k):
        k -= 1
    return k


# --------------------------------------------------------------------------- markdown

_MD_SPECIAL = set("\\`*_[]<>|~#")


def _md_escape(text: str) -> str:
    """Text safe inside a markdown table cell (inline markup escaped, one line)."""
    out = []
    for ch in text:
        if ch in _MD_SPECIAL:
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("<br>")
        elif ch == "\r":
            continue
        elif ch == "\t":
            out.append(" ")
        else:
            out.append(ch)
    return "".join(out)


def _md_bold(text: str) -> str:
    """``**text**`` with surrounding whitespace kept outside the markers (CommonMark
    does not open/close emphasis next to whitespace)."""
    core = text.strip()
    if not core:
        return _md_escape(text)
    lead = text[: len(text) - len(text.lstrip())]
    trail = text[len(text.rstrip()):]
    return f"{_md_escape(lead)}**{_md_escape(core)}**{_md_escape(trail)}"


def _md_marked(text: str, k: int) -> str:
    if text == "":
        return "*(empty)*"
    return _md_escape(text[:k]) + (_md_bold(text[k:]) if k < len(text) else "")


def _group(rows: Sequence[dict]) -> list[tuple[str, list[dict]]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(str(row.get("case_id", "")), []).append(row)
    return list(groups.items())


def render_markdown(rows: Sequence[dict], title: str = "Generations before and after the edit") -> str:
    """A markdown document: one section per case, one small table per prompt.

    Each table shows the prompt (with its kind), the ``before`` and the ``after``
    continuation.  The text the two share is plain and what follows the point where
    they diverge (see :func:`common_prefix`) is **bold** in both; when they are
    equal the after row reads ``(unchanged)``.
    """
    rows = list(rows)
    changed = sum(1 for r in rows if r.get("before", "") != r.get("after", ""))
    lines = [f"# {_md_escape(title)}", "",
             f"{len(rows)} prompts, {changed} changed. Text after the point where before and after "
             "diverge is **bold**.", ""]
    for case_id, group in _group(rows):
        n_changed = sum(1 for r in group if r.get("before", "") != r.get("after", ""))
        lines += [f"## Case {_md_escape(case_id)}", "", f"{n_changed} of {len(group)} changed.", ""]
        for row in group:
            before, after = str(row.get("before", "")), str(row.get("after", ""))
            kind = _md_escape(str(row.get("kind", "")))
            lines.append(f"| prompt ({kind}) | {_md_escape(str(row.get('prompt', '')))} |")
            lines.append("|---|---|")
            if before == after:
                lines.append(f"| before | {_md_marked(before, len(before))} |")
                lines.append("| after | *(unchanged)* |")
            else:
                k = common_prefix(before, after)
                lines.append(f"| before | {_md_marked(before, k)} |")
                lines.append(f"| after | {_md_marked(after, k)} |")
            lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


# --------------------------------------------------------------------------- rich


def _rich_marked(text: str, k: int, changed_style: str):
    from rich.text import Text

    out = Text()
    if text == "":
        out.append("(empty)", style="dim italic")
        return out
    out.append(text[:k], style="dim")
    if k < len(text):
        out.append(text[k:], style=changed_style)
    return out


def render_table(rows: Sequence[dict], console: Any = None, title: str | None = "Generations"):
    """Print the rows as a rich table, prompt | before | after side by side.

    The shared prefix is dim, the rest of ``before`` bold red and of ``after`` bold
    green; an unchanged row shows ``(unchanged)`` in the after column.  Texts are
    added as plain :class:`rich.text.Text` (never parsed as markup).  Returns the
    table (printed on ``console``, a new :class:`rich.console.Console` if None).
    """
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, show_lines=False, expand=True)
    table.add_column("case", style="cyan", no_wrap=True)
    table.add_column("kind", style="magenta", no_wrap=True)
    table.add_column("prompt", ratio=2)
    table.add_column("before", ratio=3)
    table.add_column("after", ratio=3)
    for g, (case_id, group) in enumerate(_group(rows)):
        if g:
            table.add_section()
        for i, row in enumerate(group):
            before, after = str(row.get("before", "")), str(row.get("after", ""))
            if before == after:
                before_cell = _rich_marked(before, len(before), "")
                after_cell = Text("(unchanged)", style="dim italic")
            else:
                k = common_prefix(before, after)
                before_cell = _rich_marked(before, k, "bold red")
                after_cell = _rich_marked(after, k, "bold green")
            table.add_row(Text(case_id if i == 0 else ""), Text(str(row.get("kind", ""))),
                          Text(str(row.get("prompt", ""))), before_cell, after_cell)
    (console if console is not None else Console()).print(table)
    return table


# --------------------------------------------------------------------------- files


def write_generations(rows: Sequence[dict], run_dir: str | os.PathLike,
                      stem: str = "generations") -> tuple[Path, Path]:
    """Write ``<run_dir>/<stem>.jsonl`` (one row a line) and ``<stem>.md``
    (:func:`render_markdown`), each atomically (temp file in the same directory, then
    ``os.replace``).  Returns the two paths."""
    rows = list(rows)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    jsonl = run_dir / f"{stem}.jsonl"
    md = run_dir / f"{stem}.md"
    write_text(jsonl, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_text(md, render_markdown(rows))
    return jsonl, md
