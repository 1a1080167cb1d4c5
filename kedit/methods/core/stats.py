"""Second moments of MLP keys, ``C = E[k kᵀ]``, computed in one pass and cached on disk.

``k`` is the *input* of the MLP output projection (``adapter.mlp_out(layer)``) at every
non-pad token of a corpus; ``C`` is the uncentred second moment that ROME and MEMIT use
(ROME's ``mom2``).

Computation
-----------
* All requested layers are collected in ONE forward pass over the corpus; the forward
  stops (:class:`kedit.models.hooks.StopForward`) as soon as the deepest requested layer's
  projection receives its input (the key), so neither that projection's own matmul,
  nor the later blocks, nor the LM head ever run.
* Texts are tokenised (each truncated to ``max_length`` and to the model's maximum
  positions), sorted by length and packed into batches under a token budget
  (:data:`TOKEN_BUDGET` tokens including padding, :data:`CPU_TOKEN_BUDGET` on the CPU,
  at most :data:`MAX_BATCH` texts), right-padded with an attention mask.  Padding rows are dropped *before* the product.
* Numerics ("equally stable" scheme): per batch and layer, the keys ``K`` (n_tokens, d)
  are cast to float32 (the model may run in bf16/fp16) and ``Kᵀ K`` is formed in
  float32; these per-batch products are accumulated into a float64 running sum, and
  ``C = sum / n_tokens`` in float64.  Each float32 product sums at most a few thousand
  terms; the float64 accumulation keeps the error from growing with corpus size.

Cache
-----
One safetensors file per (model, layer, corpus)::

    <stats_dir>/<model fingerprint>/layer<L>-<corpus id sanitised>-n<samples>.safetensors

holding the float64 tensor ``mom2`` and string metadata (see :func:`_metadata`).  Files
are written atomically (temp file in the same directory + ``os.replace``).  A file is
used only if its metadata matches the request (fingerprint, layer, module, corpus id,
samples, max_length) and ``mom2`` has shape ``(key_size, key_size)`` and is finite;
otherwise it is recomputed and replaced, with a warning saying why.

Results
-------
:func:`get_stats` returns a :class:`StatsResult`: a ``dict`` layer -> C (float64, CPU)
whose ``.info[layer]`` (:class:`StatsInfo`) records the file, whether it came from the
cache and the number of tokens and texts C was computed on.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from kedit.util.atomic import atomic_path
from kedit.data.corpus import CorpusError, load_corpus
from kedit.models.hooks import StopForward, record, run_until_stopped
from kedit.util.paths import stats_dir as _stats_dir

__all__ = [
    "FORMAT",
    "MAX_BATCH",
    "CPU_TOKEN_BUDGET",
    "TOKEN_BUDGET",
    "SecondMoment",
    "StatsInfo",
    "StatsResult",
    "compute_second_moments",
    "effective_max_length",
    "get_stats",
    "stats_path",
    "stats_report",
]

log = logging.getLogger(__name__)

#: Batches hold at most this many tokens, padding included (on an accelerator) ...
TOKEN_BUDGET = 4096
#: ... on the CPU (smaller activations stay in cache: ~10% faster than 4096 on 2 cores) ...
CPU_TOKEN_BUDGET = 2048
#: ... and at most this many texts.
MAX_BATCH = 64
#: Format tag written into every cache file's metadata.
FORMAT = "kedit-stats/1"
TENSOR = "mom2"


# --------------------------------------------------------------------------- accumulator


class SecondMoment:
    """Running uncentred second moment ``E[k kᵀ]`` of row vectors ``k``.

    :meth:`add` takes a batch ``K`` (..., d) of any float dtype and device, forms
    ``Kᵀ K`` in float32 and adds it to a float64 sum kept on the batch's device (CPU
    for devices without float64).  :meth:`mean` returns the float64 ``sum / n`` on CPU.
    """

    def __init__(self, d: int | None = None):
        self.d = d
        self.n = 0
        self.sum: torch.Tensor | None = None

    def add(self, k: torch.Tensor) -> None:
        if k.ndim < 1:
            raise ValueError("SecondMoment.add: expected a (n, d) tensor of row vectors")
        d = k.shape[-1]
        if self.d is None:
            self.d = d
        elif d != self.d:
            raise ValueError(f"SecondMoment.add: vectors of size {d}, expected {self.d}")
        k = k.reshape(-1, d)
        if k.shape[0] == 0:
            return
        k32 = k.to(torch.float32)
        prod = k32.T @ k32
        if self.sum is None:
            dev = k.device if k.device.type != "mps" else torch.device("cpu")
            with torch.inference_mode(False):  # a normal tensor: usable in and outside inference mode
                self.sum = torch.zeros((d, d), dtype=torch.float64, device=dev)
        self.sum += prod.to(self.sum.device)
        self.n += k.shape[0]

    def merge(self, other: SecondMoment) -> SecondMoment:
        """Add another accumulator's sum (e.g. from a second shard) into this one."""
        if other.sum is None:
            return self
        if self.sum is None:
            with torch.inference_mode(False):
                self.d, self.sum = other.d, other.sum.clone()
        else:
            if other.d != self.d:
                raise ValueError(f"SecondMoment.merge: size {other.d} != {self.d}")
            self.sum += other.sum.to(self.sum.device)
        self.n += other.n
        return self

    def mean(self) -> torch.Tensor:
        if self.sum is None or self.n == 0:
            raise ValueError("SecondMoment.mean: no vectors were added")
        return (self.sum / self.n).cpu()

    def save(self, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
        """Write ``mom2`` (float64) atomically, with ``tokens`` = n in the metadata."""
        _atomic_save(Path(path), self.mean(), {**(metadata or {}), "tokens": str(self.n)})


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class StatsInfo:
    """Where one layer's C lives and what it was computed on."""

    layer: int
    path: Path
    cached: bool                  # loaded from the cache (False: computed by this call)
    tokens: int                   # non-pad tokens C averages over
    samples: int                  # texts of the corpus used
    corpus: str                   # corpus id
    max_length: int               # effective truncation length
    module: str                   # module path of the projection whose input is k
    seconds: float = 0.0          # wall time of the pass that computed it (0 for cache hits)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


class StatsResult(dict):
    """``dict`` layer -> C (float64, CPU), with ``info[layer]`` a :class:`StatsInfo`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.info: dict[int, StatsInfo] = {}


# --------------------------------------------------------------------------- helpers


def _kedit_version() -> str:
    try:
        from importlib.metadata import version

        return version("kedit")
    except Exception:  # noqa: BLE001 - not installed (source tree)
        return "unknown"


def effective_max_length(loaded, max_length: int) -> int:
    """``max_length`` capped by the model's maximum number of positions."""
    if max_length <= 0:
        raise ValueError(f"max_length must be positive (got {max_length})")
    cfg = loaded.model.config
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return min(max_length, int(limit)) if limit else max_length


def _sanitise(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in s)


def stats_path(root: Path, fingerprint: str, layer: int, corpus_id: str, samples: int) -> Path:
    return root / fingerprint / f"layer{layer}-{_sanitise(corpus_id)}-n{samples}.safetensors"


def _atomic_save(path: Path, tensor: torch.Tensor, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({TENSOR: tensor.contiguous()}, str(tmp), metadata={k: str(v) for k, v in metadata.items()})


def _load_checked(path: Path, expect: dict[str, str], d: int) -> tuple[torch.Tensor | None, dict, str | None]:
    """``(C, metadata, None)`` for a valid cache file, else ``(None, {}, why)``."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if TENSOR not in f.keys():
                return None, {}, f"no '{TENSOR}' tensor"
            t = f.get_tensor(TENSOR)
    except Exception as e:  # noqa: BLE001 - any unreadable file is recomputed
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return None, {}, f"unreadable ({first})"
    for key, want in expect.items():
        if meta.get(key) != want:
            return None, {}, f"metadata mismatch: {key} is {meta.get(key)!r}, expected {want!r}"
    if tuple(t.shape) != (d, d):
        return None, {}, f"wrong shape {tuple(t.shape)}, expected ({d}, {d})"
    if not torch.isfinite(t).all():
        return None, {}, "contains NaN or inf"
    try:
        tokens = int(meta.get("tokens", ""))
    except ValueError:
        return None, {}, "metadata has no token count"
    if tokens <= 0:
        return None, {}, f"token count {tokens}"
    return t.to(torch.float64), meta, None


def _plan_batches(lengths: Sequence[int], token_budget: int, max_batch: int) -> list[list[int]]:
    """Indices grouped into batches: longest first, padded size <= token_budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and ((len(cur) + 1) * lengths[cur[0]] > token_budget or len(cur) >= max_batch):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


@contextmanager
def _stop_before(module: torch.nn.Module):
    """Raise :class:`StopForward` when ``module`` is called, after the hooks registered
    before this one (:func:`kedit.models.hooks.record`'s) have seen its input."""

    def hook(_mod, _args):
        raise StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _progress_bar(enabled: bool, description: str, total: int):
    from rich.console import Console
    from rich.progress import (BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    from rich.text import Text

    class _Tokens(ProgressColumn):
        def render(self, task):
            return Text(f"{int(task.completed):,}/{int(task.total or 0):,} tok", style="progress.download")

    class _Rate(ProgressColumn):
        def render(self, task):
            speed = task.finished_speed or task.speed
            return Text(f"{speed:,.0f} tok/s" if speed else "? tok/s", style="progress.data.speed")

    bar = Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), _Tokens(),
                   _Rate(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                   console=Console(stderr=True), disable=not enabled, transient=False)
    task = bar.add_task(description, total=total)
    return bar, task


# --------------------------------------------------------------------------- one pass


def compute_second_moments(loaded, layers: Sequence[int], texts: Sequence[str], *, max_length: int = 1024,
                           token_budget: int | None = None, max_batch: int = MAX_BATCH,
                           progress: bool = True) -> dict[int, SecondMoment]:
    """One forward pass over ``texts`` collecting ``Σ k kᵀ`` for every layer in ``layers``.

    No caching; see the module docstring for batching and numerics.
    """
    adapter, model, tok = loaded.adapter, loaded.model, loaded.tokenizer
    layers = sorted({adapter.check_layer(int(layer)) for layer in layers})
    if not layers:
        return {}
    max_length = effective_max_length(loaded, max_length)
    enc = tok(list(texts), truncation=True, max_length=max_length)["input_ids"]
    enc = [ids for ids in enc if len(ids) > 0]
    total = sum(len(ids) for ids in enc)
    if total == 0:
        raise CorpusError("statistics corpus produced no tokens")
    device = adapter.device
    if token_budget is None:
        token_budget = CPU_TOKEN_BUDGET if device.type == "cpu" else TOKEN_BUDGET
    batches = _plan_batches([len(ids) for ids in enc], token_budget, max_batch)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    names = {layer: adapter.mlp_out_name(layer) for layer in layers}
    modules = {names[layer]: adapter.mlp_out(layer) for layer in layers}
    # The deepest projection's *input* is all we need: stop as it is called (its own
    # matmul, the later blocks and the LM head never run).
    stop = adapter.mlp_out(layers[-1])
    acc = {layer: SecondMoment(adapter.key_size) for layer in layers}
    label = f"stats layer{'s' if len(layers) > 1 else ''} {','.join(map(str, layers))}"
    bar, task = _progress_bar(progress, label, total)
    was_training = model.training
    model.eval()  # no dropout in the statistics
    try:
        with bar, torch.inference_mode(), record(modules, inputs=True) as seen, _stop_before(stop):
            _run_batches(model, enc, batches, pad_id, device, seen, names, acc, bar, task)
    finally:
        model.train(was_training)
    return acc


def _run_batches(model, enc, batches, pad_id, device, seen, names, acc, bar, task) -> None:
    """Right-pad each batch, run the (stopped) forward, add the non-pad keys."""
    for batch in batches:
        width = len(enc[batch[0]])
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, :len(enc[i])] = torch.tensor(enc[i], dtype=torch.long)
            mask[row, :len(enc[i])] = 1
        ids, mask = ids.to(device), mask.to(device)
        seen.clear()
        run_until_stopped(lambda: model(input_ids=ids, attention_mask=mask, use_cache=False))
        keep = mask.bool()
        for layer, name in names.items():
            k = seen.get(name)
            if k is None:
                raise RuntimeError(f"statistics: module {name} did not run in the forward pass")
            acc[layer].add(k[keep])
        bar.advance(task, sum(len(enc[i]) for i in batch))


# --------------------------------------------------------------------------- cached API


def _metadata(loaded, layer: int, corpus_id: str, samples: int, max_length: int) -> dict[str, str]:
    """The keys a cache hit must match (the saved file has more: tokens, dtype, version, ...)."""
    return {
        "format": FORMAT,
        "fingerprint": loaded.fingerprint,
        "layer": str(layer),
        "module": loaded.adapter.mlp_out_name(layer),
        "corpus": corpus_id,
        "samples": str(samples),
        "max_length": str(max_length),
    }


def get_stats(loaded, layers: Sequence[int], *, corpus: str | None = None, samples: int | None = 1000,
              max_length: int = 1024, stats_dir: str | os.PathLike | None = None, force: bool = False,
              progress: bool = True) -> StatsResult:
    """``C = E[k kᵀ]`` (float64, CPU) for each of ``layers``, from the cache or computed.

    ``corpus``: None for the shipped WikiText-2, else a .txt/.jsonl file
    (:func:`kedit.data.corpus.load_corpus`); its first ``samples`` texts are used (all if
    None).  Layers missing from the cache (or all, with ``force``) are computed together
    in ONE pass and saved.  The result's ``.info[layer]`` says where each came from and
    how many tokens it averages over.
    """
    adapter = loaded.adapter
    layers = sorted({adapter.check_layer(int(layer)) for layer in layers})
    result = StatsResult()
    if not layers:
        return result
    if not loaded.fingerprint:
        raise ValueError("statistics cache: the loaded model has no fingerprint")
    texts, corpus_id = load_corpus(corpus, samples)
    n_texts = len(texts)
    eff_len = effective_max_length(loaded, max_length)
    root = _stats_dir(stats_dir)
    d = adapter.key_size
    paths = {layer: stats_path(root, loaded.fingerprint, layer, corpus_id, n_texts) for layer in layers}
    expect = {layer: _metadata(loaded, layer, corpus_id, n_texts, eff_len) for layer in layers}

    def info(layer: int, cached: bool, tokens: int, seconds: float = 0.0) -> StatsInfo:
        return StatsInfo(layer, paths[layer], cached, tokens, n_texts, corpus_id, eff_len,
                         expect[layer]["module"], seconds)

    missing = []
    for layer in layers:
        if force or not paths[layer].exists():
            missing.append(layer)
            continue
        c, meta, why = _load_checked(paths[layer], expect[layer], d)
        if why is not None:
            log.warning("statistics cache %s: %s; recomputing", paths[layer], why)
            missing.append(layer)
            continue
        result[layer] = c
        result.info[layer] = info(layer, True, int(meta["tokens"]))

    if missing:
        t0 = time.perf_counter()
        acc = compute_second_moments(loaded, missing, texts, max_length=eff_len, progress=progress)
        seconds = time.perf_counter() - t0
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for layer in missing:
            meta = {**expect[layer], "model": loaded.name, "tokens": str(acc[layer].n),
                    "dtype": str(adapter.dtype).removeprefix("torch."), "accumulation": "float32 per-batch "
                    "products, float64 sum", "kedit_version": _kedit_version(), "created": created,
                    "seconds": f"{seconds:.2f}"}
            c = acc[layer].mean()
            if not torch.isfinite(c).all():
                raise FloatingPointError(f"statistics for layer {layer} contain NaN or inf (model output "
                                         f"overflowed; try --dtype float32)")
            _atomic_save(paths[layer], c, meta)
            result[layer] = c
            result.info[layer] = info(layer, False, acc[layer].n, seconds)
        log.info("statistics for layers %s: %d tokens in %.1f s", missing, acc[missing[0]].n, seconds)
    out = StatsResult(sorted(result.items()))
    out.info = dict(sorted(result.info.items()))
    return out


def stats_report(loaded, layers: Sequence[int], *, compute: bool = True, corpus: str | None = None,
                 samples: int | None = 1000, max_length: int = 1024, stats_dir: str | os.PathLike | None = None,
                 force: bool = False, progress: bool = True) -> list[dict]:
    """One dict per layer for the CLI: layer, path, cached, tokens, samples, corpus, ...

    ``compute=True`` runs :func:`get_stats` (computing what is missing; ``cached`` then
    says whether the layer came from the cache, ``seconds`` what the pass took).
    ``compute=False`` only inspects the cache: ``cached`` says whether a valid file
    exists (missing, mismatched and damaged files all read False; ``tokens`` is None).
    Every row has the same keys, in the same order, in both modes.
    """
    if compute:
        res = get_stats(loaded, layers, corpus=corpus, samples=samples, max_length=max_length,
                        stats_dir=stats_dir, force=force, progress=progress)
        return [res.info[layer].as_dict() for layer in res.info]
    adapter = loaded.adapter
    texts, corpus_id = load_corpus(corpus, samples)
    eff_len = effective_max_length(loaded, max_length)
    root = _stats_dir(stats_dir)
    rows = []
    for layer in sorted({adapter.check_layer(int(layer)) for layer in layers}):
        path = stats_path(root, loaded.fingerprint, layer, corpus_id, len(texts))
        tokens, why = None, "missing"
        if path.exists():
            _c, meta, why = _load_checked(path, _metadata(loaded, layer, corpus_id, len(texts), eff_len),
                                          adapter.key_size)
            tokens = int(meta["tokens"]) if why is None else None
        rows.append({"layer": layer, "path": str(path), "cached": why is None, "tokens": tokens,
                     "samples": len(texts), "corpus": corpus_id, "max_length": eff_len,
                     "module": adapter.mlp_out_name(layer), "seconds": 0.0})
    return rows
