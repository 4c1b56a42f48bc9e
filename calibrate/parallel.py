"""``calibrate.record`` under diffusers' context parallelism, launched with ``torchrun``.

    torchrun --nproc_per_node=2 -m calibrate.record model=qwen_image parallel.ulysses_degree=2

Every rank loads the same model, splits the sequence with ``transformer.enable_parallelism`` and runs
the same work list in lockstep (the collectives inside the model demand it); the recorder measures x
and y of the full tensors (``runtime.parallel``), so the traces equal a single-process recording.
Rank 0 alone owns the trace file: it takes the writer lock, decides what is left to record, tells the
other ranks, and writes each finished run crash-safe as a single process does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from runtime.errors import ConfigError


@dataclass(frozen=True)
class ParallelRun:
    ulysses_degree: int
    ring_degree: int
    rank: int
    local_rank: int

    @property
    def writes(self) -> bool:
        return self.rank == 0


def parallel_settings(cfg: Any) -> ParallelRun | None:
    """The context-parallel layout of ``parallel.*``, or None for a single process; checked before any loading."""
    settings = cfg.get("parallel") or {}
    degrees = {}
    for key in ("ulysses_degree", "ring_degree"):
        value = settings.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"parallel.{key} must be an integer >= 1, got {value!r}.")
        degrees[key] = value
    size = degrees["ulysses_degree"] * degrees["ring_degree"]
    if size == 1:
        return None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != size:
        raise ConfigError(
            f"parallel.ulysses_degree x parallel.ring_degree = {size} needs {size} processes, but this one sees "
            f"WORLD_SIZE={world}; launch it as `torchrun --nproc_per_node={size} -m calibrate.record ...`."
        )
    if cfg.num_shards != 1:
        raise ConfigError("parallel.* splits one run across GPUs; combine it with num_shards=1 only (shard the work across separate torchrun jobs instead).")
    return ParallelRun(degrees["ulysses_degree"], degrees["ring_degree"], int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")))


def start(run: ParallelRun, device: str) -> str:
    """Join the process group; returns this rank's device (its own GPU, or the CPU)."""
    import torch
    import torch.distributed as dist

    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{run.local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


def enable(transformer: Any, run: ParallelRun, device: str) -> None:
    """Split the transformer's sequence over the ranks, as diffusers' own distributed inference does."""
    import torch
    from diffusers import ContextParallelConfig

    if not device.startswith("cuda"):
        if run.ring_degree > 1:
            raise ConfigError(
                "ring attention needs the attention's log-sum-exp, which CPU attention backends lack; on CPU use "
                "parallel.ulysses_degree only (or record on GPUs)."
            )
        # diffusers divides by the accelerator count, which CPU torch reports as 0 (a diffusers limitation):
        # one process per "device" is what a CPU rank is.
        if torch.accelerator.device_count() == 0:
            torch.accelerator.device_count = lambda: 1
        transformer.set_attention_backend("native")
    transformer.enable_parallelism(
        config=ContextParallelConfig(ulysses_degree=run.ulysses_degree, ring_degree=run.ring_degree)
    )


def share(run: ParallelRun, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (an exception raised on rank 0 is re-raised everywhere)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], ConfigError) and not run.writes:
        raise ConfigError(f"rank 0 stopped: {box[0]}")
    return box[0]


def finish() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
