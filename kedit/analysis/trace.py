"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", §2.1).

Which hidden states carry a fact?  Corrupt the subject, then put single clean states
back and see how much of the answer's probability returns.

Definitions (the numbers ``kedit trace`` writes)
------------------------------------------------
Prompt ``x`` of ``T`` tokens, subject tokens ``s_first..s_last`` (found with the
tokenizer's character offsets, :func:`kedit.models.tokens.char_span_to_tokens`), answer token
``a``, model of ``L`` layers.  Every probability is ``P(a)`` at the last prompt position.

* **answer** ``a``: with a target (``--target``, a case's ``ground_truth``) the *first
  token* of that target as it is tokenised after the prompt
  (:func:`kedit.models.tokens.encode_prompt_target`; multi-token targets are traced through their
  first token only, as in ROME); without one, the model's greedy prediction on the clean
  prompt.
* **p_clean** = ``P(a | x)``.
* **corruption**: the output ``e_t`` of the token-embedding module is replaced, at every
  subject token ``t``, by ``e_t + ν ε_{k,t}`` with ``ε ~ N(0, I)`` and ``k = 1..samples``
  noise draws.  ``ν = noise × σ``: ``σ`` is the standard deviation over all elements of
  the token embeddings of the first :data:`NOISE_TOKENS` tokens of the shipped
  WikiText-2 (:func:`embedding_std`), ``noise`` = 3 by default (ROME's setting).
  The draws come from a ``torch.Generator`` seeded with ``seed`` and the *same* draws
  are used for ``p_corrupt`` and every restoration, so differences between restorations
  are never noise-draw differences.
* **p_corrupt** = mean over the ``k`` draws of ``P(a | corrupted_k)``.
* **restoration** ``R = (kind, layers, tokens)``: in each corrupted run, the output of
  the module ``kind`` at every layer in ``layers`` is overwritten, at the positions
  ``tokens``, by its value in the clean run; ``p_R`` = mean over draws of ``P(a)``.
  ``hidden`` = the output of transformer block ``l`` (the residual stream after layer
  ``l``), ``mlp`` = the MLP's output, ``attn`` = the attention's output (both before they
  are added to the residual stream).
* **heatmap** ``p(t, l)``: ``hidden``: ``R = (hidden, {l}, {t})``; ``mlp``/``attn``: ``R =
  (kind, W(l), {t})`` over the window ``W(l) = {j : max(0, l - w//2) <= j < min(L, l - w//2 + w)}``
  (``w`` = ``window``, 10 by default: ROME's centring, ``w`` layers where the model has them).
* **indirect effect** ``IE(t, l) = p(t, l) - p_corrupt``.
* **average indirect effect** over cases (``--cases``): the mean over cases of
  ``IE(s_last, l)`` (the last subject token), per kind and layer.  Suggested ROME layer =
  argmax over ``l`` of the average MLP IE; suggested MEMIT layers = the
  :data:`MEMIT_SPAN` consecutive layers with the largest summed average MLP IE.

Batching: a forward pass carries ``samples`` rows for each of as many restorations as fit
in ``batch_tokens`` tokens, grouped by their lowest restored layer (the tokens of a few
layers in one pass for small models); the blocks below it are not recomputed (:class:`Tracer`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from kedit.data.corpus import corpus_hash, wikitext_paragraphs
from kedit.models.hooks import edit_output, record, replay_from
from kedit.models.arch import ModelAdapter
from kedit.models.load import LoadedModel
from kedit.models.tokens import char_span_to_tokens, encode_prompt_target

__all__ = [
    "KINDS", "MEMIT_SPAN", "NOISE_TOKENS", "CasesTrace", "NoiseScale", "PromptTrace", "Restoration",
    "TraceError", "TracePrompt", "TraceSettings", "Tracer", "embedding_std", "prepare_prompt",
    "suggest_layers", "trace_cases", "trace_prompt", "window_layers",
]

KINDS = ("hidden", "mlp", "attn")
#: Tokens of WikiText-2 over which the embedding standard deviation is measured.
NOISE_TOKENS = 20_000
#: Consecutive layers suggested for MEMIT.
MEMIT_SPAN = 5
#: Tokens per forward pass (rows x prompt length), CPU and accelerator.
CPU_BATCH_TOKENS = 4096
GPU_BATCH_TOKENS = 65536


class TraceError(ValueError):
    """Input that cannot be traced (subject not in the prompt, bad setting); one line."""


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class TraceSettings:
    """Everything that determines the numbers (written to the run's config.yaml)."""

    kinds: tuple[str, ...] = KINDS
    samples: int = 10
    noise: float = 3.0          # multiple of the embedding standard deviation
    window: int = 10            # layers restored together for mlp / attn
    seed: int = 0
    batch_tokens: int | None = None  # None: CPU_BATCH_TOKENS on the CPU, GPU_BATCH_TOKENS elsewhere

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", tuple(dict.fromkeys(self.kinds)))
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise TraceError(f"--kind {', '.join(bad) or '(none)'}: choose from {', '.join(KINDS)}")
        if self.samples < 1:
            raise TraceError(f"--samples {self.samples}: need at least one noise draw")
        if not (self.noise >= 0 and math.isfinite(self.noise)):
            raise TraceError(f"--noise {self.noise}: must be a finite number >= 0")
        if self.window < 1:
            raise TraceError(f"--window {self.window}: must be at least 1 layer")
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise TraceError(f"--batch-tokens {self.batch_tokens}: must be positive")


def window_layers(kind: str, layer: int, n_layers: int, window: int) -> tuple[int, ...]:
    """Layers restored for heatmap column ``layer``: ``(layer,)`` for hidden, else ROME's
    window ``max(0, l - w//2) <= j < min(L, l - w//2 + w)``."""
    if kind == "hidden":
        return (layer,)
    lo = layer - window // 2
    return tuple(range(max(0, lo), min(n_layers, lo + window)))


def _module(adapter: ModelAdapter, kind: str, layer: int) -> nn.Module:
    if kind == "hidden":
        return adapter.block(layer)
    if kind == "mlp":
        return adapter.mlp(layer)
    if kind == "attn":
        return adapter.attn(layer)
    raise TraceError(f"unknown kind {kind!r}: choose from {', '.join(KINDS)}")


# --------------------------------------------------------------------------- noise


@dataclass(frozen=True)
class NoiseScale:
    """``scale = multiplier × std``: the Gaussian noise's standard deviation."""

    std: float
    multiplier: float
    corpus: str
    tokens: int

    @property
    def scale(self) -> float:
        return self.multiplier * self.std


def embedding_std(loaded: LoadedModel, multiplier: float = 3.0, n_tokens: int = NOISE_TOKENS) -> NoiseScale:
    """Standard deviation over all elements of the token-embedding module's output on the
    first ``n_tokens`` tokens of the shipped WikiText-2 (paragraphs in order, the last one
    cut).  A lookup, no forward pass: well under a second."""
    ids: list[int] = []
    texts: list[str] = []
    for text in wikitext_paragraphs():
        texts.append(text)
        ids.extend(int(i) for i in loaded.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if len(ids) >= n_tokens:
            break
    ids = ids[:n_tokens]
    with torch.no_grad():
        emb = loaded.adapter.embed()(torch.tensor(ids, device=loaded.adapter.device))
    return NoiseScale(std=float(emb.double().std()), multiplier=float(multiplier),
                      corpus=f"wikitext-2:{corpus_hash(texts)}", tokens=len(ids))


# --------------------------------------------------------------------------- prompt


@dataclass(frozen=True)
class TracePrompt:
    """A tokenised prompt, its subject's token range and the answer token traced."""

    prompt: str
    subject: str
    input_ids: tuple[int, ...]
    tokens: tuple[str, ...]     # each token decoded alone
    subject_first: int
    subject_last: int           # inclusive
    answer: str                 # the answer token, decoded
    answer_id: int
    answer_source: str          # "target" (first token of the given target) | "greedy"
    target: str | None = None

    @property
    def labels(self) -> list[str]:
        """Token strings for plots; subject tokens marked with a trailing ``*``."""
        out = []
        for i, tok in enumerate(self.tokens):
            text = tok.replace("\n", "\\n") or "∅"
            out.append(f"{text}*" if self.subject_first <= i <= self.subject_last else text)
        return out


def _forward_last(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits at the last position, float32, shape (rows, vocab)."""
    return model(input_ids=ids, logits_to_keep=1).logits[:, -1].float()


def prepare_prompt(loaded: LoadedModel, prompt: str, subject: str, target: str | None = None,
                   subject_start: int | None = None) -> TracePrompt:
    """Tokenise ``prompt``, locate ``subject`` (its first occurrence, or the one starting at
    character ``subject_start``) and fix the answer token (see the module docstring)."""
    tok = loaded.tokenizer
    if not prompt.strip():
        raise TraceError("--prompt is empty")
    if not subject.strip():
        raise TraceError("--subject is empty")
    start = prompt.find(subject) if subject_start is None else subject_start
    if start < 0 or prompt[start:start + len(subject)] != subject:
        raise TraceError(f"subject {subject!r} does not occur in the prompt {prompt!r}")
    enc = tok(prompt, return_offsets_mapping=True)
    ids = [int(i) for i in enc["input_ids"]]
    offsets = [(int(a), int(b)) for a, b in enc["offset_mapping"]]
    while ids and offsets[-1][1] <= offsets[-1][0]:   # a trailing EOS some tokenizers append
        ids, offsets = ids[:-1], offsets[:-1]
    first, last = char_span_to_tokens(offsets, start, start + len(subject))
    if target is not None:
        try:
            answer_id = encode_prompt_target(tok, prompt, target).target_ids[0]
        except ValueError as e:
            raise TraceError(f"--target {target!r}: {e}") from None
        source = "target"
    else:
        with torch.no_grad():
            logits = _forward_last(loaded.model, torch.tensor([ids], device=loaded.adapter.device))
        answer_id, source = int(logits[0].argmax()), "greedy"
    return TracePrompt(prompt=prompt, subject=subject, input_ids=tuple(ids),
                       tokens=tuple(tok.decode([i]) for i in ids), subject_first=first, subject_last=last,
                       answer=tok.decode([answer_id]), answer_id=int(answer_id), answer_source=source,
                       target=target)


# --------------------------------------------------------------------------- the tracer


@dataclass(frozen=True)
class Restoration:
    """Overwrite ``kind``'s output at ``layers`` x ``tokens`` with its clean value."""

    kind: str
    layers: tuple[int, ...]
    tokens: tuple[int, ...]


class Tracer:
    """One prompt: the clean run's states, the noise draws, and batched restored runs.

    ``noise_scale`` is the absolute standard deviation ``ν`` of the added noise.

    Speed: a restoration whose lowest restored layer is ``j`` changes nothing below block
    ``j``, so its rows start at block ``j`` from the residual stream recorded on the plain
    corrupted run (:func:`kedit.models.hooks.replay_from`); blocks below are skipped.  Restorations
    are sorted by that layer and cut into passes of ``per_forward`` (``batch_tokens`` tokens),
    each starting at its lowest start layer: big passes (small ones are several times slower
    per token on a CPU) that still skip most of the shared lower blocks.
    """

    def __init__(self, loaded: LoadedModel, tp: TracePrompt, *, noise_scale: float, samples: int = 10,
                 seed: int = 0, batch_tokens: int | None = None, kinds: Sequence[str] = KINDS):
        self.model, self.adapter, self.tp = loaded.model, loaded.adapter, tp
        self.samples = samples
        dev = self.adapter.device
        self.ids = torch.tensor([tp.input_ids], device=dev)
        if batch_tokens is None:
            batch_tokens = CPU_BATCH_TOKENS if dev.type == "cpu" else GPU_BATCH_TOKENS
        # restorations per forward: all `samples` rows of each, within the token budget
        self.per_forward = max(1, batch_tokens // (len(tp.input_ids) * samples))
        L = self.adapter.n_layers
        self.blocks = [self.adapter.block(l) for l in range(L)]
        modules = {f"{k}:{l}": _module(self.adapter, k, l) for k in kinds for l in range(L)}
        with torch.no_grad(), record(modules, inputs=False) as seen:
            logits = _forward_last(self.model, self.ids)
        self.clean = {(k, l): seen[f"{k}:{l}"][0].clone() for k in kinds for l in range(L)}
        self.p_clean = float(torch.softmax(logits, -1)[0, tp.answer_id])
        self.greedy_id = int(logits[0].argmax())
        n_subject = tp.subject_last - tp.subject_first + 1
        gen = torch.Generator().manual_seed(seed)
        eps = torch.randn(samples, n_subject, self.adapter.hidden_size, generator=gen, dtype=torch.float32)
        self.noise = (eps * noise_scale).to(device=dev, dtype=self.adapter.dtype)
        # the plain corrupted run: p_corrupt, and the residual stream entering every block
        raw: dict = {}

        def keep_structure(_mod, _args, out) -> None:
            raw.setdefault("out", out)

        with torch.no_grad(), ExitStack() as stack:
            stack.enter_context(edit_output(self.adapter.embed(), self._corrupt(1)))
            block_in = stack.enter_context(record({str(l): b for l, b in enumerate(self.blocks)}, inputs=True))
            handle = self.blocks[0].register_forward_hook(keep_structure)
            stack.callback(handle.remove)
            logits = _forward_last(self.model, self.ids.repeat(samples, 1))
        self.corrupt_in = [block_in[str(l)] for l in range(L)]
        self.structure = raw["out"]
        self.p_corrupt = float(torch.softmax(logits, -1)[:, tp.answer_id].mean())

    def _corrupt(self, groups: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """Add the noise draws to the subject's token embeddings; row ``g*S + k`` gets draw ``k``."""
        s0, s1 = self.tp.subject_first, self.tp.subject_last + 1
        noise = self.noise.repeat(groups, 1, 1)

        def fn(x: torch.Tensor) -> torch.Tensor:
            x = x.clone()
            x[:, s0:s1] += noise
            return x
        return fn

    @staticmethod
    def _start(r: Restoration) -> int:
        return min(r.layers) if r.layers and r.tokens else 0

    def probs(self, restorations: Sequence[Restoration],
              progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """``p_R`` for each restoration (float64, CPU), in the order given."""
        order = sorted(range(len(restorations)), key=lambda i: self._start(restorations[i]))
        out = torch.empty(len(restorations), dtype=torch.float64)
        for a in range(0, len(order), self.per_forward):
            chunk = order[a:a + self.per_forward]
            reqs = [restorations[j] for j in chunk]
            out[chunk] = self._forward(reqs, min(self._start(r) for r in reqs)).double()
            if progress is not None:
                progress(len(chunk))
        return out

    def _forward(self, chunk: Sequence[Restoration], start: int) -> torch.Tensor:
        S, G = self.samples, len(chunk)
        where: dict[tuple[str, int], tuple[list[int], list[int]]] = {}
        for g, r in enumerate(chunk):
            for layer in r.layers:
                rows, toks = where.setdefault((r.kind, layer), ([], []))
                for t in r.tokens:
                    rows.extend(range(g * S, (g + 1) * S))
                    toks.extend([t] * S)

        def restore(key: tuple[str, int]) -> Callable[[torch.Tensor], torch.Tensor]:
            rows, toks = (torch.tensor(v, device=self.ids.device) for v in where[key])
            values = self.clean[key][toks]

            def fn(x: torch.Tensor) -> torch.Tensor:
                x = x.clone()
                x[rows, toks] = values
                return x
            return fn

        with torch.no_grad(), ExitStack() as stack:
            if start == 0:
                stack.enter_context(edit_output(self.adapter.embed(), self._corrupt(G)))
            else:
                hidden = self.corrupt_in[start].repeat(G, 1, 1)
                stack.enter_context(replay_from(self.blocks[:start + 1], lambda: hidden, self.structure))
            for key in where:
                stack.enter_context(edit_output(_module(self.adapter, *key), restore(key)))
            logits = _forward_last(self.model, self.ids.repeat(G * S, 1))
        p = torch.softmax(logits, -1)[:, self.tp.answer_id]
        return p.view(G, S).mean(1).cpu()


# --------------------------------------------------------------------------- one prompt


@dataclass
class PromptTrace:
    """Heatmaps for one prompt: ``scores[kind][t][l]`` = p(t, l) (module docstring)."""

    prompt: TracePrompt
    p_clean: float
    p_corrupt: float
    n_layers: int
    scores: dict[str, list[list[float]]]
    windows: dict[str, int]

    def ie(self, kind: str) -> list[list[float]]:
        """Indirect effect ``p(t, l) - p_corrupt``."""
        return [[p - self.p_corrupt for p in row] for row in self.scores[kind]]

    def to_dict(self) -> dict:
        tp = self.prompt
        return {
            "prompt": tp.prompt, "subject": tp.subject, "tokens": list(tp.tokens),
            "input_ids": list(tp.input_ids), "subject_tokens": [tp.subject_first, tp.subject_last],
            "answer": {"token": tp.answer, "token_id": tp.answer_id, "source": tp.answer_source,
                       "target": tp.target},
            "p_clean": self.p_clean, "p_corrupt": self.p_corrupt, "n_layers": self.n_layers,
            "kinds": {k: {"window": self.windows[k], "p": self.scores[k], "indirect_effect": self.ie(k)}
                      for k in self.scores},
        }


def total_restorations(tp: TracePrompt, n_layers: int, kinds: Sequence[str]) -> int:
    return len(kinds) * len(tp.input_ids) * n_layers


def trace_prompt(loaded: LoadedModel, tp: TracePrompt, settings: TraceSettings, noise: NoiseScale,
                 progress: Callable[[int], None] | None = None) -> PromptTrace:
    """Every (token, layer) restoration for each kind in ``settings.kinds``; rows are
    token-major so that one forward pass holds all layers of a token when they fit."""
    tracer = Tracer(loaded, tp, noise_scale=noise.scale, samples=settings.samples, seed=settings.seed,
                    batch_tokens=settings.batch_tokens, kinds=settings.kinds)
    L, T = loaded.adapter.n_layers, len(tp.input_ids)
    scores, windows = {}, {}
    for kind in settings.kinds:
        reqs = [Restoration(kind, window_layers(kind, l, L, settings.window), (t,))
                for t in range(T) for l in range(L)]
        p = tracer.probs(reqs, progress).view(T, L)
        scores[kind] = p.tolist()
        windows[kind] = 1 if kind == "hidden" else settings.window
    return PromptTrace(tp, tracer.p_clean, tracer.p_corrupt, L, scores, windows)


# --------------------------------------------------------------------------- many cases


def suggest_layers(mean_mlp_ie: Sequence[float], span: int = MEMIT_SPAN) -> dict:
    """ROME layer = argmax of the average MLP IE; MEMIT layers = the ``span`` consecutive
    layers with the largest sum of it (first such window on ties)."""
    ie = list(mean_mlp_ie)
    rome = max(range(len(ie)), key=lambda l: (ie[l], -l))
    span = min(span, len(ie))
    sums = [sum(ie[a:a + span]) for a in range(len(ie) - span + 1)]
    a = max(range(len(sums)), key=lambda i: (sums[i], -i))
    return {"rome_layer": rome, "memit_layers": list(range(a, a + span))}


def _mean_stderr(rows: list[list[float]]) -> tuple[list[float], list[float]]:
    t = torch.tensor(rows, dtype=torch.float64)
    n = t.shape[0]
    mean = t.mean(0)
    se = t.std(0, unbiased=True) / math.sqrt(n) if n > 1 else torch.zeros_like(mean)
    return mean.tolist(), se.tolist()


@dataclass
class CasesTrace:
    """Indirect effects at the last subject token, per case and averaged."""

    n_layers: int
    kinds: tuple[str, ...]
    per_case: list[dict] = field(default_factory=list)

    def average(self, known_only: bool = False) -> dict:
        """``{"n", "mean": {kind: [L]}, "stderr": {kind: [L]}, "p_clean", "p_corrupt"}``;
        ``known_only``: only cases whose answer is the model's greedy prediction."""
        rows = [c for c in self.per_case if c["known"] or not known_only]
        out: dict = {"n": len(rows), "mean": {}, "stderr": {}}
        if not rows:
            return out
        for kind in self.kinds:
            out["mean"][kind], out["stderr"][kind] = _mean_stderr([c["indirect_effect"][kind] for c in rows])
        out["p_clean"] = sum(c["p_clean"] for c in rows) / len(rows)
        out["p_corrupt"] = sum(c["p_corrupt"] for c in rows) / len(rows)
        return out

    def suggestion(self) -> dict | None:
        avg = self.average()
        return suggest_layers(avg["mean"]["mlp"]) if "mlp" in avg["mean"] else None

    def to_dict(self) -> dict:
        return {"n_layers": self.n_layers, "kinds": list(self.kinds), "token": "subject_last",
                "average": self.average(), "average_known": self.average(known_only=True),
                "suggested": self.suggestion(), "per_case": self.per_case}


def trace_cases(loaded: LoadedModel, cases: Sequence, settings: TraceSettings, noise: NoiseScale,
                progress: Callable[[dict], None] | None = None) -> CasesTrace:
    """IE(last subject token, l) for every case (kedit.data.cases.EditCase) and kind; the answer
    is the case's ``ground_truth`` (first token), or the greedy prediction if it has none.
    ``progress`` receives each case's record as it finishes."""
    L = loaded.adapter.n_layers
    result = CasesTrace(L, settings.kinds)
    for case in cases:
        tp = prepare_prompt(loaded, case.prompt, case.subject, case.ground_truth,
                            subject_start=case.template.index("{}"))
        tracer = Tracer(loaded, tp, noise_scale=noise.scale, samples=settings.samples, seed=settings.seed,
                        batch_tokens=settings.batch_tokens, kinds=settings.kinds)
        reqs = [Restoration(kind, window_layers(kind, l, L, settings.window), (tp.subject_last,))
                for kind in settings.kinds for l in range(L)]
        p = tracer.probs(reqs).view(len(settings.kinds), L)
        rec = {"case_id": case.case_id, "prompt": tp.prompt, "subject": tp.subject, "answer": tp.answer,
               "answer_id": tp.answer_id, "answer_source": tp.answer_source, "known": tracer.greedy_id == tp.answer_id,
               "subject_last": tp.subject_last, "p_clean": tracer.p_clean, "p_corrupt": tracer.p_corrupt,
               "indirect_effect": {k: (p[i] - tracer.p_corrupt).tolist() for i, k in enumerate(settings.kinds)}}
        result.per_case.append(rec)
        if progress is not None:
            progress(rec)
    return result


def settings_dict(settings: TraceSettings, noise: NoiseScale) -> dict:
    return {**asdict(settings), "noise_std": asdict(noise) | {"scale": noise.scale}}


def configured_layers(loaded: LoadedModel) -> dict:
    """The edit layers the shipped ROME / MEMIT configs use for this model, for comparison
    (``None`` where there is no config)."""
    from kedit.config import ConfigError, resolve_params
    from kedit.methods.registry import get_method

    out: dict = {"rome_layer": None, "memit_layers": None}
    for method, attr, key in (("rome", "layer", "rome_layer"), ("memit", "layers", "memit_layers")):
        try:
            params, source = resolve_params(get_method(method), loaded.name, loaded.adapter)
        except (ConfigError, KeyError):
            continue
        value = getattr(params, attr)
        out[key] = list(value) if isinstance(value, (list, tuple)) else value
        out[f"{method}_config"] = source
    return out
