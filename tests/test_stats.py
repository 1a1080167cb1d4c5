"""Key statistics (kedit.methods.core.stats) and corpora (kedit.data.corpus) on tiny random models."""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny import tiny_model  # noqa: E402

from kedit.data.corpus import CorpusError, load_corpus, wikitext_paragraphs  # noqa: E402
from kedit.methods.core.stats import SecondMoment, compute_second_moments, get_stats, stats_report  # noqa: E402

N = 10          # texts per corpus in these tests
MAXLEN = 48     # tokens per text


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", seed=1)


@pytest.fixture(scope="module")
def gpt2():
    return tiny_model("gpt2", seed=2)


@contextmanager
def count_calls(module):
    """Count forward calls of ``module`` (a pre-hook: counts calls that started)."""
    calls = [0]
    h = module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        h.remove()


def direct_moment(loaded, layer, texts, max_length=MAXLEN):
    """E[k kᵀ] from a plain full forward of one padded batch, float64 outer products."""
    tok = loaded.tokenizer
    enc = tok(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    seen = {}
    mod = loaded.adapter.mlp_out(layer)
    h = mod.register_forward_pre_hook(lambda _m, args: seen.__setitem__("k", args[0].detach()))
    try:
        with torch.no_grad():
            loaded.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    finally:
        h.remove()
    k = seen["k"][enc["attention_mask"].bool()].double()
    return torch.einsum("ni,nj->ij", k, k) / k.shape[0], k.shape[0]


def texts(n=N):
    return wikitext_paragraphs(n)


# --------------------------------------------------------------------------- math


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_get_stats_equals_direct_computation(family, tmp_path, request):
    loaded = request.getfixturevalue(family)
    res = get_stats(loaded, [1], samples=N, max_length=MAXLEN, stats_dir=tmp_path, progress=False)
    want, n_tok = direct_moment(loaded, 1, texts())
    c = res[1]
    assert c.dtype == torch.float64 and c.device.type == "cpu"
    assert c.shape == (loaded.adapter.key_size,) * 2
    torch.testing.assert_close(c, want, rtol=1e-5, atol=1e-7)
    assert res.info[1].tokens == n_tok and res.info[1].samples == N and not res.info[1].cached


@pytest.mark.parametrize("family", ["gptj", "gpt_neox", "qwen2", "mistral"])
def test_other_families_equal_direct(family, tmp_path):
    loaded = tiny_model(family)
    acc = compute_second_moments(loaded, [0, 2], texts(4), max_length=MAXLEN, progress=False)
    for layer in (0, 2):
        want, n_tok = direct_moment(loaded, layer, texts(4))
        assert acc[layer].n == n_tok
        torch.testing.assert_close(acc[layer].mean(), want, rtol=1e-5, atol=1e-7)


def test_many_small_batches_equal_direct(llama):
    acc = compute_second_moments(llama, [2], texts(), max_length=MAXLEN, token_budget=60, max_batch=3,
                                 progress=False)
    want, n_tok = direct_moment(llama, 2, texts())
    assert acc[2].n == n_tok
    torch.testing.assert_close(acc[2].mean(), want, rtol=1e-5, atol=1e-7)


def test_one_multi_layer_pass_equals_single_layer_passes(llama):
    with count_calls(llama.model) as calls:
        both = compute_second_moments(llama, [2, 0], texts(), max_length=MAXLEN, progress=False)
    one_pass = calls[0]
    assert sorted(both) == [0, 2]
    for layer in (0, 2):
        alone = compute_second_moments(llama, [layer], texts(), max_length=MAXLEN, progress=False)
        assert alone[layer].n == both[layer].n
        torch.testing.assert_close(alone[layer].mean(), both[layer].mean(), rtol=1e-6, atol=1e-9)
    with count_calls(llama.model) as calls:
        compute_second_moments(llama, [0], texts(), max_length=MAXLEN, progress=False)
    assert one_pass == calls[0]  # two layers cost the forwards of one


def test_forward_stops_after_deepest_layer(llama):
    last = llama.adapter.n_layers - 1
    with count_calls(llama.adapter.block(last)) as blk, count_calls(llama.adapter.lm_head()) as head, \
            count_calls(llama.adapter.block(1)) as mid:
        compute_second_moments(llama, [0, 1], texts(4), max_length=MAXLEN, progress=False)
    assert mid[0] > 0 and blk[0] == 0 and head[0] == 0
    done = [0]  # completed calls of the deepest projection: only its input is needed
    h = llama.adapter.mlp_out(last).register_forward_hook(lambda *_: done.__setitem__(0, done[0] + 1))
    try:
        with count_calls(llama.adapter.block(last)) as blk, count_calls(llama.adapter.lm_head()) as head:
            compute_second_moments(llama, [last], texts(4), max_length=MAXLEN, progress=False)
    finally:
        h.remove()
    assert blk[0] > 0 and head[0] == 0 and done[0] == 0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_padding_excluded(family, request):
    loaded = request.getfixturevalue(family)
    ts = texts(6)
    batched = compute_second_moments(loaded, [1], ts, max_length=MAXLEN, progress=False)
    lengths = [len(x) for x in loaded.tokenizer(ts, truncation=True, max_length=MAXLEN)["input_ids"]]
    assert len(set(lengths)) > 1  # the single batch really is padded
    merged = SecondMoment()
    for t in ts:
        merged.merge(compute_second_moments(loaded, [1], [t], max_length=MAXLEN, progress=False)[1])
    assert merged.n == batched[1].n == sum(lengths)
    torch.testing.assert_close(batched[1].mean(), merged.mean(), rtol=1e-5, atol=1e-7)


def test_second_moment_accumulator():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 7, generator=g, dtype=torch.float64) * 3 + 1
    acc = SecondMoment()
    for chunk in x.split(128):
        acc.add(chunk.float())
    acc.add(torch.empty(0, 7))
    assert acc.n == 1000
    torch.testing.assert_close(acc.mean(), x.T @ x / 1000, rtol=1e-5, atol=1e-5)
    assert acc.mean().dtype == torch.float64
    half = SecondMoment().merge(SecondMoment())
    half.add(x[:500].to(torch.bfloat16).reshape(50, 10, 7))  # any leading shape, low precision in
    assert half.n == 500
    with torch.inference_mode():  # accumulators filled in inference mode stay usable outside it
        inside = SecondMoment()
        inside.add(x[:10])
    inside.add(x[10:20])
    SecondMoment().merge(inside).add(x[:1])
    with pytest.raises(ValueError):
        SecondMoment().mean()
    with pytest.raises(ValueError):
        acc.add(torch.zeros(3, 5))


# --------------------------------------------------------------------------- cache


def _files(d: Path):
    return sorted(p.name for p in d.rglob("*") if p.is_file())


def test_cache_hit_skips_the_model(llama, tmp_path):
    first = get_stats(llama, [0, 2], samples=N, max_length=MAXLEN, stats_dir=tmp_path, progress=False)
    names = _files(tmp_path)
    assert len(names) == 2 and all(n.endswith(f"-n{N}.safetensors") and not n.startswith(".") for n in names)
    assert (tmp_path / llama.fingerprint).is_dir()
    with count_calls(llama.model) as calls:
        again = get_stats(llama, [2, 0], samples=N, max_length=MAXLEN, stats_dir=tmp_path, progress=False)
    assert calls[0] == 0
    assert list(again) == [0, 2] and all(again.info[layer].cached for layer in (0, 2))
    assert again.info[0].tokens == first.info[0].tokens
    for layer in (0, 2):
        assert torch.equal(again[layer], first[layer])
    # Only the missing layer is computed.
    with count_calls(llama.model) as calls:
        mixed = get_stats(llama, [0, 1], samples=N, max_length=MAXLEN, stats_dir=tmp_path, progress=False)
    assert calls[0] > 0 and mixed.info[0].cached and not mixed.info[1].cached
    # force recomputes.
    with count_calls(llama.model) as calls:
        forced = get_stats(llama, [0], samples=N, max_length=MAXLEN, stats_dir=tmp_path, force=True,
                           progress=False)
    assert calls[0] > 0 and not forced.info[0].cached
    assert _files(tmp_path) == sorted(names + [n.replace("layer0-", "layer1-") for n in names[:1]])


def test_cache_metadata(llama, tmp_path):
    from safetensors import safe_open

    res = get_stats(llama, [1], samples=N, max_length=MAXLEN, stats_dir=tmp_path, progress=False)
    with safe_open(str(res.info[1].path), framework="pt") as f:
        meta = f.metadata()
    assert meta["fingerprint"] == llama.fingerprint and meta["layer"] == "1"
    assert meta["module"] == llama.adapter.mlp_out_name(1)
    assert meta["corpus"] == load_corpus(None, N)[1] and meta["samples"] == str(N)
    assert meta["tokens"] == str(res.info[1].tokens) and meta["max_length"] == str(MAXLEN)
    for key in ("model", "dtype", "kedit_version", "created"):
        assert meta[key]


def _rewrite(path: Path, tensor=None, **changes):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, t = f.metadata(), f.get_tensor("mom2")
    save_file({"mom2": t if tensor is None else tensor}, str(path), metadata={**meta, **changes})


@pytest.mark.parametrize("damage", ["fingerprint", "samples", "max_length", "garbage", "shape", "nan"])
def test_bad_cache_file_is_recomputed(llama, tmp_path, caplog, damage):
    res = get_stats(llama, [1], samples=N, max_length=MAXLEN, stats_dir=tmp_path, progress=False)
    path, good = res.info[1].path, res[1]
    d = llama.adapter.key_size
    if damage == "garbage":
        path.write_bytes(b"\x00garbage" * 10)
    elif damage == "shape":
        _rewrite(path, torch.zeros(d - 1, d - 1, dtype=torch.float64))
    elif damage == "nan":
        _rewrite(path, torch.full((d, d), float("nan"), dtype=torch.float64))
    else:
        _rewrite(path, **{damage: "something-else"})
    caplog.set_level(logging.WARNING, logger="kedit.methods.core.stats")
    with count_calls(llama.model) as calls:
        again = get_stats(llama, [1], samples=N, max_length=MAXLEN, stats_dir=tmp_path, progress=False)
    assert calls[0] > 0 and not again.info[1].cached
    assert any("recomputing" in r.getMessage() and path.name in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(again[1], good)
    # The replacement is valid: the next call is a hit.
    assert get_stats(llama, [1], samples=N, max_length=MAXLEN, stats_dir=tmp_path, progress=False).info[1].cached
    assert _files(tmp_path) == [path.name]


def test_different_samples_or_model_use_other_files(tmp_path):
    a, b = tiny_model("llama", seed=5), tiny_model("llama", seed=6)
    ra = get_stats(a, [0], samples=4, max_length=MAXLEN, stats_dir=tmp_path, progress=False)
    rb = get_stats(a, [0], samples=5, max_length=MAXLEN, stats_dir=tmp_path, progress=False)
    rc = get_stats(b, [0], samples=4, max_length=MAXLEN, stats_dir=tmp_path, progress=False)
    assert not (rb.info[0].cached or rc.info[0].cached)
    assert len({ra.info[0].path, rb.info[0].path, rc.info[0].path}) == 3
    assert not torch.equal(ra[0], rc[0])


def test_interrupted_write_leaves_nothing(llama, tmp_path, monkeypatch):
    import safetensors.torch

    def boom(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        get_stats(llama, [0], samples=3, max_length=MAXLEN, stats_dir=tmp_path, progress=False)
    assert _files(tmp_path) == []


def test_max_length_capped_by_model_positions(llama, tmp_path):
    res = get_stats(llama, [0], samples=2, max_length=100_000, stats_dir=tmp_path, progress=False)
    assert res.info[0].max_length == llama.model.config.max_position_embeddings


def test_stats_report(llama, tmp_path):
    kw = dict(samples=3, max_length=MAXLEN, stats_dir=tmp_path, progress=False)
    rows = stats_report(llama, [0, 1], compute=False, **kw)
    assert [r["cached"] for r in rows] == [False, False] and rows[0]["tokens"] is None
    rows = stats_report(llama, [0, 1], **kw)
    assert [r["cached"] for r in rows] == [False, False] and rows[0]["tokens"] > 0
    rows2 = stats_report(llama, [1, 0], compute=False, **kw)
    assert [r["cached"] for r in rows2] == [True, True]
    assert [r["tokens"] for r in rows2] == [r["tokens"] for r in rows]
    assert all(Path(r["path"]).is_file() and r["samples"] == 3 for r in rows2)
    assert all(list(r) == list(rows[0]) for r in rows + rows2)  # same columns in both modes


def test_bad_layer_is_refused(llama, tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        get_stats(llama, [7], samples=2, stats_dir=tmp_path, progress=False)


def test_progress_bar_runs(llama, capsys):
    compute_second_moments(llama, [0], texts(2), max_length=MAXLEN, progress=True)
    assert "tok" in capsys.readouterr().err


# --------------------------------------------------------------------------- corpus


def test_wikitext_paragraphs():
    paras = wikitext_paragraphs(None)
    assert len(paras) > 3000
    assert not any(p.startswith("= ") and p.endswith(" =") for p in paras)
    assert paras[0].startswith("Homarus gammarus , known as the European lobster")
    assert not any(a in p for p in paras for a in (" @-@ ", " @,@ ", " @.@ "))
    assert any("0.7" in p for p in paras[:5])  # "0 @.@ 7" undone
    assert wikitext_paragraphs(3) == paras[:3]


def test_load_corpus_ids():
    t5, id5 = load_corpus(None, 5)
    t6, id6 = load_corpus(None, 6)
    assert t5 == wikitext_paragraphs(5) and id5.startswith("wikitext-2:") and len(id5) == len("wikitext-2:") + 12
    assert id5 != id6 and load_corpus(None, 5)[1] == id5
    with pytest.raises(CorpusError):
        load_corpus(None, 0)


def test_txt_and_jsonl_corpora(tmp_path):
    blocks = tmp_path / "blocks.txt"
    blocks.write_text("\nFirst paragraph\ncontinues here.\n\n\nSecond one.\n\n")
    texts_, cid = load_corpus(str(blocks), None)
    assert texts_ == ["First paragraph\ncontinues here.", "Second one."] and cid.startswith("blocks:")
    lines = tmp_path / "lines.txt"
    lines.write_text("one\ntwo\nthree\n")
    assert load_corpus(str(lines), 2)[0] == ["one", "two"]
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["a b", "c d", "e"])) + "\n\n")
    texts_, cid = load_corpus(str(jl), None)
    assert texts_ == ["a b", "c d", "e"] and cid.startswith("c:")
    assert load_corpus(str(jl), 2)[1] != cid


@pytest.mark.parametrize("name,content", [("bad.jsonl", '{"text": "ok"}\n{not json}\n'),
                                          ("notext.jsonl", '{"body": "x"}\n'),
                                          ("empty.txt", "\n\n"),
                                          ("data.csv", "a,b\n"),
                                          ("binary.txt", b"\xff\xfe\x00bad")])
def test_bad_corpus_file_names_the_file(tmp_path, name, content):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CorpusError) as e:
        load_corpus(str(p), None)
    msg = str(e.value)
    assert str(p) in msg and "\n" not in msg


def test_missing_corpus_file(tmp_path):
    with pytest.raises(CorpusError, match="missing.txt"):
        load_corpus(str(tmp_path / "missing.txt"), None)


def test_get_stats_on_a_file_corpus(llama, tmp_path):
    jl = tmp_path / "mine.jsonl"
    ts = texts(3)
    jl.write_text("".join(json.dumps({"text": t}) + "\n" for t in ts))
    res = get_stats(llama, [1], corpus=str(jl), samples=None, max_length=MAXLEN, stats_dir=tmp_path / "s",
                    progress=False)
    want, n_tok = direct_moment(llama, 1, ts)
    torch.testing.assert_close(res[1], want, rtol=1e-5, atol=1e-7)
    assert res.info[1].corpus.startswith("mine:") and res.info[1].samples == 3
    assert os.path.basename(res.info[1].path).startswith("layer1-mine_")
