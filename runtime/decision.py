"""The skip decision: one rule, used by the runtime hooks on the device and by the fitter's replay.

Per transformer call of one CFG branch, with ``x`` the relative L1 change of the signal against the
previous call of that branch:

1. Schedule: step 0 and the warm-up steps are computed, so are the final steps when the step count is
   known, and so is a call after ``max_consecutive_skips`` skips in a row. The accumulator resets to 0.
2. Otherwise ``p = max(poly(clamp(x, *x_range)), 0)`` and ``acc + p`` is compared to the threshold:
   below it the call is skipped and the accumulator keeps the sum; at or above it (or when ``x`` or
   the sum is not finite) the call is computed and the accumulator resets to 0.

Clamping x to the fitted range evaluates the polynomial at the nearest boundary instead of
extrapolating it, and clamping p at 0 means a polynomial that dips below zero can never make the
accumulator run backwards. The tensor parts are elementwise, so :func:`replay` runs the same code on
a batch of recorded trajectories at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError
from .settings import SCHEDULE_RULES, DecisionSettings, validate_decision_settings

# Reasons a call was computed or skipped, as they appear in ``TeaCache.stats``.
FIRST, WARMUP, FINAL, MAX_SKIPS, SHAPE_CHANGE = "first", "warmup", "final", "max_skips", "shape_change"
THRESHOLD, NONFINITE, SKIPPED = "threshold", "nonfinite", "skipped"


@dataclass(frozen=True)
class DecisionRule:
    """The polynomial, the decision settings and the rule variant's data.

    ``rule`` (see ``runtime.settings.RULES``):

    - ``teacache``: the upstream rule, as above;
    - ``teacache_dsigma``: each step's prediction is weighted by ``step_weights[step]``, the sampler's
      sigma step there relative to its mean step (a stale residual costs in proportion to the step it
      is integrated over); steps past the weights count 1;
    - ``teacache_joint``: the CFG branches of one step take one decision, the first branch's (the
      runtime shares it; :func:`replay` of the leading branch gives it);
    - ``teacache_drift``: no sum; x is the signal's change since the branch's last computed call (not since
      the previous call) and the call is skipped while ``p(x)`` alone stays below the threshold. Its
      polynomial is fitted on the traces' lagged pairs (``x_lag``, ``y_lag``), and the file caps the skips
      in a row at the longest lag recorded, so the replay sees every x the runtime will;
    - ``fixed_schedule``: compute exactly the steps in ``schedule`` (and the forced ones), whatever x says;
    - ``searched_schedule``: compute exactly the steps of the schedule a search over real generations chose
      for the threshold's budget (``rel_l1_thresh`` is then the fraction of steps skipped; the coefficients
      file maps it to its schedule, see ``Coefficients.searched_schedule``). The schedule is the whole plan:
      step 0 is computed, and warm-up, final steps and the cap on skips in a row do not apply; a skipped step
      adds the residual the row's forecast says (the one its schedule was searched with).

    ``forecast`` (``runtime.settings.FORECASTS``): what a skipped call does: add the cached residual to its input
    (``reuse``) or that residual's linear extrapolation from the last two computed ones (``linear``), or return the
    transformer output's extrapolation (``output_linear``; ``output_corrected`` also repairs the latent at the
    next computed step, with an Euler, UniPC, DEIS or DPM-Solver sampler: :mod:`runtime.forecasts`).
    """

    coefficients: tuple[float, ...]
    x_range: tuple[float, float] | None
    rel_l1_thresh: float
    warmup_steps: int = 1
    final_steps: int = 1
    max_consecutive_skips: int | None = None
    rule: str = "teacache"
    step_weights: tuple[float, ...] | None = None
    schedule: frozenset[int] | None = None
    schedule_steps: int | None = None  # searched_schedule: the step count its schedules were searched for
    forecast: str = "reuse"  # what a skipped call adds to its input (runtime.settings.FORECASTS)

    def __post_init__(self) -> None:
        validate_decision_settings(
            rel_l1_thresh=self.rel_l1_thresh, warmup_steps=self.warmup_steps, final_steps=self.final_steps,
            max_consecutive_skips=self.max_consecutive_skips, rule=self.rule, forecast=self.forecast, where="TeaCache",
        )
        if self.rule == "teacache_dsigma" and not self.step_weights:
            raise ConfigError("the teacache_dsigma rule needs step_weights (one per step); re-fit with `python -m calibrate.fit`.")
        if self.rule in SCHEDULE_RULES and self.schedule is None:
            raise ConfigError(f"the {self.rule} rule needs a schedule (the steps to compute); re-fit with `python -m calibrate.fit`.")

    @classmethod
    def of(cls, coefficients: Any, settings: DecisionSettings) -> "DecisionRule":
        """The rule of a :class:`~runtime.coefficients.Coefficients` (or anything with its polynomial
        fields) run with ``settings``."""
        schedule, schedule_steps, forecast = getattr(coefficients, "schedule", None), None, settings.forecast
        if settings.rule == "searched_schedule":  # the searched schedule of the threshold's budget, and its forecast
            schedule = coefficients.searched_schedule(settings.rel_l1_thresh)
            schedule_steps = int(coefficients.rules["searched_schedule"]["num_steps"])
            forecast = coefficients.searched_forecast(settings.rel_l1_thresh)
        weights = getattr(coefficients, "step_weights", None)
        return cls(
            coefficients=tuple(coefficients.coefficients),
            x_range=coefficients.x_range,
            rel_l1_thresh=settings.rel_l1_thresh,
            warmup_steps=settings.warmup_steps,
            final_steps=settings.final_steps,
            max_consecutive_skips=settings.max_consecutive_skips,
            rule=settings.rule,
            step_weights=tuple(weights) if weights else None,
            schedule=frozenset(schedule) if schedule is not None else None,
            schedule_steps=schedule_steps,
            forecast=forecast,
        )

    @property
    def settings(self) -> DecisionSettings:
        return DecisionSettings(
            rel_l1_thresh=self.rel_l1_thresh,
            warmup_steps=self.warmup_steps,
            final_steps=self.final_steps,
            max_consecutive_skips=self.max_consecutive_skips,
            rule=self.rule,
            forecast=self.forecast,
        )

    def weight(self, step: int) -> float:
        """The factor on this step's prediction (1 but for ``teacache_dsigma``)."""
        if self.rule != "teacache_dsigma" or self.step_weights is None or step >= len(self.step_weights):
            return 1.0
        return self.step_weights[step]

    def scheduled_skip(self, step: int) -> bool | None:
        """For the schedule rules: whether the schedule skips this step; None for the other rules."""
        if self.rule not in SCHEDULE_RULES:
            return None
        return step not in self.schedule

    # ---------------------------------------------------------------- host side: the schedule
    def scheduled_reason(self, step: int, num_steps: int | None) -> str | None:
        """Why this step must be computed whatever x says, or None; ``num_steps`` None disables final steps."""
        if step == 0:
            return FIRST
        if self.rule == "searched_schedule":  # the searched schedule decides every later step
            if num_steps is not None and self.schedule_steps is not None and num_steps != self.schedule_steps:
                raise ConfigError(
                    f"the searched schedules were searched for {self.schedule_steps} steps, but this generation runs "
                    f"{num_steps}: step indices mean other steps there. Record and fit for {num_steps} steps "
                    "(calibrate.record num_inference_steps=..., then calibrate.fit search=N), or use rule='teacache'."
                )
            return None
        if step < self.warmup_steps:
            return WARMUP
        if num_steps is not None and step >= num_steps - self.final_steps:
            return FINAL
        return None

    def cap_reached(self, consecutive_skips: int | torch.Tensor) -> bool | torch.Tensor:
        """Whether the cap on consecutive skips forces this call to compute (elementwise on tensors)."""
        if self.max_consecutive_skips is None or self.rule == "searched_schedule":
            if isinstance(consecutive_skips, torch.Tensor):
                return torch.zeros_like(consecutive_skips, dtype=torch.bool)
            return False
        return consecutive_skips >= self.max_consecutive_skips

    # -------------------------------------------------------------- device side: the polynomial
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """p(x) >= 0, with x clamped to the fitted range; NaN stays NaN (and then forces a compute)."""
        if self.x_range is not None:
            x = x.clamp(self.x_range[0], self.x_range[1])
        value = torch.full_like(x, self.coefficients[0])
        for c in self.coefficients[1:]:
            value = value * x + c
        return value.clamp_min(0.0)

    def accumulate(
        self, x: torch.Tensor, acc: torch.Tensor, forced: bool | torch.Tensor, step: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decision at ``step``, elementwise: returns ``(p, acc_candidate, skip, acc_next)``.

        ``acc_candidate = acc + weight(step) * p`` is what the threshold was compared to; ``acc_next``
        is the accumulator carried to the next call (the candidate when skipping, else 0). Under
        the schedule rules the schedule decides and x is only recorded.
        """
        p = self.predict(x) * self.weight(step)
        candidate = p if self.rule == "teacache_drift" else acc + p
        scheduled = self.scheduled_skip(step)
        if scheduled is not None:
            skip = torch.full_like(candidate, scheduled, dtype=torch.bool)
        else:
            skip = (candidate < self.rel_l1_thresh) & torch.isfinite(x) & torch.isfinite(candidate)
        if isinstance(forced, torch.Tensor):
            skip = skip & ~forced
        elif forced:
            skip = torch.zeros_like(skip)
        acc_next = torch.where(skip, candidate, torch.zeros_like(candidate))
        return p, candidate, skip, acc_next


def replay(rule: DecisionRule, x: torch.Tensor) -> torch.Tensor:
    """Replay the runtime's decisions on recorded trajectories.

    ``x`` is ``[trajectories, steps]`` (one CFG branch each; NaN where no previous step exists). The
    step count is known, as in a pipeline. Returns a bool tensor, True where the call is computed.
    For ``teacache_joint`` pass the leading branch's trajectories: every branch of a run follows them.

    For ``teacache_drift`` pass the lagged changes ``[trajectories, steps, lags]``, ``x[:, i, k]`` the
    signal's change at step i against step ``i - 1 - k``: each decision reads the lag since the last
    computed step (lags past the last column count as unknown, so such a call is computed).
    """
    drift = rule.rule == "teacache_drift"
    if x.ndim != (3 if drift else 2):
        shape = "[trajectories, steps, lags]" if drift else "[trajectories, steps]"
        raise ValueError(f"replay of rule {rule.rule} expects x of shape {shape}, got {tuple(x.shape)}")
    n_traj, n_steps = x.shape[:2]
    rows = torch.arange(n_traj)
    x = x.to(torch.float32)
    acc = torch.zeros(n_traj, dtype=torch.float32)
    consecutive = torch.zeros(n_traj, dtype=torch.int64)
    computed = torch.zeros(n_traj, n_steps, dtype=torch.bool)
    for step in range(n_steps):
        forced = rule.cap_reached(consecutive)
        if rule.scheduled_reason(step, n_steps) is not None:
            forced = torch.ones_like(forced)
        if drift:  # the change since the last computed step: lag = consecutive skips + 1
            lag = consecutive.clamp(max=x.shape[2] - 1)
            current = torch.where(consecutive < x.shape[2], x[rows, step, lag], torch.full_like(x[:, 0, 0], float("nan")))
        else:
            current = x[:, step]
        _, _, skip, acc = rule.accumulate(current, acc, forced, step)
        computed[:, step] = ~skip
        consecutive = torch.where(skip, consecutive + 1, torch.zeros_like(consecutive))
    return computed
