"""TeaCache on a diffusers transformer: one decision per transformer call, outside compiled regions.

Three parts, one role each:

- :class:`TeaCacheState`: everything that changes within one generation of one cache context (CFG
  branch), kept by a diffusers ``StateManager`` (:class:`BranchStates`), so "cond" and "uncond" each
  have their own; a call made outside any cache context uses one state, ``"default"``.
- :class:`TeaCacheContextHook`: a stateful ``ModelHook`` in the transformer's diffusers
  ``HookRegistry``. It is how ``transformer.cache_context(...)`` reaches the state manager and how the
  pipeline's end-of-call reset clears it; it runs the forward unless the call needs nothing of the model
  (below).
- :class:`TeaCacheRunner`: the work, at the calls of the block stack and of the signal's module,
  through :mod:`runtime.intercept` (the class's ``__call__``, outside any region ``torch.compile`` made
  of a block, so regional compilation keeps its speed and ``fullgraph=True`` works):

  - the signal's module: this call's signal, read where the model's adapter says it lives;
  - the head block: the decision, with one device-to-host read; on a skip it returns the stack
    input plus the cached residual (``forecast="linear"``: extrapolated from the last two) in place of
    the head's output;
  - every other block: passes its input through on a skip; the tail stores
    ``residual = stack output - stack input`` on a computed call.

The model's own ``norm_out``/``proj_out`` still run on a skipped call. With an output forecast
(``output_linear``, ``output_corrected``: :mod:`runtime.forecasts`) the context hook's ``post_forward`` then
replaces a skipped call's output by the forecast, and keeps (and, corrected, adjusts) a computed call's. A
schedule rule (``fixed_schedule``, ``searched_schedule``) under an output forecast needs neither the signal nor
the model on a call its schedule skips, so there the context hook runs nothing of the model
(:meth:`TeaCacheRunner.skip_call`). A call that raised inside the stack leaves its state marked unfinished, and
the next call of that state starts a clean generation.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from torch import nn

from . import controlnet, intercept
from .adapters import BlockCall, BlockLayout, ModelAdapter, SignalSource, adapter_for
from .coefficients import SIGNALS
from .decision import FIRST, MAX_SKIPS, NONFINITE, SHAPE_CHANGE, SKIPPED, THRESHOLD, DecisionRule
from .errors import ConfigError, TeaCacheError, UnsupportedModelError
from .forecasts import (
    OUTPUT_FORECASTS, BranchHistories, OutputHistory, SamplerWeights, corrects, euler_sigma_step, lands_multistep, refuse_correction, sample_of,
    with_sample,
)
from .parallel import agree_on_skip, block_local_arguments, context_parallel_group, rel_l1_across
from .settings import SCHEDULE_RULES
from .stats import CacheStats, StepRecord

logger = logging.getLogger(__name__)

CONTEXT_HOOK = "teacache"
HEAD, BLOCK, SIGNAL = "teacache_head", "teacache_block", "teacache_signal"
DEFAULT_BRANCH = "default"

NumStepsProvider = Callable[[], "int | None"]
SignalChange = Callable[[torch.Tensor, torch.Tensor, "TeaCacheState", str], torch.Tensor]


def rel_l1(current: torch.Tensor, previous: torch.Tensor, group: Any = None) -> torch.Tensor:
    """mean(|current - previous|) / mean(|previous|) as a 0-d float32 tensor on the inputs' device.

    Under context parallelism (``group``, see :func:`runtime.parallel.context_parallel_group`), that of the
    whole tensors this rank's ``current`` and ``previous`` are parts of.
    """
    if group is not None:
        return rel_l1_across(current, previous, group)
    change = torch.mean((current - previous).abs(), dtype=torch.float32)
    return change / torch.mean(previous.abs(), dtype=torch.float32)


class BranchStates(StateManager):
    """diffusers' ``StateManager``, plus states for calls made outside any cache context.

    Models without ``CacheMixin`` (SD3, Z-Image, HiDream) and bare sampling loops have no context, and
    most batch CFG into one call: one state, ``"default"``. Some pipelines make their cond and uncond
    calls one after the other without a context (Chroma, Lumina2, Cosmos2, Flux img2img/Kontext with
    true CFG, SD3's skip-layer call): with ``split_calls`` (set when the pipeline's ``scheduler.step``
    marks the steps, see :func:`mark_steps`) the k-th call of a step gets its own state,
    ``"default"``, ``"default:1"``, ..., so each branch is compared with its own previous call.
    """

    def __init__(self, state_cls: type[BaseState]) -> None:
        super().__init__(state_cls)
        self._make_state = state_cls
        self.split_calls = False
        self._calls_in_step = 0
        self._label = DEFAULT_BRANCH
        self._outside: dict[str, BaseState] = {}  # states of calls made outside any cache context
        self._inside: dict[str, BaseState] = {}  # the context states handed out (for :meth:`states`)

    @property
    def current_context(self) -> Any:
        """The pipeline's cache context of this call, or None (diffusers' public ``context`` raises then)."""
        try:
            return self.context
        except ValueError:
            return None

    @property
    def branch(self) -> str:
        context = self.current_context
        return context.name if context is not None else self._label

    def begin_call(self) -> None:
        """A transformer call starts: outside a context, which call of the step it is."""
        if self.current_context is None and self.split_calls:
            index, self._calls_in_step = self._calls_in_step, self._calls_in_step + 1
            self._label = DEFAULT_BRANCH if index == 0 else f"{DEFAULT_BRANCH}:{index}"
        else:
            self._label = DEFAULT_BRANCH

    def new_step(self) -> None:
        self._calls_in_step = 0

    def get_state(self) -> BaseState:
        context = self.current_context
        if context is None:
            if self._label not in self._outside:
                self._outside[self._label] = self._make_state()
            return self._outside[self._label]
        state = super().get_state()
        self._inside[context.name] = state
        return state

    def reset(self, *args: Any, **kwargs: Any) -> None:
        super().reset(*args, **kwargs)
        for state in self._outside.values():
            state.reset()
        self._outside.clear()
        self._inside.clear()
        self._calls_in_step = 0
        self._label = DEFAULT_BRANCH

    def states(self) -> dict[str, BaseState]:
        """Every branch's state of the current generation."""
        return {**self._inside, **self._outside}


def run_before(owner: Any, name: str, before: Callable[[], None]) -> Callable[[], None] | None:
    """Make ``owner.name(...)`` call ``before()`` first, as an instance attribute (the class is untouched and
    the signature stays inspectable: pipelines inspect ``set_timesteps``'s). Returns the function that
    undoes it, or None when ``owner`` has no such method or it is wrapped already."""
    method = getattr(owner, name, None)
    if method is None or name in vars(owner):
        return None

    @functools.wraps(method)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        before()
        return method(*args, **kwargs)

    setattr(owner, name, wrapped)
    return lambda: owner.__dict__.pop(name, None)


def mark_steps(scheduler: Any, managers: Callable[[], list[BranchStates]]) -> Callable[[], None]:
    """Let ``scheduler.step`` (called once per denoising step by every diffusers pipeline) mark the step
    boundaries for ``managers()``, which then split calls made outside a cache context by their order
    within the step. Returns the function that undoes it (a no-op when there is nothing to mark)."""

    def new_step() -> None:
        for manager in managers():
            manager.new_step()

    unwrap = run_before(scheduler, "step", new_step)
    if unwrap is None:
        return lambda: None
    for manager in managers():
        manager.split_calls = True

    def undo() -> None:
        unwrap()
        for manager in managers():
            manager.split_calls = False

    return undo


class TeaCacheState(BaseState):
    """Everything that changes within one generation of one cache context (CFG branch)."""

    def __init__(self) -> None:
        self.step = 0
        self.num_steps: int | None = None
        self.consecutive_skips = 0
        self.accumulator: torch.Tensor | None = None
        self.previous_signal: torch.Tensor | None = None
        self.anchor_signal: torch.Tensor | None = None  # teacache_drift: the signal of the last computed call
        self.residual: torch.Tensor | None = None
        self.residual_step = -1  # the step whose computed call stored `residual`
        self.previous_residual: torch.Tensor | None = None  # forecast linear: the computed residual before it
        self.previous_residual_step = -1
        self.unfinished = False  # a computed call entered the stack and has not stored its residual yet
        self.output_history = OutputHistory()  # output forecasts: the computed outputs (runtime.forecasts)
        self.step_offset = 0  # with experts sharing histories: the generation's step at this expert's first call
        self.output_template: Any = None  # the last computed output's container (TeaCacheRunner.skip_call)

    def reset(self) -> None:
        self.__init__()


class TeaCacheContextHook(ModelHook):
    """In the transformer's HookRegistry: receives the cache context and the pipeline's reset."""

    _is_stateful = True

    def __init__(
        self, state_manager: BranchStates, on_output: Callable[[Any], Any], skip_call: Callable[[], Any | None]
    ) -> None:
        super().__init__()
        self.state_manager = state_manager
        self.on_output = on_output
        self.skip_call = skip_call

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        skipped = self.skip_call()  # a call nothing of the model needs to run for
        return skipped if skipped is not None else self.fn_ref.original_forward(*args, **kwargs)

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        return self.on_output(output)

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.state_manager.reset()
        return module


def signal_reader(source: SignalSource, on_signal: Callable[[torch.Tensor], None]) -> intercept.Interceptor:
    """An interceptor that reads the signal where ``source`` says and hands it to ``on_signal``.

    The runtime keeps it for the decision; the calibration recorder records its change: both read
    exactly the same tensor through the same adapter code.
    """

    def read(module: nn.Module, call_next: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if source.before:
            with torch.no_grad():
                on_signal(source.read(BlockCall(module, args, kwargs), None))
            return call_next(*args, **kwargs)
        output = call_next(*args, **kwargs)
        with torch.no_grad():
            on_signal(source.read(BlockCall(module, (), {}), output))
        return output

    return read


class TeaCacheRunner:
    """The interceptors on the signal's module and the block stack, and the decision between them."""

    def __init__(
        self,
        transformer: nn.Module,
        state_manager: BranchStates,
        rule: DecisionRule,
        adapter: ModelAdapter,
        signal: str,
        source: SignalSource,
        layouts: list[BlockLayout],
        stats: CacheStats,
        num_steps: NumStepsProvider,
        signal_change: SignalChange | None = None,
        forecast: Callable[[], str] | None = None,
        scheduler: Any = None,
        histories: BranchHistories | None = None,
    ) -> None:
        self.transformer = transformer
        self.state_manager = state_manager
        self.rule = rule
        self.adapter = adapter
        self.signal = signal
        self.source = source
        self.layouts = layouts
        self.stats = stats
        self.num_steps = num_steps
        self.signal_change = signal_change
        self.forecast = forecast
        self.scheduler = scheduler
        self.histories = histories
        self._sigma_step = euler_sigma_step(scheduler) if scheduler is not None else None
        self._weights = SamplerWeights(scheduler) if self._sigma_step is None and lands_multistep(scheduler) else None
        self._warned_no_step_count = False
        # This call's scratch (transformer calls do not interleave): set by the signal and the head.
        self._signal: torch.Tensor | None = None
        self._state: TeaCacheState | None = None
        self._skipping = False
        self._stack_input: torch.Tensor | None = None
        self._joint: dict[int, tuple[str, bool]] = {}  # teacache_joint: step -> (leading branch, its decision)
        self._decided: tuple[TeaCacheState, int, bool] | None = None  # this call's (state, step, skipped), for its output
        self._entered: TeaCacheState | None = None  # skip_call's state of this call, when it ran the call after all

    # ------------------------------------------------------------------------- interceptors
    def receive_signal(self, signal: torch.Tensor) -> None:
        self._signal = signal

    def head(self, block: nn.Module, call_next: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        skipped = self._decide(block, args, kwargs)
        if skipped is not None:
            return skipped
        output = call_next(*args, **kwargs)
        if len(self.layouts) == 1:
            self._store_residual(self.layouts[0], output)
        return output

    def block(self, index: int) -> intercept.Interceptor:
        layout, is_tail = self.layouts[index], index == len(self.layouts) - 1

        def pass_or_run(block: nn.Module, call_next: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
            if self._skipping:
                call = BlockCall(block, args, kwargs)
                encoder = call.get("encoder_hidden_states") if layout.encoder_hidden_states_index is not None else None
                return layout.pack(call.get("hidden_states"), encoder)
            output = call_next(*args, **kwargs)
            if is_tail:
                self._store_residual(layout, output)
            return output

        return pass_or_run

    # ----------------------------------------------------------------------------- decision
    def _store_residual(self, layout: BlockLayout, output: Any) -> None:
        state = self._state
        if self._forecast_kind() == "linear":
            state.previous_residual, state.previous_residual_step = state.residual, state.residual_step
        state.residual = layout.residual(output, self._stack_input)
        state.residual_step = state.step - 1  # _decide counted this call already
        state.unfinished = False
        self._stack_input = None

    def _start_generation(self, state: TeaCacheState) -> None:
        # The runtime's own count first (the scheduler's timesteps, or this expert's share of them), which
        # is what this transformer is really called for; else what the pipeline's cache context says.
        if self.histories is not None:  # this expert's first call is the generation's step_offset-th
            s = self.scheduler
            state.step_offset = 0 if s is None or s.step_index is None else s.step_index - (s.begin_index or 0)
        counted = self.num_steps()
        state.num_steps = counted if counted is not None else getattr(self.state_manager.current_context, "num_inference_steps", None)
        if state.num_steps is None and self.rule.final_steps > 0 and not self._warned_no_step_count:
            self._warned_no_step_count = True
            logger.warning(
                "TeaCache cannot force the final %d step(s): the step count is unknown; apply the cache to the "
                "pipeline, or pass num_inference_steps= to apply().",
                self.rule.final_steps,
            )

    def _take_signal(self) -> torch.Tensor:
        signal, self._signal = self._signal, None
        if signal is None:
            raise TeaCacheError(
                f"the {self.signal.replace('_', ' ')} was not read before the first block ran; the adapter of "
                f"{self.adapter.transformer_class} in runtime/adapters.py names a module this call does not run "
                "before its blocks."
            )
        return signal

    def _enter_call(self) -> TeaCacheState:
        """This call's branch state (a call starts), reset when a new generation starts."""
        manager = self.state_manager
        manager.begin_call()
        state: TeaCacheState = manager.get_state()
        context = manager.current_context
        if state.unfinished or (getattr(context, "step_index", None) == 0 and state.step > 0):
            # The last call raised inside the stack, or a new generation started without the pipeline's
            # end-of-call reset: start this branch afresh.
            state.reset()
        if state.step == 0:
            self._start_generation(state)
        return state

    @torch.compiler.disable
    def skip_call(self) -> Any | None:
        """Before the transformer runs: a schedule rule under an output forecast needs nothing of a skipped call
        (the schedule decides without the signal, and the output is forecast), so when its schedule skips this
        call nothing of the model runs. Returns the last computed output's container for :meth:`finish_call` to
        put the forecast in (the call is recorded as skipped, with no x: the signal was not read), or None: the
        call runs, and the decision is made at the first block as for every rule."""
        self._entered = None
        rule = self.rule
        if not self._skips_whole_calls(self._forecast_kind()):
            return None
        state = self._enter_call()
        template = state.output_template
        if template is None or not rule.scheduled_skip(self._rule_step(state)[0]) or self._forced_reason(state) is not None:
            self._entered = state
            return None
        nan = float("nan")
        self.stats.record(self.state_manager.branch, StepRecord(state.step, nan, nan, nan, False, SKIPPED))
        state.step += 1
        state.consecutive_skips += 1
        self._decided = (state, state.step - 1, True)
        return template

    @torch.compiler.disable
    def _decide(self, block: nn.Module, args: tuple, kwargs: dict) -> Any | None:
        """The decision for this call: the skipped call's output, or None when the stack must run."""
        manager = self.state_manager
        state = self._entered if self._entered is not None else self._enter_call()
        self._state, self._entered = state, None
        group = context_parallel_group(self.transformer)
        if group is not None:  # this rank's shard of the stack input, as the block's own split hooks make it
            args, kwargs = block_local_arguments(block, args, kwargs)

        call = BlockCall(block, args, kwargs)
        hidden_states = call.get("hidden_states")
        signal = self._take_signal()

        reason = self._forced_reason(state)
        if reason is None and state.residual is None:
            reason = FIRST
        previous = state.anchor_signal if self.rule.rule == "teacache_drift" else state.previous_signal
        shape_changed = (previous is not None and previous.shape != signal.shape) or (
            state.residual is not None and state.residual.shape != hidden_states.shape
        )
        if shape_changed:
            reason = SHAPE_CHANGE
        if previous is None or shape_changed:
            x = torch.full((), float("nan"), dtype=torch.float32, device=signal.device)
        elif self.signal_change is not None:
            x = self.signal_change(signal, previous, state, manager.branch)
        else:
            x = rel_l1(signal, previous, group)
        if state.accumulator is None:
            state.accumulator = torch.zeros((), dtype=torch.float32, device=signal.device)

        p, candidate, skip, state.accumulator = self.rule.accumulate(x, state.accumulator, reason is not None, self._rule_step(state)[0])
        leader = self._joint.get(state.step) if self.rule.rule == "teacache_joint" else None
        if leader is not None and leader[0] != manager.branch:
            # teacache_joint: this step's first branch decided for every branch of the step
            skip = torch.full_like(skip, leader[1] and reason is None)
            state.accumulator = torch.where(skip, candidate, torch.zeros_like(candidate))
        if group is not None:
            skip = agree_on_skip(skip, group)
            state.accumulator = torch.where(skip, candidate, torch.zeros_like(candidate))
        # The one device-to-host read of this call: the decision and its numbers for `stats`.
        x_value, p_value, acc_value, skip_value = torch.stack((x, p, candidate, skip.float())).tolist()
        skipping = skip_value > 0.5
        if self.rule.rule == "teacache_joint" and leader is None:
            if state.step == 0:
                self._joint.clear()  # a new generation
            self._joint[state.step] = (manager.branch, skipping)
        if reason is None:
            finite = math.isfinite(x_value) and math.isfinite(acc_value)
            reason = SKIPPED if skipping else (THRESHOLD if finite else NONFINITE)
        self.stats.record(manager.branch, StepRecord(state.step, x_value, p_value, acc_value, not skipping, reason))

        if self.rule.rule != "teacache_drift":  # the drift rule compares with its anchor only
            state.previous_signal = signal
        state.step += 1
        self._skipping = skipping
        self._decided = (state, state.step - 1, skipping)
        if skipping:
            state.consecutive_skips += 1
            return self.layouts[0].pack(hidden_states + self._forecast(state, state.step - 1), call.get("encoder_hidden_states"))
        state.consecutive_skips = 0
        state.anchor_signal = signal
        state.unfinished = True
        self._stack_input = hidden_states
        return None

    def _forced_reason(self, state: TeaCacheState) -> str | None:
        """Why this call of ``state`` must be computed whatever the rule says (the schedule's forced steps, the cap
        on skips in a row), or None."""
        reason = self.rule.scheduled_reason(*self._rule_step(state))
        if reason is None and state.step == 0:  # an expert's first call (Wan2.2's second starts mid-generation)
            reason = FIRST
        if reason is None and self.rule.cap_reached(state.consecutive_skips):
            reason = MAX_SKIPS
        return reason

    def _rule_step(self, state: TeaCacheState) -> tuple[int, int | None]:
        """The step and step count the rule counts: this transformer's own calls; but a schedule rule on a pipeline
        whose experts share the generation (Wan2.2: ``histories`` set) counts the generation's steps, so that one
        schedule spans both experts."""
        if self.histories is None or self.rule.rule not in SCHEDULE_RULES:
            return state.step, state.num_steps
        timesteps = getattr(self.scheduler, "timesteps", None)
        total = None if timesteps is None else len(timesteps) - (self.scheduler.begin_index or 0)
        return state.step_offset + state.step, total

    def _forecast_kind(self) -> str:
        return self.forecast() if self.forecast is not None else self.rule.forecast

    def _skips_whole_calls(self, kind: str) -> bool:
        """Whether :meth:`skip_call` can skip a call whole: a schedule rule (not a forced schedule, whose
        ``signal_change`` reads the signal) under an output forecast."""
        return self.rule.rule in SCHEDULE_RULES and self.signal_change is None and kind in OUTPUT_FORECASTS

    @torch.compiler.disable
    def finish_call(self, output: Any) -> Any:
        """The transformer's output of this call, under an output forecast: a skipped call's replaced by the
        forecast, a computed call's kept (and, ``output_corrected``, adjusted for the skipped calls before it)."""
        decided, self._decided = self._decided, None
        kind = self._forecast_kind()
        if decided is None or kind not in OUTPUT_FORECASTS:
            return output
        state, step, skipped = decided
        sigma_step = None
        if self.histories is not None:  # experts share each branch's history, by the generation's steps
            step += state.step_offset
            history = self.histories.at(self.state_manager.branch, step)
        else:
            history = state.output_history
        if kind == "output_corrected":
            if self._sigma_step is None and self._weights is None:
                raise refuse_correction(self.scheduler, "TeaCache")
            sigma_step = self._sigma_step
            if self._weights is not None and (step == 0 or history.weights is None):  # a multistep sampler: this generation's weights
                history.weights = self._weights.at_start(sample_of(output).device)
        if skipped:
            value = history.forecast(step, sigma_step)
            return output if value is None else with_sample(output, value)
        result = with_sample(output, history.computed(step, sample_of(output), sigma_step, id(self.transformer)))
        if self._skips_whole_calls(kind):  # skip_call's container, sharing the kept output's memory
            state.output_template = with_sample(output, history.outputs[-1][1])
        return result

    def _forecast(self, state: TeaCacheState, step: int) -> torch.Tensor:
        """The residual a skipped call at ``step`` adds: the cached one (``reuse``), or (``linear``) the line
        through the branch's last two computed residuals evaluated at ``step``; reuse until two exist."""
        previous = state.previous_residual
        if self._forecast_kind() != "linear" or previous is None or previous.shape != state.residual.shape:
            return state.residual
        slope = (step - state.residual_step) / (state.residual_step - state.previous_residual_step)
        return state.residual + (state.residual - previous) * slope


@dataclass
class TeaCacheConfig:
    """What :func:`apply_teacache` wires, checked before anything is registered.

    - ``rule``: the polynomial, the decision settings and the rule variant (:class:`DecisionRule`);
    - ``signal``: ``modulated_input`` or ``timestep_embedding``;
    - ``stats``: where each call's decision is recorded (``TeaCache.stats`` reads it);
    - ``num_inference_steps``: the step count (to force the final steps), or a function giving it per
      generation (a pipeline's scheduler); None when unknown;
    - ``signal_change``: ``(signal, previous, state, branch) -> x`` in place of the relative L1 change
      (the sweep's oracle and forced schedules use it);
    - ``forecast``: a function giving, per call, the forecast in place of the rule's (forced schedules whose
      forecast changes from one output to the next); None: the rule's.
    - ``scheduler``: the pipeline's scheduler; ``output_corrected`` needs a ``FlowMatchEulerDiscreteScheduler``,
      a ``UniPCMultistepScheduler``, a ``DEISMultistepScheduler`` or a DPM-Solver one (a multistep sampler's step weighs the
      correction: :mod:`runtime.forecasts`).
    - ``histories``: each CFG branch's output history, shared with the pipeline's other expert (Wan 2.2:
      :class:`runtime.forecasts.BranchHistories`); None: this transformer keeps its own.
    """

    rule: DecisionRule
    signal: str = "modulated_input"
    stats: CacheStats = field(default_factory=CacheStats)
    num_inference_steps: int | NumStepsProvider | None = None
    signal_change: SignalChange | None = None
    forecast: Callable[[], str] | None = None
    scheduler: Any = None
    histories: BranchHistories | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.rule, DecisionRule):
            raise ConfigError(f"TeaCacheConfig.rule must be a DecisionRule, got {type(self.rule).__name__}.")
        if self.signal not in SIGNALS:
            raise ConfigError(f"TeaCacheConfig.signal must be one of {', '.join(SIGNALS)}, got {self.signal!r}.")
        steps = self.num_inference_steps
        if steps is not None and not callable(steps) and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
            raise ConfigError(f"TeaCacheConfig.num_inference_steps must be a positive integer, a function or None, got {steps!r}.")
        if self.forecast is None and self.rule.forecast == "output_corrected" and not corrects(self.scheduler):
            raise refuse_correction(self.scheduler, "TeaCache")

    def steps_provider(self) -> NumStepsProvider:
        steps = self.num_inference_steps
        return steps if callable(steps) else (lambda: steps)


def apply_teacache(transformer: nn.Module, config: TeaCacheConfig) -> TeaCacheRunner:
    """Hook TeaCache into ``transformer`` as ``config`` says; undo with :func:`remove_teacache`."""
    rule, signal, stats = config.rule, config.signal, config.stats
    num_steps, signal_change, forecast = config.steps_provider(), config.signal_change, config.forecast
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
    blocks = [block for _, block in adapter.blocks(transformer)]
    layouts = [adapter.layout(block) for block in blocks]  # fail before registering anything
    source = adapter.signal_source(transformer, signal)
    manager = BranchStates(TeaCacheState)
    runner = TeaCacheRunner(
        transformer, manager, rule, adapter, signal, source, layouts, stats, num_steps, signal_change, forecast, config.scheduler,
        config.histories,
    )

    existed = hasattr(transformer, "_diffusers_hook")
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    if not existed:
        registry._teacache_created = True
    registry.register_hook(TeaCacheContextHook(manager, runner.finish_call, runner.skip_call), CONTEXT_HOOK)
    intercept.intercept(blocks[0], HEAD, runner.head)
    for index, block in enumerate(blocks[1:], start=1):
        intercept.intercept(block, BLOCK, runner.block(index))
    # Registered last, so on the head block it runs outermost: the signal is read before the decision.
    intercept.intercept(source.module, SIGNAL, signal_reader(source, runner.receive_signal))
    controlnet.guard(transformer)  # a call carrying ControlNet residuals is refused before any state changes
    registry.invalidate_child_registries_cache()
    return runner


def states_of(transformer: nn.Module) -> BranchStates | None:
    """The state manager of TeaCache on ``transformer``, or None when it is not applied."""
    registry = getattr(transformer, "_diffusers_hook", None)
    hook = registry.get_hook(CONTEXT_HOOK) if registry is not None else None
    return hook.state_manager if hook is not None else None


def is_applied(transformer: nn.Module) -> bool:
    return states_of(transformer) is not None


def reset_teacache(transformer: nn.Module) -> None:
    """Forget every branch's state (what the pipeline does at the end of each call)."""
    manager = states_of(transformer)
    if manager is not None:
        manager.reset()


def remove_teacache(transformer: nn.Module) -> None:
    """Remove TeaCache: every interceptor and the context hook; the model is then exactly as before."""
    controlnet.unguard(transformer)
    for module in transformer.modules():
        for name in (HEAD, BLOCK, SIGNAL):
            intercept.release(module, name)
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is None or registry.get_hook(CONTEXT_HOOK) is None:
        return
    registry.remove_hook(CONTEXT_HOOK, recurse=False)
    registry.invalidate_child_registries_cache()
    if not registry.hooks and getattr(registry, "_teacache_created", False):
        del transformer._diffusers_hook
        # remove_hook leaves the class's forward bound as an instance attribute; drop it.
        bound = transformer.__dict__.get("forward")
        if getattr(bound, "__func__", None) is type(transformer).forward:
            del transformer.forward
