"""Reading the YAML file a run, training run or sweep directory keeps its configuration in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def read_dir_yaml(directory: str | Path, name: str, error: type[Exception], kind: str) -> Any:
    """The parsed ``directory/name``; a missing file or invalid YAML raises ``error`` with one
    line naming ``--resume directory`` (``kind``: what the directory should have been)."""
    f = Path(directory) / name
    if not f.is_file():
        raise error(f"--resume {directory}: no {name} (not a {kind} directory)")
    try:
        return yaml.safe_load(f.read_text())
    except yaml.YAMLError as e:
        raise error(f"--resume {directory}: {name} is not valid YAML ({str(e).splitlines()[0]})") from None
