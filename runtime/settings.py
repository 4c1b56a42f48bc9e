"""The decision settings, in one place: the coefficients file's ``defaults``, the runtime's rule, the fit's
replay and the sweep all hold this one validated object.

- ``rel_l1_thresh``: skip while the accumulated prediction stays below it (0 never skips);
- ``warmup_steps``: leading steps always computed (step 0 is computed in any case);
- ``final_steps``: trailing steps always computed (needs the step count);
- ``max_consecutive_skips``: a cap on skips in a row, ``None`` for no cap;
- ``rule``: which decision rule runs (``runtime.rules``); files without it mean ``teacache``, the
  upstream accumulate-and-threshold rule;
- ``forecast``: what a skipped call adds to its input: ``reuse``, the last computed residual (TeaCache's own
  behaviour; files without the field mean it), or ``linear``, that residual extrapolated along the line through
  the branch's last two computed residuals, by step index (a first-order forecast, as TaylorSeer makes of
  attention outputs); or ``output_linear`` and ``output_corrected`` (:mod:`runtime.forecasts`): the skipped call
  returns the line through the branch's last two computed transformer *outputs*, and ``output_corrected`` (with a
  ``FlowMatchEulerDiscreteScheduler``, a ``UniPCMultistepScheduler``, a ``DEISMultistepScheduler`` or a DPM-Solver one) also repairs the latent at the next
  computed step.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

#: The rules the runtime runs (runtime.rules registers their behaviour under these names).
RULES = ("teacache", "teacache_dsigma", "teacache_joint", "teacache_drift", "fixed_schedule", "searched_schedule")
#: Rules whose steps are set by a schedule, not by x (x is still measured and recorded).
SCHEDULE_RULES = ("fixed_schedule", "searched_schedule")
#: What a skipped call adds to its input (see the module's docstring).
FORECASTS = ("reuse", "linear", "output_linear", "output_corrected")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class DecisionSettings:
    """The validated decision settings; ``__post_init__`` names the first field outside its range."""

    rel_l1_thresh: float
    warmup_steps: int = 1
    final_steps: int = 1
    max_consecutive_skips: int | None = None
    rule: str = "teacache"
    forecast: str = "reuse"

    def __post_init__(self) -> None:
        validate_decision_settings(**dataclasses.asdict(self), where="decision settings")

    def with_overrides(self, **overrides: Any) -> "DecisionSettings":
        """These settings with some replaced; an unknown name is refused. ``None`` keeps the value, except for
        ``max_consecutive_skips``, where it means no cap."""
        unknown = sorted(set(overrides) - set(FIELDS))
        if unknown:
            raise ConfigError(
                f"unknown TeaCache setting {unknown[0]!r}; the settings are {', '.join(FIELDS)} (and speedup= "
                "at from_coefficients)."
            )
        given = {k: v for k, v in overrides.items() if v is not None or k == "max_consecutive_skips"}
        return dataclasses.replace(self, **given)

    def capped(self, max_skips: int) -> "DecisionSettings":
        """These settings with skips in a row capped at ``max_skips`` as well (the drift rule's longest recorded
        lag: the fit's replay never saw a longer one)."""
        cap = self.max_consecutive_skips
        return self.with_overrides(max_consecutive_skips=max_skips if cap is None else min(cap, max_skips))

    def to_dict(self) -> dict[str, Any]:
        """The file's ``defaults`` object (``rule`` and ``forecast`` left out when they are the upstream rule's,
        as in old files)."""
        out = dataclasses.asdict(self)
        if out["rule"] == "teacache":
            del out["rule"]
        if out["forecast"] == "reuse":
            del out["forecast"]
        return out


FIELDS = tuple(f.name for f in dataclasses.fields(DecisionSettings))


def validate_decision_settings(
    *, rel_l1_thresh: Any, warmup_steps: Any = 1, final_steps: Any = 1, max_consecutive_skips: Any = None,
    rule: Any = "teacache", forecast: Any = "reuse", where: str,
) -> None:
    """Raise :class:`ConfigError` naming the first decision setting outside its valid range."""
    if not _is_number(rel_l1_thresh) or not math.isfinite(rel_l1_thresh) or rel_l1_thresh < 0:
        raise ConfigError(
            f"{where}: rel_l1_thresh must be a finite number >= 0, got {rel_l1_thresh!r} "
            "(0 never skips; larger values skip more steps)."
        )
    for name, value in (("warmup_steps", warmup_steps), ("final_steps", final_steps)):
        if not _is_int(value) or value < 0:
            raise ConfigError(f"{where}: {name} must be an integer >= 0, got {value!r}.")
    if max_consecutive_skips is not None and (not _is_int(max_consecutive_skips) or max_consecutive_skips < 1):
        raise ConfigError(
            f"{where}: max_consecutive_skips must be an integer >= 1 or None (no cap), got {max_consecutive_skips!r}."
        )
    if rule not in RULES:
        raise ConfigError(f"{where}: rule must be one of {', '.join(RULES)}, got {rule!r}.")
    if forecast not in FORECASTS:
        raise ConfigError(
            f"{where}: forecast must be one of {', '.join(FORECASTS)}, got {forecast!r} (reuse: the cached residual "
            "as TeaCache does; linear: extrapolated from the last two computed residuals; output_linear: the transformer "
            "output extrapolated from the last two computed ones; output_corrected: that, and the latent repaired at the "
            "next computed step, with an Euler, UniPC, DEIS or DPM-Solver sampler)."
        )
