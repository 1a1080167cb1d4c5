"""IKE: in-context knowledge editing (Zheng et al., EMNLP 2023, "Can We Edit Factual
Knowledge by In-Context Learning?").  No weight changes: the edit is a text put before
every input of the model (a :class:`~kedit.methods.edit.ContextEdit`).

Definition
----------
A new fact f = (s, r, o*) is written as a sentence, ``f = join(prompt, target_new)``
("BBC One, by Sega").  IKE conditions the frozen model on a context C and reads the
answer of an input x from P_M(· | [C; x]):

    C = d_1 d_2 … d_k  "New Fact: f\\nPrompt:"

Each demonstration d_i comes from a pool case (f_i, paraphrases P_i, neighbours N_i) and
has one of three kinds (``New Fact: f_i\\nPrompt: x_i y_i\\n\\n``):

* **copy**:    x_i = f_i's own prompt,         y_i = f_i's new target  (the fact is used);
* **update**:  x_i ∈ P_i (a paraphrase),        y_i = f_i's new target  (it generalises);
* **retain**:  (x_i, y_i) ∈ N_i (a neighbour),  y_i = that prompt's own true answer
  (unrelated facts keep their answers).

The kinds come in the paper's proportions copy : update : retain = 1 : 3 : 4
(``proportions``; the authors' code: 4, 12 and 16 of k = 32), counts by largest remainder
for other k, the kinds shuffled over the retrieved demonstrations (seeded: the run's seed
and the edited cases' ids).  The demonstrations are the k pool cases nearest to f (a
k-nearest-neighbour search on the fact sentence, ``retrieval``), ordered with the
nearest *last*, next to the query (``order: nearest_last``: the authors' code reverses
the ranking; ``nearest_first`` is EasyEdit's order).  The paraphrase / neighbour of an update / retain demonstration is drawn
from the case's (seeded, as the authors' ``random.choice``); a pool case without one
becomes a copy demonstration.

Retrieval (``retrieval``; similarity of the query fact f to each pool case's fact f_i):

* ``tfidf`` (the offline default, shipped with kedit): cosine of TF-IDF vectors of the
  two fact sentences.  Terms: ``\\w+`` of the case-folded text; weight of term t in a text
  (1 + ln tf) · ln(N / df_t) (N pool cases, df_t of them containing t; a term in every
  case weighs 0, a query term absent from the pool is ignored); vectors L2-normalised.
  Ties keep pool order.
* ``encoder``: cosine of sentence embeddings (``encoder: PATH``, a local
  sentence-transformers directory, e.g. all-MiniLM-L6-v2 as in the paper and EasyEdit).
  ``sentence_transformers`` is imported only then (``pip install sentence-transformers``;
  it is not a kedit dependency).  Pool embeddings are cached under
  ``$KEDIT_HOME/ike/``.
* ``random``: k pool cases drawn uniformly (seeded) -- the control.
* ``auto`` (default): ``encoder`` when ``encoder`` is set, else ``tfidf``.

Never retrieved: a pool case about the edited subject (case-folded subject equal to an
edited or committed subject) or with the edited prompt -- this excludes the edited case
itself and CounterFact's other cases of the same subject (some carry the same prompt with
another counterfactual target).  The shipped pool (``kedit/data/ike/``) is CounterFact's
train split without any case of an evaluation file kedit ships.

The pool (``pool``): by default ``kedit/data/ike/counterfact-train-pool.jsonl``; any file
:func:`~kedit.data.cases.load_cases` reads works (rephrase prompts = paraphrases, every
locality prompt with its answer = neighbours).  CounterFact paraphrases begin with a
random sentence ("A Marañón Week is annually held since 1990. Howard Glacier is in");
as the authors' ``clean_paraphrase.py`` does, the text before the subject is cut after
its last sentence end (". ").

Tokenisation boundary: kedit tokenises each input alone and the context is put before
its ids, so the context must end where a tokenizer splits anyway.  With ``separator:
space`` (IKE's text, default) the context ends with "Prompt:" and the input follows: a
byte-level BPE (GPT-2, SmolLM2, LLaMA-3) starts a text's first word without a space, so
the model reads "Prompt:BBC One, by" -- the same ids as that one string (":" never
merges with a letter); a SentencePiece tokenizer (LLaMA-2) prefixes a space, so it reads
"Prompt: BBC One, by", IKE's text exactly.  With ``separator: newline`` every "Prompt:" is
followed by a line break (demonstrations too) and the input starts a line, tokenised as
the first word of a line always is.  ``separator: none`` writes the demonstrations as a
byte-level BPE shows the query ("Prompt:BBC One, by Sega").  ``meta["boundary"]`` records, per compute, whether
context + input ids equal the ids of the one string (``exact``), of the string with one
space between (``space``), or neither (``mismatch``, with a warning).  A tokenizer that
adds a BOS gives the context its BOS; the input's own BOS then follows the context
(kedit's context mechanism prepends the ids to the input as tokenised).

Several facts (a batch, or a sequential run): the final block lists every fact, the
earlier ones first, one "New Fact:" line each, then "Prompt:"::

    d_1 … d_k  "New Fact: f_1\\nNew Fact: f_2\\n…New Fact: f_n\\nPrompt:"

In a sequential run the committed facts are the method's state (``commit`` keeps the
applied edit's fact list; ``state`` / ``load_state`` save it as UTF-8 JSON in a uint8
tensor), and each new edit's context holds all of them (the edit is cumulative: the
last context is the whole edit).  The k demonstrations are retrieved for the facts of
the current ``compute`` call only (a batch of B facts: their rankings interleaved,
round-robin, k in all), because the context is one text shared by every input and
cannot know which fact an input asks about.

Context length: the context is cut to ``max_context_tokens`` (default: the model's
position limit P minus max(P/2, 512) -- half the window or 512 tokens left for the
input) by dropping the farthest demonstrations first; if the facts alone do not fit,
``compute`` raises.  The context is about 800 tokens at k = 32 on CounterFact, 400 at
k = 16, plus about 12 a fact; a batch of inputs runs it once into a key/value cache shared
by its rows (:class:`kedit.methods.edit.ContextEdit`), so a context adds C positions per
forward call, not per input.

Deviations from EasyEdit (``easyeditor/models/ike``) -- kedit follows the paper here:

* EasyEdit embeds 3 sentences per pool case (copy, update, retain) and takes the k
  nearest *sentences*, so the mix of kinds is whatever is nearest; kedit takes the k
  nearest *cases* and fixes the mix to the paper's 1:3:4.
* EasyEdit's k is 16, the paper's 32 (``k``; the SmolLM2 default was chosen by
  experiment, see ``configs/methods/ike/smollm2-135m.yaml``).
* EasyEdit puts the nearest demonstration first; the paper's code, and kedit by default,
  last (``order``).
* EasyEdit evaluates locality against a reference that already holds the "New Fact"
  line (its pre-edit locality input is the new fact and the prompt, without
  demonstrations); kedit's reference is the model without any context, as for every
  other method, which is stricter.
* EasyEdit's IKE is single-edit only; kedit's sequential mode is described above.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from kedit.config import ConfigError
from kedit.data.cases import EditCase, load_cases
from kedit.methods.base import ContextEdit, EditRequest, Method
from kedit.methods.registry import register
from kedit.models.tokens import join
from kedit.util.paths import kedit_home, package_data

COPY, UPDATE, RETAIN = "copy", "update", "retain"
KINDS = (COPY, UPDATE, RETAIN)
FACT_LABEL = "New Fact: "
PROMPT_LABEL = "Prompt:"
#: what follows "Prompt:" in a demonstration, and what ends the context, per separator
SEPARATORS = {"space": (" ", ""), "newline": ("\n", "\n"), "none": ("", "")}


def default_pool() -> Path:
    return package_data() / "ike" / "counterfact-train-pool.jsonl"


@dataclass(frozen=True)
class IkeParams:
    k: int = 16                                   # demonstrations per context
    retrieval: Literal["auto", "tfidf", "encoder", "random"] = "auto"
    encoder: str | None = None                    # a local sentence-transformers directory
    pool: str | None = None                       # a cases file; null: the shipped CounterFact train pool
    proportions: tuple[int, int, int] = (1, 3, 4)  # copy : update : retain
    separator: Literal["space", "newline", "none"] = "space"
    order: Literal["nearest_last", "nearest_first"] = "nearest_last"   # the paper's code / EasyEdit's
    max_context_tokens: int | None = None         # null: the model's positions minus max(half, 512)

    def check(self) -> str | None:
        if self.k < 0:
            return "key 'k': must be >= 0"
        if len(self.proportions) != 3 or any(p < 0 for p in self.proportions) or sum(self.proportions) == 0:
            return "key 'proportions': three counts >= 0 (copy, update, retain), not all 0"
        if self.retrieval == "encoder" and not self.encoder:
            return "key 'retrieval': 'encoder' needs key 'encoder' (a sentence-transformers directory)"
        if self.encoder and self.retrieval in ("tfidf", "random"):
            return f"key 'encoder' is set but key 'retrieval' is '{self.retrieval}' (use 'auto' or 'encoder')"
        if self.max_context_tokens is not None and self.max_context_tokens < 1:
            return "key 'max_context_tokens': must be >= 1 (or null)"
        if self.pool and not Path(self.pool).expanduser().is_file():
            return f"key 'pool': {self.pool}: no such file"
        if self.encoder and not Path(self.encoder).expanduser().is_dir():
            return f"key 'encoder': {self.encoder}: not a local directory (kedit never downloads one)"
        return None

    @property
    def retriever(self) -> str:
        if self.retrieval == "auto":
            return "encoder" if self.encoder else "tfidf"
        return self.retrieval


# ------------------------------------------------------------------------ the pool


@dataclass(frozen=True)
class PoolCase:
    """One demonstration source: a fact, its paraphrases and its neighbours (prompt, answer)."""

    case_id: str
    subject: str
    prompt: str
    target_new: str
    paraphrases: tuple[str, ...] = ()
    neighbours: tuple[tuple[str, str], ...] = ()

    @property
    def fact(self) -> str:
        return join(self.prompt, self.target_new)[0]


def clean_paraphrase(text: str, subject: str) -> str:
    """CounterFact paraphrases start with a random sentence: cut the text before the
    subject after its last ". " (the idea of the authors' ``clean_paraphrase.py``)."""
    at = text.find(subject)
    if at <= 0:
        return text.strip()
    prefix = text[:at]
    cut = max(prefix.rfind(". "), prefix.rfind("\n"))
    return text[cut + 1:].strip() if cut >= 0 else text.strip()


def pool_case(case: EditCase) -> PoolCase:
    neighbours = tuple((p, a) for ps in case.locality for p, a in ps.pairs())
    paraphrases = tuple(clean_paraphrase(p, case.subject) for p in case.rephrase_prompts)
    return PoolCase(case.case_id, case.subject, case.prompt, case.target_new,
                    tuple(p for p in paraphrases if p), neighbours)


def load_pool(path: str | Path) -> list[PoolCase]:
    return [pool_case(c) for c in load_cases(path)]


def demonstration(case: PoolCase, kind: str, rng: random.Random, separator: str = "space") -> str:
    """``New Fact: f\\nPrompt: x y\\n\\n`` for one pool case and kind (see the module docstring)."""
    if kind == UPDATE:
        line = join(rng.choice(case.paraphrases), case.target_new)[0]
    elif kind == RETAIN:
        p, a = rng.choice(case.neighbours)
        line = join(p, a)[0]
    else:
        line = join(case.prompt, case.target_new)[0]
    return f"{FACT_LABEL}{case.fact}\n{PROMPT_LABEL}{SEPARATORS[separator][0]}{line}\n\n"


def final_block(facts: Sequence[str], separator: str = "space") -> str:
    """``New Fact: f_1\\n…New Fact: f_n\\nPrompt:`` (then the input)."""
    return "".join(f"{FACT_LABEL}{f}\n" for f in facts) + PROMPT_LABEL + SEPARATORS[separator][1]


def kind_counts(k: int, proportions: Sequence[int]) -> list[int]:
    """k split in ``proportions`` by largest remainder (ties: copy, then update, then retain)."""
    total = sum(proportions)
    exact = [k * p / total for p in proportions]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: k - sum(counts)]:
        counts[i] += 1
    return counts


def assign_kinds(cases: Sequence[PoolCase], proportions: Sequence[int], rng: random.Random) -> list[str]:
    """A kind for each demonstration (in proportion, shuffled); copy where the case lacks
    the paraphrase or neighbour its kind needs."""
    kinds = [kind for kind, n in zip(KINDS, kind_counts(len(cases), proportions)) for _ in range(n)]
    rng.shuffle(kinds)
    out = []
    for case, kind in zip(cases, kinds):
        if (kind == UPDATE and not case.paraphrases) or (kind == RETAIN and not case.neighbours):
            kind = COPY
        out.append(kind)
    return out


# ------------------------------------------------------------------------ retrieval

_WORD = re.compile(r"\w+")


def terms(text: str) -> Counter:
    return Counter(_WORD.findall(text.casefold()))


class TfidfIndex:
    """TF-IDF cosine over the pool's fact sentences (see the module docstring)."""

    def __init__(self, texts: Sequence[str]):
        self.n = len(texts)
        counts = [terms(t) for t in texts]
        df = Counter(t for c in counts for t in c)
        self.idf = {t: math.log(self.n / d) for t, d in df.items()}
        postings: dict[str, tuple[list[int], list[float]]] = {}
        for i, c in enumerate(counts):
            w = {t: (1.0 + math.log(n)) * self.idf[t] for t, n in c.items()}
            norm = math.sqrt(sum(v * v for v in w.values()))
            if norm == 0:
                continue
            for t, v in w.items():
                if v:
                    docs, vals = postings.setdefault(t, ([], []))
                    docs.append(i)
                    vals.append(v / norm)
        self.postings = {t: (np.asarray(d, dtype=np.int64), np.asarray(v, dtype=np.float64))
                         for t, (d, v) in postings.items()}

    def query_vector(self, text: str) -> dict[str, float]:
        w = {t: (1.0 + math.log(n)) * self.idf[t] for t, n in terms(text).items() if self.idf.get(t)}
        norm = math.sqrt(sum(v * v for v in w.values()))
        return {t: v / norm for t, v in w.items()} if norm else {}

    def scores(self, text: str) -> np.ndarray:
        out = np.zeros(self.n, dtype=np.float64)
        for t, v in self.query_vector(text).items():
            docs, vals = self.postings[t]
            out[docs] += v * vals
        return out


NO_SENTENCE_TRANSFORMERS = ("ike: retrieval 'encoder' needs the sentence-transformers package "
                            "(pip install sentence-transformers; kedit does not depend on it), or use retrieval: tfidf")


class EncoderIndex:
    """Cosine of sentence-transformers embeddings (the paper's and EasyEdit's retriever)."""

    def __init__(self, path: str, texts: Sequence[str], device: torch.device, log=None):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise ConfigError(NO_SENTENCE_TRANSFORMERS) from None
        if not Path(path).expanduser().exists():
            raise ConfigError(f"ike: encoder '{path}' is not a local directory (kedit never downloads one)")
        self.model = SentenceTransformer(str(Path(path).expanduser()), device=str(device))
        self.pool = self._cached(path, texts, log)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        emb = self.model.encode(list(texts), convert_to_numpy=True, show_progress_bar=False)
        emb = torch.as_tensor(np.asarray(emb), dtype=torch.float32)
        return torch.nn.functional.normalize(emb, dim=-1)

    def _cached(self, path: str, texts: Sequence[str], log) -> torch.Tensor:
        from safetensors.torch import load_file, save_file

        from kedit.util.atomic import atomic_path

        key = hashlib.sha256(json.dumps([str(Path(path).expanduser().resolve()), list(texts)]).encode()).hexdigest()
        file = kedit_home() / "ike" / f"pool-{key[:24]}.safetensors"
        if file.exists():
            return load_file(str(file))["embeddings"]
        if log is not None:
            log(f"ike: encoding {len(texts)} pool facts with {path} (cached in {file.parent})")
        emb = self.encode(texts)
        with atomic_path(file) as tmp:
            save_file({"embeddings": emb.contiguous()}, str(tmp))
        return emb

    def scores(self, text: str) -> np.ndarray:
        return (self.pool @ self.encode([text])[0]).double().numpy()


# ------------------------------------------------------------------------ the method


def _same(a: str, b: str) -> bool:
    return a.strip().casefold() == b.strip().casefold()


def _pack(facts: list[dict]) -> torch.Tensor:
    return torch.tensor(list(json.dumps(facts, ensure_ascii=False).encode("utf-8")), dtype=torch.uint8)


def _unpack(t: torch.Tensor) -> list[dict]:
    return json.loads(bytes(t.to(torch.uint8).tolist()).decode("utf-8"))


@register
class IKE(Method):
    """In-context knowledge editing: retrieved demonstrations and the new facts before every input."""

    name = "ike"
    kind = "context"
    description = "In-context editing: k retrieved demonstrations and the new fact before every input (Zheng et al. 2023)"
    Params = IkeParams
    batch_native = False
    STATE_KEY: ClassVar[str] = "facts_json"

    def __init__(self, loaded, params, ctx=None):
        super().__init__(loaded, params, ctx)
        self.pool: list[PoolCase] | None = None
        self.index: Any = None
        self.facts: list[dict] = []      # committed facts (sequential runs)

    # --- preparation ----------------------------------------------------------------
    def check(self) -> None:
        """Encoder retrieval needs sentence-transformers, which kedit does not depend on."""
        if self.params.retriever == "encoder":
            try:
                import sentence_transformers  # noqa: F401  (prepare() uses it)
            except ImportError:
                raise ConfigError(NO_SENTENCE_TRANSFORMERS) from None

    def prepare(self) -> None:
        if self.pool is not None:
            return
        t0 = time.perf_counter()
        path = Path(self.params.pool).expanduser() if self.params.pool else default_pool()
        self.pool = load_pool(path)
        texts = [c.fact for c in self.pool]
        kind = self.params.retriever
        if kind == "tfidf":
            self.index = TfidfIndex(texts)
        elif kind == "encoder":
            self.index = EncoderIndex(self.params.encoder, texts, self.loaded.device, self.ctx.log)
        self.ctx.add_time("ike_index", time.perf_counter() - t0)

    def context_limit(self) -> int | None:
        if self.params.max_context_tokens is not None:
            return self.params.max_context_tokens
        cfg = self.loaded.model.config
        positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        return max(positions // 2, positions - 512) if positions else None

    # --- retrieval --------------------------------------------------------------------
    def allowed(self, requests: Sequence[EditRequest]) -> np.ndarray:
        """Pool mask: False for cases about an edited or committed subject, or with an edited prompt."""
        subjects = {r.subject.strip().casefold() for r in requests} | {f["subject"].strip().casefold()
                                                                       for f in self.facts}
        prompts = {r.prompt.strip().casefold() for r in requests} | {f["prompt"].strip().casefold() for f in self.facts}
        return np.array([c.subject.strip().casefold() not in subjects and c.prompt.strip().casefold() not in prompts
                         for c in self.pool], dtype=bool)

    def ranking(self, request: EditRequest, allowed: np.ndarray, rng: random.Random) -> list[int]:
        """Allowed pool indices, nearest first."""
        idx = np.flatnonzero(allowed)
        if self.params.retriever == "random":
            return rng.sample(idx.tolist(), len(idx))
        fact = join(request.prompt, request.target_new)[0]
        scores = self.index.scores(fact)[idx]
        return idx[np.argsort(-scores, kind="stable")].tolist()

    def retrieve(self, requests: Sequence[EditRequest], rng: random.Random) -> list[int]:
        """k pool indices, nearest first (several requests: their rankings round-robin)."""
        k = self.params.k
        if k == 0 or not requests:
            return []
        allowed = self.allowed(requests)
        rankings = [self.ranking(r, allowed, rng) for r in requests]
        chosen: list[int] = []
        seen: set[int] = set()
        for depth in range(max(len(r) for r in rankings)):
            for r in rankings:
                if depth < len(r) and r[depth] not in seen:
                    seen.add(r[depth])
                    chosen.append(r[depth])
                    if len(chosen) == k:
                        return chosen
        return chosen

    # --- the edit ---------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """The context's ids: ``tokenizer(text)`` with any trailing special token (EOS) dropped."""
        tok = self.loaded.tokenizer
        ids = [int(t) for t in tok(text)["input_ids"]]
        specials = set(getattr(tok, "all_special_ids", []) or [])
        while ids and ids[-1] in specials:
            ids.pop()
        return ids

    def boundary(self, text: str, ids: list[int], prompts: Sequence[str]) -> str:
        """``exact`` | ``space`` | ``mismatch``: context ids + input ids against one string."""
        tok = self.loaded.tokenizer
        bos = getattr(tok, "bos_token_id", None)
        verdicts = []
        for p in prompts:
            p_ids = [int(t) for t in tok(p)["input_ids"]]
            if ids and p_ids and bos is not None and p_ids[0] == bos and ids[0] == bos:
                p_ids = p_ids[1:]
            want = ids + p_ids
            if self.encode(text + p) == want:
                verdicts.append("exact")
            elif self.encode(text + " " + p) == want:
                verdicts.append("space")
            else:
                verdicts.append("mismatch")
        for v in ("mismatch", "space", "exact"):
            if v in verdicts:
                return v
        return "exact"

    def compute(self, requests: Sequence[EditRequest]) -> ContextEdit:
        self.prepare()
        p = self.params
        requests = list(requests)
        t0 = time.perf_counter()
        ids_key = "|".join(r.case_id for r in requests)
        rng = random.Random(f"ike|{self.ctx.seed}|{ids_key}")
        chosen = self.retrieve(requests, rng)
        cases = [self.pool[i] for i in chosen]
        kinds = assign_kinds(cases, p.proportions, rng)
        demos = [demonstration(c, kind, rng, p.separator) for c, kind in zip(cases, kinds)]
        new = [{"case_id": r.case_id, "subject": r.subject, "prompt": r.prompt,
                "fact": join(r.prompt, r.target_new)[0]} for r in requests]
        facts = self.facts + new
        tail = final_block([f["fact"] for f in facts], p.separator)
        # demos are nearest first; when the context is too long the farthest go first
        keep = len(demos)
        limit = self.context_limit()
        while True:
            order = list(range(keep))[::-1] if p.order == "nearest_last" else list(range(keep))
            text = "".join(demos[i] for i in order) + tail
            ids = self.encode(text)
            if limit is None or len(ids) <= limit:
                break
            if keep == 0:
                raise ValueError(f"ike: the {len(facts)} facts alone take {len(ids)} context tokens, more than "
                                 f"max_context_tokens {limit} (fewer sequential edits, or raise the limit)")
            keep -= 1
        dropped = len(demos) - keep
        boundary = self.boundary(text, ids, [r.prompt for r in requests])
        if boundary == "mismatch":
            self.ctx.say("ike: warning: the tokenizer merges the context's end with the input; the model "
                         "reads other ids than the context and input as one text")
        seconds = time.perf_counter() - t0
        self.ctx.add_time("ike_context", seconds)
        used = [f"{cases[i].case_id}:{kinds[i]}" for i in order]
        info = {"demos": used, "dropped": dropped, "context_tokens": len(ids), "facts": len(facts),
                "boundary": boundary}
        meta = {"method": self.name, "retrieval": p.retriever, "facts": facts,
                "cases": [{"case_id": r.case_id, **info} for r in requests]}
        return ContextEdit(torch.tensor(ids, dtype=torch.long), text, meta)

    # --- sequential state ---------------------------------------------------------------
    def commit(self, edit) -> None:
        self.facts = [dict(f) for f in edit.meta.get("facts", [])]

    def state(self) -> dict[str, torch.Tensor]:
        return {self.STATE_KEY: _pack(self.facts)} if self.facts else {}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        unknown = sorted(set(tensors) - {self.STATE_KEY})
        if unknown:
            raise ValueError(f"method 'ike' keeps only '{self.STATE_KEY}', got {unknown[:3]}")
        self.facts = _unpack(tensors[self.STATE_KEY]) if self.STATE_KEY in tensors else []
