"""Record per-step signal and output changes of a full-compute pipeline run, per CFG branch.

The hooks read the signals through the runtime's own adapter (``runtime.adapters``) and measure
changes with the runtime's own ``rel_l1``, so ``x`` here is exactly what the runtime will see. Values
stay on the device as 0-d tensors during a run; the pipeline's end-of-call reset hands them to the
recorder (diffusers resets stateful hooks when a pipeline call ends), and :meth:`TraceRecorder.run`
reads everything to the host in one transfer.

Per call of a branch: ``timestep`` (as the transformer receives it), ``x`` (modulated-input rel-L1
against the previous call of the branch), ``x_temb`` (the same for the timestep embedding), ``y``
(transformer output rel-L1) and ``y_residual`` (block-stack residual rel-L1); NaN at the first step.
With ``lags=K > 0``, also ``x_lag`` and ``y_lag`` ([steps, K]): column k is the change against the call
``k + 1`` calls back (column 0 repeats ``x`` / ``y``; NaN where that call does not exist), what the
``teacache_drift`` rule is calibrated from.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState
from torch import nn

from runtime import intercept
from runtime.adapters import BlockCall, BlockLayout, adapter_for
from runtime.hooks import BranchStates, mark_steps, rel_l1, signal_reader
from runtime.parallel import block_local_arguments, context_parallel_group

MEASURED = ("timestep", "x", "x_temb", "y", "y_residual")
#: Changes also measured against several earlier calls (``lags > 0``): the field -> its lagged dataset.
LAGGED = {"x": "x_lag", "y": "y_lag"}
#: The default number of lags ``calibrate.record`` records (``drift_lags``).
DEFAULT_LAGS = 6
ROOT_HOOK = "trace_root"
_INTERCEPTORS = ("trace_stack", "trace_x", "trace_x_temb")


class TraceState(BaseState):
    """One branch's previous tensors and the device values measured so far (0-d, or [lags] for the lagged
    changes). ``lags`` is set on a subclass per recorder (the state manager makes states without arguments)."""

    lags = 0

    def __init__(self) -> None:
        self.previous: dict[str, torch.Tensor] = {}
        self.history: dict[str, list[torch.Tensor]] = {name: [] for name in LAGGED}  # newest last
        self.values: dict[str, list[torch.Tensor]] = {name: [] for name in (*MEASURED, *LAGGED.values())}
        self.stack_input: torch.Tensor | None = None

    def change(self, name: str, current: torch.Tensor, group: Any = None) -> None:
        """Append the rel-L1 change of ``current`` against the previous call's tensor of the same name.

        Under context parallelism (``group``), of the whole tensor that ``current`` is this rank's part of.
        """
        previous = self.previous.get(name)
        if previous is None or previous.shape != current.shape:
            value = torch.full((), float("nan"), dtype=torch.float32, device=current.device)
        else:
            value = rel_l1(current, previous, group)
        self.previous[name] = current.detach()
        self.values[name].append(value)
        if self.lags and name in LAGGED:
            history = self.history[name]
            lagged = [value]  # lag 1 is the change just measured
            for earlier in reversed(history[:-1]):
                lagged.append(rel_l1(current, earlier, group) if earlier.shape == current.shape else torch.full_like(value, float("nan")))
            lagged += [torch.full_like(value, float("nan"))] * (self.lags - len(lagged))
            self.values[LAGGED[name]].append(torch.stack(lagged))
            history.append(current.detach())
            del history[: -self.lags]

    def reset(self) -> None:
        self.__init__()


def _output_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        first = output[0]
        return first if isinstance(first, torch.Tensor) else torch.stack(list(first))
    return output.sample


class _RootHook(ModelHook):
    """On the transformer: the timestep going in, the output change coming out; flushes on reset."""

    _is_stateful = True

    def __init__(self, manager: BranchStates, sink: Callable[[dict[str, dict[str, list]]], None]) -> None:
        super().__init__()
        self.state_manager = manager
        self.sink = sink

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        self.state_manager.begin_call()  # outside a cache context: which call of the step this is
        timestep = BlockCall(module, args, kwargs).get("timestep")
        value = torch.as_tensor(timestep).detach().flatten()[0].to(torch.float32)
        self.state_manager.get_state().values["timestep"].append(value)
        return args, kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        self.state_manager.get_state().change("y", _output_tensor(output), context_parallel_group(module))
        return output

    def reset_state(self, module: nn.Module) -> nn.Module:
        # The pipeline resets stateful hooks when its call ends: hand the branches over, then forget.
        finished = {name: state.values for name, state in self.state_manager.states().items()}
        if finished:
            self.sink(finished)
        self.state_manager.reset()
        return module


def _stack_interceptor(
    transformer: nn.Module, manager: BranchStates, layout: BlockLayout, head: bool, tail: bool
) -> intercept.Interceptor:
    """On the first block: the stack input; on the last: the block-stack residual on the image stream."""

    def measure(block: nn.Module, call_next: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        state = manager.get_state()
        group = context_parallel_group(transformer)
        if head:  # as the block receives it: this rank's shard under context parallelism
            local_args, local_kwargs = block_local_arguments(block, args, kwargs) if group is not None else (args, kwargs)
            state.stack_input = BlockCall(block, local_args, local_kwargs).get("hidden_states")
        output = call_next(*args, **kwargs)
        if tail:
            state.change("y_residual", layout.residual(output, state.stack_input), group)
            state.stack_input = None
        return output

    return measure


class TraceRecorder:
    """Hooks a transformer (or each expert of a pipeline) so that each pipeline call yields per-branch
    traces; a context manager.

    Given a pipeline with two experts (Wan2.2's ``transformer`` and ``transformer_2``), each is recorded on
    its own; the second expert's branches are labelled ``"transformer_2.cond"``, ``"transformer_2.uncond"``.
    """

    def __init__(self, target: Any, lags: int = 0) -> None:
        from runtime.cache import pipeline_experts

        if not isinstance(lags, int) or isinstance(lags, bool) or lags < 0:
            raise ValueError(f"lags must be an integer >= 0 (0: no lagged changes), got {lags!r}.")
        self.lags = lags
        self.experts = pipeline_experts(target)
        self.transformer = self.experts["transformer"]
        self._finished: dict[str, list[dict[str, dict[str, list]]]] = {name: [] for name in self.experts}
        self._managers = [
            self._hook(transformer, self._finished[name].append, lags) for name, transformer in self.experts.items()
        ]
        # Calls made outside a cache context one after the other in a step (Chroma's CFG) are told apart
        # by their order within the step, as the runtime does.
        self._unmark_steps = mark_steps(getattr(target, "scheduler", None), lambda: self._managers)

    @staticmethod
    def _hook(transformer: nn.Module, sink: Callable[[dict], None], lags: int) -> BranchStates:
        adapter = adapter_for(transformer)
        blocks = adapter.blocks(transformer)
        (_, head), (_, tail) = blocks[0], blocks[-1]
        manager = BranchStates(type(TraceState.__name__, (TraceState,), {"lags": lags}))
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        registry.register_hook(_RootHook(manager, sink), ROOT_HOOK)
        for block in dict.fromkeys((head, tail)):  # one interceptor when the stack is a single block
            measure = _stack_interceptor(transformer, manager, adapter.layout(block), head=block is head, tail=block is tail)
            intercept.intercept(block, "trace_stack", measure)
        for signal, name in (("modulated_input", "x"), ("timestep_embedding", "x_temb")):
            source = adapter.signal_source(transformer, signal)
            record = lambda signal, name=name: manager.get_state().change(  # noqa: E731
                name, signal, context_parallel_group(transformer)
            )
            intercept.intercept(source.module, f"trace_{name}", signal_reader(source, record))
        registry.invalidate_child_registries_cache()
        return manager

    def run(self, call: Callable[[], Any]) -> dict[str, dict[str, np.ndarray]]:
        """Run ``call`` (one pipeline call) and return ``{branch: {field: float32 array per step}}``.

        All values of all branches come to the host in a single transfer after the call.
        """
        for finished in self._finished.values():
            finished.clear()
        call()
        branches: dict[str, dict[str, list]] = {}
        for expert, transformer in self.experts.items():
            finished = self._finished[expert]
            if not finished and not hasattr(transformer, "_reset_stateful_cache"):
                # diffusers resets stateful hooks at the end of a pipeline call only for CacheMixin models;
                # SD3, Z-Image, Lumina2 and HiDream have none, so hand their branches over here.
                transformer._diffusers_hook.reset_stateful_hooks()
            for branch, values in (finished[-1] if finished else {}).items():
                branches[branch if expert == "transformer" else f"{expert}.{branch}"] = values
        if not branches:
            raise RuntimeError(
                "the pipeline call ended without resetting its stateful hooks, so no trace was handed over; "
                "TraceRecorder needs a diffusers pipeline that calls maybe_free_model_hooks() at its end."
            )
        names = sorted(branches)
        lengths = {name: len(branches[name]["timestep"]) for name in names}
        fields = (*MEASURED, *LAGGED.values()) if self.lags else MEASURED
        values = [v.reshape(-1) for name in names for field in fields for v in branches[name][field]]
        flat = torch.cat(values).cpu().numpy()  # the one device-to-host read of the run
        out, offset = {}, 0
        for name in names:
            out[name] = {}
            n = lengths[name]
            for field in fields:
                width = self.lags if field in LAGGED.values() else 1
                if len(branches[name][field]) != n:
                    raise RuntimeError(f"branch {name!r} measured {len(branches[name][field])} values of {field} in {n} calls")
                block = flat[offset : offset + n * width].astype(np.float32)
                out[name][field] = block.reshape(n, width) if width > 1 or field in LAGGED.values() else block
                offset += n * width
            out[name]["step"] = np.arange(n, dtype=np.int32)
        return out

    def remove(self) -> None:
        self._unmark_steps()
        for transformer in self.experts.values():
            for module in transformer.modules():
                for name in _INTERCEPTORS:
                    intercept.release(module, name)
            registry = getattr(transformer, "_diffusers_hook", None)
            if registry is not None:
                registry.remove_hook(ROOT_HOOK, recurse=False)
                registry.invalidate_child_registries_cache()

    def __enter__(self) -> "TraceRecorder":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()
