"""TeaCache on diffusers' hook system, built the way diffusers' FirstBlockCache is.

Three hooks, one role each, sharing one ``StateManager`` (so each cache context, "cond" or
"uncond", has its own :class:`TeaCacheState`, and the pipeline resets them after each generation):

- :class:`TeaCacheHeadHook` on the first block decides: it computes the signal and its change, runs
  the decision on the device with one device-to-host read, and on a skip returns the block-stack
  input plus the cached residual in place of the first block's output;
- :class:`TeaCacheBlockHook` on every other block passes its input through on a skip; the tail
  block's hook stores ``residual = stack output - stack input`` on a computed call;
- :class:`SignalHook` reads the signal where the model's adapter says it lives (the first block's
  arguments for the modulated input, a submodule's output for the timestep embedding).

The model's own ``norm_out``/``proj_out`` still run on a skipped call.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from torch import nn

from .adapters import BlockCall, BlockLayout, ModelAdapter, SignalSource, adapter_for
from .decision import FIRST, MAX_SKIPS, NONFINITE, SHAPE_CHANGE, SKIPPED, THRESHOLD, DecisionRule
from .errors import TeaCacheError, UnsupportedModelError
from .stats import CacheStats, StepRecord

logger = logging.getLogger(__name__)

HEAD_HOOK = "teacache_head"
BLOCK_HOOK = "teacache_block"
SIGNAL_HOOK = "teacache_signal"
_ALL_HOOKS = (HEAD_HOOK, BLOCK_HOOK, SIGNAL_HOOK)

NumStepsProvider = Callable[[], "int | None"]


def rel_l1(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """mean(|current - previous|) / mean(|previous|) as a 0-d float32 tensor on the inputs' device."""
    change = torch.mean((current - previous).abs(), dtype=torch.float32)
    return change / torch.mean(previous.abs(), dtype=torch.float32)


class TeaCacheState(BaseState):
    """Everything that changes within one generation of one cache context (CFG branch)."""

    def __init__(self) -> None:
        self.step = 0
        self.num_steps: int | None = None
        self.consecutive_skips = 0
        self.skipping = False
        self.accumulator: torch.Tensor | None = None
        self.previous_signal: torch.Tensor | None = None
        self.signal: torch.Tensor | None = None  # this call's, read by the SignalHook
        self.stack_input: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None

    def reset(self) -> None:
        self.__init__()


def current_state(manager: StateManager) -> BaseState:
    """This context's state, or a clear error when the transformer is called outside any cache context."""
    if manager._context is None:
        raise TeaCacheError(
            "the transformer was called outside a cache context, so TeaCache cannot tell CFG branches apart; "
            "call it through its diffusers pipeline, or wrap the call in `with transformer.cache_context('cond'):`."
        )
    return manager.get_state()


class SignalHook(ModelHook):
    """Reads this call's signal where the adapter's :class:`SignalSource` says, and hands it on.

    ``on_signal(state, signal)`` receives it: the runtime keeps it for the head hook; the calibration
    recorder measures its change with the same hook, so both read exactly the same tensor.
    """

    _is_stateful = True

    def __init__(
        self,
        state_manager: StateManager,
        source: SignalSource,
        on_signal: Callable[[BaseState, torch.Tensor], None] = lambda state, signal: setattr(state, "signal", signal),
    ) -> None:
        super().__init__()
        self.state_manager = state_manager
        self.source = source
        self.on_signal = on_signal

    def _read(self, call: BlockCall, output: Any) -> None:
        with torch.no_grad():
            signal = self.source.read(call, output)
        self.on_signal(current_state(self.state_manager), signal)

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        if self.source.before:
            self._read(BlockCall(module, args, kwargs), None)
        return args, kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        if not self.source.before:
            self._read(BlockCall(module, (), {}), output)
        return output

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.state_manager.reset()
        return module


class TeaCacheHeadHook(ModelHook):
    """On the first block: measure the signal change, decide, and skip the stack or run it."""

    _is_stateful = True

    def __init__(
        self,
        state_manager: StateManager,
        rule: DecisionRule,
        adapter: ModelAdapter,
        signal: str,
        layout: BlockLayout,
        stats: CacheStats,
        num_steps: NumStepsProvider,
        is_tail: bool,
    ) -> None:
        super().__init__()
        self.state_manager = state_manager
        self.rule = rule
        self.adapter = adapter
        self.signal = signal
        self.layout = layout
        self.stats = stats
        self.num_steps = num_steps
        self.is_tail = is_tail
        self._warned_no_step_count = False

    def _signal(self, state: TeaCacheState) -> torch.Tensor:
        signal, state.signal = state.signal, None
        if signal is None:
            raise TeaCacheError(
                f"the {self.signal.replace('_', ' ')} was not read before the first block ran; the adapter of "
                f"{self.adapter.transformer_class} in runtime/adapters.py names a module this call does not run "
                "before its blocks."
            )
        return signal

    def _start_generation(self, state: TeaCacheState) -> None:
        context = self.state_manager._context
        state.num_steps = context.num_inference_steps if context.num_inference_steps is not None else self.num_steps()
        if state.num_steps is None and self.rule.final_steps > 0 and not self._warned_no_step_count:
            self._warned_no_step_count = True
            logger.warning(
                "TeaCache cannot force the final %d step(s): the step count is unknown; apply the cache to the "
                "pipeline, or pass num_inference_steps= to apply().",
                self.rule.final_steps,
            )

    def signal_change(self, signal: torch.Tensor, previous: torch.Tensor, state: TeaCacheState) -> torch.Tensor:
        """x: the relative L1 change of the signal against the branch's previous call (0-d, on the device)."""
        return rel_l1(signal, previous)

    @torch.compiler.disable
    def new_forward(self, block: nn.Module, *args: Any, **kwargs: Any) -> Any:
        state = current_state(self.state_manager)
        context = self.state_manager._context
        if context.step_index == 0 and state.step > 0:
            state.reset()  # a new generation started without the pipeline's end-of-call reset
        if state.step == 0:
            self._start_generation(state)

        call = BlockCall(block, args, kwargs)
        hidden_states = call.get("hidden_states")
        signal = self._signal(state)

        reason = self.rule.scheduled_reason(state.step, state.num_steps)
        if reason is None and self.rule.cap_reached(state.consecutive_skips):
            reason = MAX_SKIPS
        if reason is None and state.residual is None:
            reason = FIRST
        previous = state.previous_signal
        shape_changed = (previous is not None and previous.shape != signal.shape) or (
            state.residual is not None and state.residual.shape != hidden_states.shape
        )
        if shape_changed:
            reason = SHAPE_CHANGE
        if previous is None or shape_changed:
            x = torch.full((), float("nan"), dtype=torch.float32, device=signal.device)
        else:
            x = self.signal_change(signal, previous, state)
        if state.accumulator is None:
            state.accumulator = torch.zeros((), dtype=torch.float32, device=signal.device)

        p, candidate, skip, state.accumulator = self.rule.accumulate(x, state.accumulator, reason is not None)
        # The one device-to-host read of this call: the decision and its numbers for `stats`.
        x_value, p_value, acc_value, skip_value = torch.stack((x, p, candidate, skip.float())).tolist()
        skipping = skip_value > 0.5
        if reason is None:
            finite = math.isfinite(x_value) and math.isfinite(acc_value)
            reason = SKIPPED if skipping else (THRESHOLD if finite else NONFINITE)
        self.stats.record(
            context.name, StepRecord(state.step, x_value, p_value, acc_value, not skipping, reason)
        )

        state.previous_signal = signal
        state.step += 1
        state.skipping = skipping
        if skipping:
            state.consecutive_skips += 1
            return self.layout.pack(hidden_states + state.residual, call.get("encoder_hidden_states"))

        state.consecutive_skips = 0
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.is_tail:
            state.residual = self.layout.hidden_states(output) - hidden_states
        else:
            state.stack_input = hidden_states
        return output

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.state_manager.reset()
        return module


class TeaCacheBlockHook(ModelHook):
    """On every other block: pass the input through on a skip; the tail stores the residual."""

    def __init__(self, state_manager: StateManager, layout: BlockLayout, is_tail: bool) -> None:
        super().__init__()
        self.state_manager = state_manager
        self.layout = layout
        self.is_tail = is_tail

    @torch.compiler.disable
    def new_forward(self, block: nn.Module, *args: Any, **kwargs: Any) -> Any:
        state = current_state(self.state_manager)
        if state.skipping:
            call = BlockCall(block, args, kwargs)
            encoder = call.get("encoder_hidden_states") if self.layout.encoder_hidden_states_index is not None else None
            return self.layout.pack(call.get("hidden_states"), encoder)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.is_tail:
            state.residual = self.layout.hidden_states(output) - state.stack_input
            state.stack_input = None
        return output


def apply_teacache(
    transformer: nn.Module,
    rule: DecisionRule,
    signal: str,
    stats: CacheStats,
    num_steps: NumStepsProvider = lambda: None,
    head_hook: Callable[..., TeaCacheHeadHook] | None = None,
) -> None:
    """Register the TeaCache hooks on ``transformer``; undo with :func:`remove_teacache`.

    ``head_hook`` may name a :class:`TeaCacheHeadHook` subclass (or factory) that measures the signal
    change differently, e.g. the sweep's oracle; the decision rule and everything else stay the same.
    """
    adapter = adapter_for(transformer)
    if is_applied(transformer):
        raise TeaCacheError(
            f"TeaCache is already applied to this {type(transformer).__name__}; call .remove() on the cache "
            "that applied it first."
        )
    if getattr(transformer, "is_cache_enabled", False):
        raise UnsupportedModelError(
            f"another diffusers cache ({type(transformer._cache_config).__name__}) is enabled on this "
            f"{type(transformer).__name__}; call transformer.disable_cache() before applying TeaCache."
        )
    blocks = adapter.blocks(transformer)
    layouts = [adapter.layout(block) for _, block in blocks]  # fail before registering anything
    source = adapter.signal_source(transformer, signal)
    manager = StateManager(TeaCacheState)

    (_, head), *rest = blocks
    make_head = head_hook or TeaCacheHeadHook
    _register(head, make_head(manager, rule, adapter, signal, layouts[0], stats, num_steps, is_tail=not rest), HEAD_HOOK)
    for i, (_, block) in enumerate(rest, start=1):
        _register(block, TeaCacheBlockHook(manager, layouts[i], is_tail=i == len(blocks) - 1), BLOCK_HOOK)
    # Registered last, so on the head block it wraps the head hook and reads the signal before it.
    _register(source.module, SignalHook(manager, source), SIGNAL_HOOK)
    _invalidate_registry_cache(transformer)


def is_applied(transformer: nn.Module) -> bool:
    return any(
        getattr(module, "_diffusers_hook", None) is not None and module._diffusers_hook.get_hook(HEAD_HOOK) is not None
        for module in transformer.modules()
    )


def remove_teacache(transformer: nn.Module) -> None:
    """Remove every TeaCache hook, and the registries and forward wrappers that only they needed."""
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None or not any(name in registry.hooks for name in _ALL_HOOKS):
            continue
        for name in _ALL_HOOKS:
            registry.remove_hook(name, recurse=False)
        if not registry.hooks and getattr(registry, "_teacache_created", False):
            del module._diffusers_hook
            # remove_hook leaves the class's forward bound as an instance attribute; drop it.
            bound = module.__dict__.get("forward")
            if getattr(bound, "__func__", None) is type(module).forward:
                del module.forward
    _invalidate_registry_cache(transformer)


def _register(module: nn.Module, hook: ModelHook, name: str) -> None:
    existed = hasattr(module, "_diffusers_hook")
    registry = HookRegistry.check_if_exists_or_initialize(module)
    if not existed:
        registry._teacache_created = True
    registry.register_hook(hook, name)


def _invalidate_registry_cache(transformer: nn.Module) -> None:
    # Context updates walk a cached list of child registries; adding or removing hooks stales it.
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is not None:
        registry.invalidate_child_registries_cache()
