"""Trace and edit the inputs/outputs of named modules; stop a forward pass early.

Every method and the statistics code read activations through these context managers,
so hooks are always removed, even when the forward pass raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass once everything needed is recorded."""


def _first_tensor(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x


@contextmanager
def record(modules: Mapping[str, nn.Module], *, inputs: bool = True, stop_after: nn.Module | None = None,
           detach: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Record the first positional input (``inputs=True``) or the output of each module.

    ``stop_after``: raise :class:`StopForward` once that module has run (use
    :func:`run_until_stopped`).  The yielded dict fills in as the forward runs.
    """
    seen: dict[str, torch.Tensor] = {}
    handles = []

    def saver(name: str):
        def pre_hook(_mod, args):
            t = _first_tensor(args)
            seen[name] = t.detach() if detach else t

        def post_hook(_mod, _args, out):
            t = _first_tensor(out)
            seen[name] = t.detach() if detach else t
        return pre_hook if inputs else post_hook

    for name, mod in modules.items():
        handles.append(mod.register_forward_pre_hook(saver(name)) if inputs
                       else mod.register_forward_hook(saver(name)))
    if stop_after is not None:
        def stopper(_mod, _args, _out):
            raise StopForward
        handles.append(stop_after.register_forward_hook(stopper))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def run_until_stopped(fn: Callable[[], Any]) -> Any:
    """Call ``fn`` (a forward pass), treating :class:`StopForward` as normal completion."""
    try:
        return fn()
    except StopForward:
        return None


@contextmanager
def edit_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the module's (first) output tensor by ``fn(output)`` during the context."""

    def hook(_mod, _args, out):
        if isinstance(out, tuple):
            return (fn(out[0]), *out[1:])
        return fn(out)

    h = module.register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


@contextmanager
def edit_input(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the module's first positional input by ``fn(input)`` during the context."""

    def hook(_mod, args):
        return (fn(args[0]), *args[1:])

    h = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        h.remove()
