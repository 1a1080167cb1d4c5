"""bench/bench_gpu.py runs only on CUDA; here: it imports, --help works, no CUDA is one
line and exit 2, and its model shapes have the published sizes (built on the meta device)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_gpu.py"


@pytest.fixture()
def bench_gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_and_no_cuda(bench_gpu, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["bench_gpu.py", "--help"])
    with pytest.raises(SystemExit) as e:
        bench_gpu.main()
    assert e.value.code == 0 and "--memit" in capsys.readouterr().out
    monkeypatch.setattr("sys.argv", ["bench_gpu.py"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        bench_gpu.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no CUDA device" in err and len(err.strip().splitlines()) == 1


def test_shapes_have_the_published_sizes(bench_gpu):
    sizes = {"gpt2-xl": 1.558e9, "gpt-j-6b": 6.05e9, "llama-3-8b": 8.03e9}
    for name, (config, _) in bench_gpu.shape_configs().items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        n = sum(p.numel() for p in model.parameters())
        assert n == pytest.approx(sizes[name], rel=0.01), name
