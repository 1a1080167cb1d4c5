"""Trace and edit the inputs/outputs of named modules; stop a forward pass early; keep a
model's weights out of autograd for a block (:func:`frozen`).

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


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """No parameter of ``model`` requires grad inside the block; each flag is restored after
    (methods that optimise their own tensors keep the model's weights out of autograd)."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


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


@contextmanager
def replay_from(blocks: list[nn.Module], hidden: Callable[[], torch.Tensor], structure: Any) -> Iterator[None]:
    """Run a forward pass from ``blocks[-1]`` on, with the blocks before it skipped.

    ``blocks`` is ``[block_0, ..., block_L]``.  Blocks ``0..L-1`` become pass-throughs
    (their ``forward`` is replaced for the duration, no hook can skip them) and block ``L``
    receives ``hidden()`` -- the residual stream recorded before it on an earlier pass --
    as its input.  ``structure`` is an output of a real block (from the earlier pass):
    a pass-through returns the same shape of object (a tensor, or a tuple led by the
    hidden state, depending on the transformers version).  Use it when nothing below
    block L changes between passes (target optimisation edits block L and above only).
    """
    def passthrough(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if isinstance(structure, tuple):
            return (x, *([None] * (len(structure) - 1)))
        return x

    def feed(_mod: nn.Module, args: tuple, kwargs: dict) -> Any:
        if args:
            return (hidden(), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden()}

    skipped = blocks[:-1]
    saved = [b.__dict__.get("forward") for b in skipped]   # accelerate may have set one
    for b in skipped:
        b.forward = passthrough
    h = blocks[-1].register_forward_pre_hook(feed, with_kwargs=True)
    try:
        yield
    finally:
        h.remove()
        for b, old in zip(skipped, saved):
            if old is None:
                del b.forward
            else:
                b.forward = old
