"""Several processes started by torchrun (``torchrun --nproc-per-node N gsae train ...``).

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` and the rendezvous address;
without them everything here is the single-process identity.  Only small Python objects travel between
ranks (SAE states at checkpoints, metrics records), over gloo, which works on CPUs and beside CUDA.
"""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def first(self) -> bool:
        return self.rank == 0

    def gather_to_first(self, part: dict[int, Any]) -> dict[int, Any] | None:
        """Every rank's ``part`` merged into one dict on rank 0 (None on the others)."""
        if self.world == 1:
            return dict(part)
        import torch.distributed as dist

        parts: list[Any] | None = [None] * self.world if self.first else None
        dist.gather_object(part, parts, dst=0)
        if not self.first:
            return None
        merged: dict[int, Any] = {}
        for item in parts:
            merged.update(item)
        return merged

    def broadcast_from_first(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank; the others wait here until rank 0 sends it."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value if self.first else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def device(self, device: torch.device) -> torch.device:
        """Each rank's own GPU (``cuda:LOCAL_RANK``, ranks sharing the GPUs in turn when a machine runs
        more ranks than it has GPUs); the CPU stays the CPU."""
        if device.type == "cuda" and self.world > 1:
            index = self.local_rank % torch.cuda.device_count()
            torch.cuda.set_device(index)
            return torch.device("cuda", index)
        return device

    def threads(self) -> int:
        """This rank's share of the cores this process may use (ranks on one machine split them; a CPU quota
        counts: :func:`stores.chunk_files.usable_cores`)."""
        from stores.chunk_files import usable_cores

        return max(1, usable_cores() // self.local_world)

    def decode_threads(self, cache: str) -> int:
        """Threads decoding chunks of ``cache`` (for every stream of a run, or an evaluation): this rank's
        share of the cores, and four times as many for a remote cache, whose reads wait on the network
        rather than on a core."""
        from stores import is_local

        return self.threads() * (1 if is_local(cache) else 4)


def current() -> Ranks:
    """The ranks of this process: torchrun's, with the process group started, or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    import torch.distributed as dist

    if not dist.is_initialized():
        # torch's default 30-minute timeout would fail a rank that waits at a gather while another still
        # works (a resumed cache where one rank has most chunks left); torchrun stops the job if one dies
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
        # destroyed before the interpreter tears down (as PyTorch asks): once, under -n 2 load of the tests, a
        # rank died at exit with "terminate called without an active exception" (SIGABRT) after its work
        atexit.register(_destroy_process_group)
    return Ranks(rank=dist.get_rank(), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                 local_world=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def assign(costs: list[float], world: int) -> list[int]:
    """The rank of each job: longest first, each to the least loaded rank (ties: the lowest rank), so the
    ranks' total costs are balanced and every job is wholly on one rank."""
    loads = [0.0] * world
    owner = [0] * len(costs)
    for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        owner[job] = rank
        loads[rank] += costs[job]
    return owner
