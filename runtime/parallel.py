"""TeaCache under diffusers' context parallelism (``transformer.enable_parallelism(...)``, Ulysses or ring).

Context parallelism splits the token sequence across ranks, where the model's ``_cp_plan`` says:
at the transformer's input (Flux), or inside the first block's call (QwenImage, Wan: a split hook in
the block's diffusers ``HookRegistry``). The runtime's head interceptor sits outside the block's
call, so it may see the full sequence or a shard. Three rules make every rank agree:

- x is the relative L1 change of the *whole* signal: ``sum|a - b|`` and ``sum|b|`` are all-reduced
  over the context-parallel group before the division (identical on every rank whether each rank
  holds a shard or the full tensor; the means' ratio is the sums' ratio);
- the skip decision is all-reduced with MIN, so a rank can never skip while another computes;
- the cached residual is each rank's own shard: the head applies the block's own split hooks to the
  block's arguments, so stack input and tail output are the same shard.

Nothing here runs when the transformer has no context-parallel group of more than one rank.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def context_parallel_group(transformer: nn.Module) -> Any | None:
    """The process group the transformer's sequence is split over, or None (no split, or one rank)."""
    config = getattr(transformer, "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None)
    mesh = getattr(cp, "_flattened_mesh", None)
    if mesh is None or mesh.size() < 2:
        return None
    return mesh.get_group()


def rel_l1_across(current: torch.Tensor, previous: torch.Tensor, group: Any) -> torch.Tensor:
    """rel-L1 of the whole tensors that ``current`` and ``previous`` are this rank's parts of."""
    import torch.distributed as dist

    sums = torch.stack(
        ((current - previous).abs().sum(dtype=torch.float32), previous.abs().sum(dtype=torch.float32))
    )
    dist.all_reduce(sums, group=group)
    return sums[0] / sums[1]


def agree_on_skip(skip: torch.Tensor, group: Any) -> torch.Tensor:
    """True only where every rank would skip."""
    import torch.distributed as dist

    agreed = skip.to(torch.int32)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)
    return agreed.bool()


def block_local_arguments(block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The block's arguments as its forward receives them: after the context-parallel split hooks
    registered on the block itself (none: returned as they are)."""
    from diffusers.hooks.context_parallel import ContextParallelSplitHook

    registry = getattr(block, "_diffusers_hook", None)
    if registry is None:
        return args, kwargs
    # The hook registered last wraps the others, so its pre_forward runs first.
    for name in reversed(registry._hook_order):
        hook = registry.hooks[name]
        if isinstance(hook, ContextParallelSplitHook):
            args, kwargs = hook.pre_forward(block, *args, **dict(kwargs))
    return args, kwargs
