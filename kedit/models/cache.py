"""The key/value cache argument of a model's forward, under either of its names.

transformers up to 5.1x calls it ``past_key_values``; later versions call it ``cache``
(the old name is deprecated, and ``generate`` passes the new one).  Code that reads the
argument from a forward's keyword arguments (edits that wrap a forward) or passes it
(kedit's own decoding loop) asks here, so that both versions behave the same.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

__all__ = ["cache_arg", "cache_of", "drop_cache", "is_fresh", "new_cache", "takes_cache"]

_NAMES = ("cache", "past_key_values")


def cache_arg(forward: Callable[..., Any]) -> str:
    """The name under which ``forward`` takes the cache (its signature decides)."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def takes_cache(forward: Callable[..., Any]) -> bool:
    """Whether ``forward`` takes a cache at all, under either name."""
    params = inspect.signature(forward).parameters
    return any(name in params for name in _NAMES)


def drop_cache(kwargs: dict[str, Any]) -> None:
    """Remove the cache from ``kwargs``, under either name."""
    for name in _NAMES:
        kwargs.pop(name, None)


def cache_of(kwargs: dict[str, Any]) -> Any:
    """The cache passed in ``kwargs`` under either name (None when there is none)."""
    for name in _NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def is_fresh(cache: Any) -> bool:
    """True when ``cache`` holds nothing yet (no cache at all, or an empty one): the call
    is the first of a sequence."""
    return cache is None or (hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0)


def new_cache(model: Any) -> Any:
    """An empty dynamic cache for ``model``, built from its text config as ``generate``
    builds it (sliding-window layers included), or a plain one on versions without that."""
    from transformers import DynamicCache

    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    try:
        return DynamicCache(config=get_text(decoder=True) if get_text else config)
    except TypeError:
        return DynamicCache()
