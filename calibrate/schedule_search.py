"""Forced compute schedules and the per-output schedule search: a bound on what any skip rule can reach.

A *schedule* is the set of step indices (per CFG branch, ``0 .. num_steps - 1``) at which the transformer
runs; at every other step the runtime adds the cached residual, exactly as TeaCache does when it skips
(``forecast="reuse"``), or its linear extrapolation from the last two computed residuals (``"linear"``), or
returns a forecast of the whole output (``"output_linear"``, ``"output_corrected"``: :mod:`runtime.forecasts`).
Step 0 is always in it (nothing is cached before it), and so is the first step of a pipeline's second expert
(Wan2.2: :func:`fixed_steps`), and both CFG branches follow the same schedule.

The schedule is forced through the runtime itself, not a copy of it: :func:`forced_schedule` hooks
``runtime.hooks.apply_teacache`` with the identity polynomial, threshold 0.5 and no forced steps but the
first, and hands it a ``signal_change`` that returns 1.0 at steps to compute (``acc + 1 >= 0.5``) and 0.0 at
steps to skip (``acc + 0 < 0.5``).

:func:`search_schedules` finds, for one output and each budget (number of computed steps), the schedule
with the smallest error of the final output against full compute: the start is the better of the uniform
schedule and (``greedy``) the previous, larger budget's result thinned by greedy elimination (for the
largest budget, all steps thinned); then
first-improvement local moves (one computed step moved to a free step at most ``radius`` away), at most
``passes`` passes. Every candidate is a real generation; results are memoised per schedule. The search
never returns a schedule worse than the uniform one it starts from.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator

from runtime.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from .models import LoadedModel
    from .recipe import Recipe

Schedule = frozenset  # of int step indices


def check_forecasts(forecasts: object, option: str, error: type[Exception] = ConfigError) -> tuple[str, ...] | str:
    """``forecasts`` as a tuple (at least one, distinct, each among ``runtime.settings.FORECASTS``), or ``"auto"``
    (every forecast the model's sampler runs: :func:`resolve_forecasts`); else ``error`` naming the setting ``option``."""
    from runtime.settings import FORECASTS

    if forecasts == "auto":
        return "auto"
    try:
        values = () if isinstance(forecasts, str) else tuple(forecasts)  # a list, tuple or hydra ListConfig
    except TypeError:
        values = ()
    if not values or len(set(values)) != len(values) or any(f not in FORECASTS for f in values):
        raise error(
            f"{option} must be auto or list distinct forecasts among {', '.join(FORECASTS)}, got {forecasts!r}; "
            f"pass e.g. {option}=[reuse,linear]."
        )
    return values


def resolve_forecasts(forecasts: tuple[str, ...] | str, scheduler: object, option: str, error: type[Exception] = ConfigError) -> tuple[str, ...]:
    """The forecasts to search with the model's ``scheduler``: ``"auto"`` gives every one it runs
    (``runtime.forecasts.forecasts_for``); a list naming ``output_corrected`` with a sampler it is not exact for is
    refused with ``error``."""
    from runtime.forecasts import CORRECTED_SAMPLERS, forecasts_for

    runnable = forecasts_for(scheduler)
    if forecasts == "auto":
        return runnable
    values = check_forecasts(forecasts, option, error)
    if "output_corrected" in values and "output_corrected" not in runnable:
        raise error(
            f"{option} names output_corrected, which needs {CORRECTED_SAMPLERS}, but this model samples with a "
            f"{type(scheduler).__name__}; drop it, or pass {option}=auto."
        )
    return values


def computed_steps(fraction: float, num_steps: int) -> int:
    """Steps computed at a budget given as a computed fraction: ``round(fraction * num_steps)``, at least 1."""
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction <= 1:
        raise ConfigError(f"budget {fraction!r} is not a computed fraction in (0, 1]; pass budgets like [0.3, 0.5, 0.7].")
    return max(1, min(num_steps, int(math.floor(fraction * num_steps + 0.5))))


def uniform_schedule(num_steps: int, computed: int) -> Schedule:
    """``computed`` steps spread evenly from step 0 to the last step (both included when computed >= 2)."""
    if not 1 <= computed <= num_steps:
        raise ConfigError(f"cannot compute {computed} of {num_steps} steps; pass a budget between 1 and {num_steps} steps.")
    if computed == 1:
        return frozenset({0})
    return frozenset(int(round(i * (num_steps - 1) / (computed - 1))) for i in range(computed))


def with_fixed(steps: Schedule, fixed: Schedule) -> Schedule:
    """``steps`` with every ``fixed`` step in it, as many steps as before: each missing fixed step takes the place
    of the nearest step that is not fixed."""
    steps = set(steps)
    for f in sorted(fixed):
        if f in steps:
            continue
        free = sorted(s for s in steps if s not in fixed)
        if free:
            steps.discard(min(free, key=lambda s: (abs(s - f), s)))
        steps.add(f)
    return frozenset(steps)


def fixed_steps(pipe: Any, num_steps: int) -> Schedule:
    """The steps every schedule computes: step 0, and the first step of each expert after the first (Wan2.2's
    ``transformer_2`` starts where the timesteps fall below ``boundary_ratio``: it has nothing cached before)."""
    import copy

    from runtime.cache import high_noise_steps, pipeline_experts

    if len(pipeline_experts(pipe)) < 2:
        return frozenset({0})
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(num_steps)
    high = high_noise_steps(pipe, scheduler)
    return frozenset({0, high}) if high is not None and 0 < high < num_steps else frozenset({0})


class ScheduleChange:
    """A ``signal_change`` for ``apply_teacache``: 1.0 (compute) at the schedule's steps, 0.0 (skip) elsewhere.

    ``schedule`` is a set of steps, or a callable returning the current one (looked up per output).
    ``state.step`` is the branch's call index (plus, on a second expert, the generation's step at its first call),
    so both CFG branches, and both experts, follow the same schedule.
    """

    def __init__(self, schedule: Schedule | Callable[[], Schedule]) -> None:
        self.schedule = schedule

    def __call__(self, signal: torch.Tensor, previous: torch.Tensor, state: object, branch: str) -> torch.Tensor:
        import torch

        steps = self.schedule() if callable(self.schedule) else self.schedule
        step = state.step + state.step_offset
        return torch.tensor(1.0 if step in steps else 0.0, dtype=torch.float32, device=signal.device)


@contextlib.contextmanager
def forced_schedule(
    transformer: torch.nn.Module | list[torch.nn.Module], change: ScheduleChange, num_steps: Callable[[], int | None],
    forecast: str | Callable[[], str] = "reuse", scheduler: Any = None,
) -> Iterator[None]:
    """The runtime's TeaCache hooks on ``transformer``, driven by ``change`` instead of the fitted polynomial; a
    skipped step adds the residual ``forecast`` says (``runtime.settings.FORECASTS``, or a function giving it
    per output). ``scheduler``: the pipeline's (``output_corrected`` needs it). A list of a pipeline's experts
    (Wan2.2) is hooked as ``TeaCache.apply`` hooks them: they share each branch's output history, and the schedule
    counts the generation's steps (each expert's first call is computed)."""
    from runtime import DecisionRule
    from runtime.forecasts import BranchHistories
    from runtime.hooks import TeaCacheConfig, apply_teacache, remove_teacache
    from runtime.stats import CacheStats

    experts = transformer if isinstance(transformer, list) else [transformer]
    histories = BranchHistories() if len(experts) > 1 else None
    fixed = forecast if isinstance(forecast, str) else "reuse"
    rule = DecisionRule((1.0, 0.0), None, rel_l1_thresh=0.5, warmup_steps=1, final_steps=0, max_consecutive_skips=None, forecast=fixed)
    provider = None if isinstance(forecast, str) else forecast
    hooked = []
    try:
        for expert in experts:
            apply_teacache(expert, TeaCacheConfig(rule, "modulated_input", CacheStats(), num_steps, change, provider, scheduler, histories))
            hooked.append(expert)
        yield
    finally:
        for expert in hooked:
            remove_teacache(expert)


@contextlib.contextmanager
def schedule_errors(
    model: LoadedModel, recipe: Recipe, pairs: list[tuple[str, int]], forecast: str = "reuse"
) -> Iterator[Callable[[Schedule], list[float]]]:
    """Within it, ``mse(schedule)``: for each (prompt, seed) pair, the mean squared error against full compute of
    the output (float64) when the runtime computes only the schedule's steps (:func:`forced_schedule`). Full
    compute runs first, without hooks. The per-output bound, the searched_schedule rule and the benches measure
    schedules through it."""
    import numpy as np

    from .models import output_array

    def output(prompt: str, seed: int) -> np.ndarray:
        return output_array(model.generate(prompt, seed, recipe, output_type="np")).astype(np.float64)

    fulls = [output(p, s) for p, s in pairs]
    current: dict[str, Schedule] = {"steps": frozenset()}

    def mse(steps: Schedule) -> list[float]:
        current["steps"] = steps
        return [float(np.mean((output(p, s) - full) ** 2)) for (p, s), full in zip(pairs, fulls)]

    from runtime.cache import pipeline_experts

    scheduler = model.pipe.scheduler
    experts = list(pipeline_experts(model.pipe).values())
    with forced_schedule(experts, ScheduleChange(lambda: current["steps"]), lambda: len(scheduler.timesteps), forecast, scheduler):
        yield mse


@dataclass
class SearchResult:
    """The best schedule found at one budget, its error, and the uniform schedule's error."""

    computed: int
    steps: Schedule
    error: float
    uniform_error: float
    start: str  # "uniform" or "greedy": which start the local moves began from


@dataclass
class SearchCost:
    evaluations: int = 0  # distinct schedules generated
    seconds: float = 0.0
    per_budget: dict[int, int] = field(default_factory=dict)


def _moves_of(s: int, steps: Schedule, num_steps: int, radius: int) -> Iterator[Schedule]:
    """Computed step ``s`` moved to a free step at most ``radius`` away, nearest first (earlier first on ties)."""
    for distance in range(1, radius + 1):
        for t in (s - distance, s + distance):
            if 0 < t < num_steps and t not in steps:
                yield (steps - {s}) | {t}


def greedy_eliminate(error: Callable[[Schedule], float], steps: Schedule, computed: int, fixed: Schedule = frozenset({0})) -> Schedule:
    """Drop, one at a time, the step whose removal hurts the final output least (never a ``fixed`` one), down to
    ``computed`` steps."""
    while len(steps) > computed:
        steps = min((steps - {s} for s in sorted(steps - fixed)), key=error)
    return steps


def local_search(
    error: Callable[[Schedule], float], steps: Schedule, num_steps: int, passes: int, radius: int,
    fixed: Schedule = frozenset({0}),
) -> tuple[Schedule, float]:
    """First-improvement moves: in a pass, each computed step but the ``fixed`` ones (step 0) in turn is moved to
    the nearest free step (at most ``radius`` away) that lowers the error, if any; at most ``passes`` passes, fewer
    when one changes nothing."""
    best = error(steps)
    for _ in range(passes):
        improved = False
        for s in sorted(steps - fixed):
            if s not in steps:
                continue
            for candidate in _moves_of(s, steps, num_steps, radius):
                value = error(candidate)
                if value < best:
                    steps, best, improved = candidate, value, True
                    break
        if not improved:
            break
    return steps, best


def search_schedules(
    generate_error: Callable[[Schedule], float],
    num_steps: int,
    budgets: list[int],
    passes: int = 2,
    radius: int = 2,
    greedy: bool = True,
    fixed: Schedule = frozenset({0}),
) -> tuple[dict[int, SearchResult], SearchCost]:
    """The search for one output at each budget (steps computed, at least ``len(fixed)``); ``generate_error(schedule)``
    runs a real generation under that schedule and returns its error against full compute. Every schedule holds
    the ``fixed`` steps (:func:`fixed_steps`)."""
    cache: dict[Schedule, float] = {}
    cost = SearchCost()
    start_time = time.perf_counter()

    def error(steps: Schedule) -> float:
        if steps not in cache:
            cache[steps] = float(generate_error(steps))
            cost.evaluations += 1
        return cache[steps]

    results: dict[int, SearchResult] = {}
    # The largest budget is thinned from every step: greedy elimination finds late-dense schedules that local
    # moves around the uniform one cannot reach (on the video reference model a calibrated rule beat a search
    # that started from uniform alone by up to 1 dB at 0.65-0.7 computed).
    previous: Schedule | None = frozenset(range(num_steps)) if greedy else None
    for computed in sorted(set(budgets), reverse=True):
        before = cost.evaluations
        uniform = with_fixed(uniform_schedule(num_steps, computed), fixed)
        start, start_name = uniform, "uniform"
        if greedy and previous is not None and len(previous) > computed:
            thinned = greedy_eliminate(error, previous, computed, fixed)
            if error(thinned) < error(uniform):
                start, start_name = thinned, "greedy"
        steps, value = local_search(error, start, num_steps, passes, radius, fixed)
        results[computed] = SearchResult(computed, steps, value, error(uniform), start_name)
        cost.per_budget[computed] = cost.evaluations - before
        previous = steps
    cost.seconds = time.perf_counter() - start_time
    return results, cost


@dataclass
class ForecastSearch:
    """:func:`search_schedules` run once per forecast: per budget the better result and its forecast, every
    forecast's results, and the summed cost."""

    results: dict[int, SearchResult]
    forecasts: dict[int, str]
    by_forecast: dict[str, dict[int, SearchResult]]
    cost: SearchCost


def search_each_forecast(
    objective: Callable[[str], ContextManager[Callable[[Schedule], float]]],
    forecasts: tuple[str, ...] | list[str],
    num_steps: int,
    budgets: list[int],
    passes: int = 2,
    radius: int = 2,
    greedy: bool = True,
    fixed: Schedule = frozenset({0}),
) -> ForecastSearch:
    """``objective(forecast)`` is a context in which generations skip with that forecast and which yields the
    error of a schedule; one search per forecast, and per budget the forecast whose schedule errs least."""
    by_forecast: dict[str, dict[int, SearchResult]] = {}
    cost = SearchCost()
    for forecast in forecasts:
        with objective(forecast) as error:
            by_forecast[forecast], own = search_schedules(error, num_steps, budgets, passes, radius, greedy, fixed)
        cost.evaluations += own.evaluations
        cost.seconds += own.seconds
        for k, count in own.per_budget.items():
            cost.per_budget[k] = cost.per_budget.get(k, 0) + count
    chosen = {k: min(forecasts, key=lambda f: by_forecast[f][k].error) for k in budgets}
    return ForecastSearch({k: by_forecast[f][k] for k, f in chosen.items()}, chosen, by_forecast, cost)
