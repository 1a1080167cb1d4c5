"""Where this process stands in a multi-process launch (``torchrun``, ``accelerate launch``).

Both launchers start N copies of ``python -m kedit ...`` and tell each its place through
the environment: ``RANK`` (0 .. N-1 over every machine), ``LOCAL_RANK`` (on this machine),
``WORLD_SIZE`` (N), and ``MASTER_ADDR`` / ``MASTER_PORT`` for the rendezvous.  Without
them (or with ``WORLD_SIZE=1``) the process is alone: every method here is then a no-op,
so single-process code paths do not change.

:meth:`Launch.group` joins the process group through ``torch.distributed`` (``nccl`` when
the process runs on a CUDA device, else ``gloo``); the process on rank 0 is the main one
(it writes what is shared and prints).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch

#: How long a process waits at a barrier: the others may be computing layer statistics
#: (hours for a large model and corpus) or finishing a bigger share of the cases.
WAIT = timedelta(hours=24)


class LaunchError(ValueError):
    """An unusable launcher environment (one line)."""


@dataclass(frozen=True)
class Launch:
    """This process's place: ``rank`` of ``world`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Launch:
        env = os.environ if env is None else env
        values = {}
        for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", None)):
            raw = env.get(key, default if default is not None else env.get("RANK", "0"))
            try:
                values[key] = int(raw)
            except ValueError:
                raise LaunchError(f"{key}={raw!r}: not an integer (set by torchrun / accelerate launch)") from None
        rank, world, local = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
        if world < 1 or not 0 <= rank < world or local < 0:
            raise LaunchError(f"RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}: not a valid launch")
        return cls(rank, world, local)

    @property
    def main(self) -> bool:
        """The process that writes shared files and prints (rank 0)."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world > 1

    def device(self, requested: str) -> str:
        """The device this process uses: with several processes ``auto`` and ``cuda`` (or
        ``cuda:N``) mean ``cuda:LOCAL_RANK`` — each process its own accelerator — and
        ``auto`` without CUDA means ``cpu``."""
        if not self.sharded:
            return requested
        kind = requested.split(":")[0]
        if kind == "auto":
            kind = "cuda" if torch.cuda.is_available() else "cpu"
        return f"cuda:{self.local_rank}" if kind == "cuda" else requested

    @contextmanager
    def group(self, device: str) -> Iterator[Launch]:
        """Join the process group for the block (nothing to do when alone)."""
        import torch.distributed as dist

        if not self.sharded or dist.is_initialized():
            yield self
            return
        import inspect

        cuda = torch.device(device).type == "cuda"
        bind = {}
        if cuda:
            torch.cuda.set_device(torch.device(device))
            if "device_id" in inspect.signature(dist.init_process_group).parameters:   # torch >= 2.3
                bind["device_id"] = torch.device(device)
        dist.init_process_group("nccl" if cuda else "gloo", rank=self.rank, world_size=self.world, timeout=WAIT,
                                **bind)
        try:
            yield self
        finally:
            dist.destroy_process_group()

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.sharded:
            import torch.distributed as dist

            dist.barrier()

    def share(self, value):
        """The main process's ``value``, on every process (a small picklable object)."""
        if not self.sharded:
            return value
        import torch.distributed as dist

        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """The main process runs the block first (filling caches: a converted model, layer
        statistics, context prefixes); the others run it after, and find the caches."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()
