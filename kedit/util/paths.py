"""Where kedit keeps things: the cache root, the statistics cache, the shipped configs and data."""

from __future__ import annotations

import os
from pathlib import Path


def kedit_home() -> Path:
    """Cache root for converted models and context prefixes (``KEDIT_HOME``, default ~/.cache/kedit)."""
    return Path(os.environ.get("KEDIT_HOME", Path.home() / ".cache" / "kedit")).expanduser()


def stats_dir(override: str | os.PathLike | None = None) -> Path:
    """Statistics cache (``--stats-dir``, else ``KEDIT_STATS_DIR``, else ``./stats``)."""
    if override:
        return Path(override)
    return Path(os.environ.get("KEDIT_STATS_DIR", "stats"))


def package_root() -> Path:
    """The installed ``kedit`` package folder."""
    return Path(__file__).resolve().parent.parent


def package_data() -> Path:
    return package_root() / "data"


def configs_dir() -> Path:
    """``configs/`` beside the package (editable installs, a clone); ``KEDIT_CONFIGS`` overrides."""
    env = os.environ.get("KEDIT_CONFIGS")
    if env:
        return Path(env)
    repo = package_root().parent / "configs"
    return repo if repo.is_dir() else package_root() / "configs"
