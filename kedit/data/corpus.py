"""Text corpora for the key statistics: the shipped WikiText-2, or a user's .txt / .jsonl file.

A corpus is a list of texts plus an id that names exactly those texts (the id ends in a
hash of the texts used, so asking for fewer or more of them gives a different id).
The statistics cache keys its files on that id.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path

from kedit.util.paths import package_data

__all__ = ["CorpusError", "WIKITEXT_FILES", "corpus_hash", "load_corpus", "wikitext_paragraphs"]

#: Shipped WikiText-2 splits, read in this order.
WIKITEXT_FILES = ("wikitext-2-valid.tokens", "wikitext-2-test.tokens")

_HEADING = re.compile(r"^(= )+.*( =)+$")
_ARTEFACTS = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))


class CorpusError(ValueError):
    """A corpus file that cannot be read (one-line message naming the file)."""


def _detokenize(line: str) -> str:
    for old, new in _ARTEFACTS:
        line = line.replace(old, new)
    return line


@functools.lru_cache(maxsize=1)
def _all_wikitext() -> tuple[str, ...]:
    out: list[str] = []
    for name in WIKITEXT_FILES:
        path = package_data() / name
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise CorpusError(f"shipped corpus {path}: cannot read ({e.strerror or e})") from None
        for line in text.splitlines():
            line = line.strip()
            if not line or _HEADING.match(line):
                continue
            out.append(_detokenize(line))
    return tuple(out)


def wikitext_paragraphs(n: int | None = None) -> list[str]:
    """The first ``n`` (all if None) paragraphs of the shipped WikiText-2, valid then test split.

    One paragraph is one non-empty line; headings (`` = Title = ``, `` = = Section = = ``)
    are skipped; the tokenisation artefacts `` @-@ ``, `` @,@ ``, `` @.@ `` are undone
    (the space WikiText puts before punctuation is kept).
    """
    paras = _all_wikitext()
    return list(paras if n is None else paras[:n])


def corpus_hash(texts: list[str]) -> str:
    """12 hex digits of a sha256 over exactly these texts, in order (length-prefixed)."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:12]


def _read_txt(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").strip().splitlines()
    if any(not ln.strip() for ln in lines):
        blocks, cur = [], []
        for ln in lines:
            if ln.strip():
                cur.append(ln.strip())
            elif cur:
                blocks.append("\n".join(cur))
                cur = []
        if cur:
            blocks.append("\n".join(cur))
        return blocks
    return [ln.strip() for ln in lines if ln.strip()]


def _read_jsonl(path: Path) -> list[str]:
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise CorpusError(f"corpus file {path} line {i}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise CorpusError(f"corpus file {path} line {i}: expected an object with a string 'text' field")
            if rec["text"].strip():
                out.append(rec["text"])
    return out


def load_corpus(path: str | None = None, n: int | None = None) -> tuple[list[str], str]:
    """``(texts, corpus_id)`` for ``--corpus``; the first ``n`` texts (all if None).

    * ``None``: the shipped WikiText-2, id ``wikitext-2:<hash>``;
    * ``*.txt``: paragraphs separated by blank lines (one text per line if the file has
      no blank line), id ``<file stem>:<hash>``;
    * ``*.jsonl``: the ``"text"`` field of each line, id ``<file stem>:<hash>``.

    ``<hash>`` is :func:`corpus_hash` of exactly the texts returned.
    """
    if n is not None and n <= 0:
        raise CorpusError(f"corpus: the number of samples must be positive (got {n})")
    if path is None:
        texts = wikitext_paragraphs(n)
        return texts, f"wikitext-2:{corpus_hash(texts)}"
    p = Path(path).expanduser()
    if not p.is_file():
        raise CorpusError(f"corpus file {p}: {'a directory, not a file' if p.is_dir() else 'no such file'}")
    suffix = p.suffix.lower()
    try:
        if suffix == ".txt":
            texts = _read_txt(p)
        elif suffix == ".jsonl":
            texts = _read_jsonl(p)
        else:
            raise CorpusError(f"corpus file {p}: unknown format '{p.suffix}' (use a .txt or .jsonl file)")
    except UnicodeDecodeError as e:
        raise CorpusError(f"corpus file {p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise CorpusError(f"corpus file {p}: cannot read ({e.strerror or e})") from None
    if not texts:
        raise CorpusError(f"corpus file {p}: contains no text")
    if n is not None:
        texts = texts[:n]
    return texts, f"{p.stem}:{corpus_hash(texts)}"
