"""`TeaCache`: the object users hold. Load coefficients, apply to a pipeline, read stats, remove."""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable

from torch import nn

from .coefficients import Coefficients, available_names, coefficients_dir, load_coefficients
from .decision import DecisionRule
from .errors import ConfigError, TeaCacheError, UnsupportedModelError
from .forecasts import BranchHistories
from .settings import SCHEDULE_RULES
from .controlnet import refuse_controlnet_pipeline
from .hooks import TeaCacheConfig, apply_teacache, mark_steps, remove_teacache, reset_teacache, run_before, states_of
from .stats import BranchStats, CacheStats

logger = logging.getLogger(__name__)

class TeaCache:
    """Skip a diffusers transformer's block stack on steps where its output would barely change.

    >>> cache = TeaCache.from_coefficients("qwen_image").apply(pipe)   # doctest: +SKIP
    >>> image = pipe(prompt).images[0]                                 # doctest: +SKIP
    >>> cache.stats["cond"].computed, cache.stats["cond"].skipped      # doctest: +SKIP
    >>> cache.remove()                                                  # doctest: +SKIP
    """

    def __init__(self, coefficients: Coefficients, rel_l1_thresh: float | None = None, **overrides: Any) -> None:
        settings = coefficients.defaults.with_overrides(rel_l1_thresh=rel_l1_thresh, **overrides)  # unknown or bad: refused now
        ignored = sorted(k for k in ("warmup_steps", "final_steps", "max_consecutive_skips", "forecast") if k in overrides)
        if settings.rule == "searched_schedule" and ignored:
            raise ConfigError(
                f"the searched_schedule rule computes exactly its searched steps, with the forecast each was searched "
                f"with, so {', '.join(ignored)} does not apply to it; pick a schedule with speedup= (or rel_l1_thresh=, "
                "the fraction of steps skipped)."
            )
        self.coefficients = coefficients
        self._rel_l1_thresh = rel_l1_thresh
        self._speedup: float | None = None
        self._overrides = overrides
        self.rule = self._rule_for(coefficients)
        self._stats: dict[str, CacheStats] = {}
        self._applied: dict[str, nn.Module] = {}  # expert attribute name -> transformer
        self._histories: BranchHistories | None = None  # two experts: each branch's output history, shared
        self._unwrap_scheduler: list[Callable[[], None]] = []

    def _rule_for(self, coefficients: Coefficients) -> DecisionRule:
        """The decision rule of one expert's polynomial, with this cache's threshold and overrides."""
        thresh = self._rel_l1_thresh
        if self._speedup is not None:
            thresh = coefficients.threshold_for_speedup(self._speedup)
        return DecisionRule.of(coefficients, coefficients.defaults.with_overrides(rel_l1_thresh=thresh, **self._overrides))

    @classmethod
    def from_coefficients(
        cls,
        source: str | os.PathLike[str] | Coefficients,
        *,
        rel_l1_thresh: float | None = None,
        speedup: float | None = None,
        **overrides: Any,
    ) -> "TeaCache":
        """A cache from a coefficients name (``"qwen_image"``), a path, or a loaded :class:`Coefficients`.

        ``rel_l1_thresh`` overrides the file's default threshold; ``speedup`` instead picks the smallest
        threshold whose computed fraction in the file's threshold table is at most ``1 / speedup``.
        ``overrides`` may set ``warmup_steps``, ``final_steps``, ``max_consecutive_skips``, ``rule`` (a variant
        the fit calibrated: its own default threshold and table are used) and ``forecast`` (``reuse``, the cached
        residual; ``linear``, its extrapolation from the last two computed ones; ``output_linear``, the transformer
        output's; ``output_corrected``, that and the latent repaired at the next computed step, with an Euler,
        UniPC, DEIS or DPM-Solver sampler).
        """
        coefficients = source if isinstance(source, Coefficients) else load_coefficients(source)
        rule = overrides.pop("rule", None) or coefficients.defaults.rule
        if rule != coefficients.defaults.rule or rule in coefficients.rules:
            coefficients = coefficients.for_rule(rule)  # that rule's own default threshold and table
        if speedup is not None:
            if rel_l1_thresh is not None:
                raise ConfigError("pass either rel_l1_thresh= or speedup=, not both.")
            for name in coefficients.expert_names:  # every expert's table must reach it
                coefficients.for_expert(name).threshold_for_speedup(speedup)
        cache = cls(coefficients, rel_l1_thresh, **overrides)
        if speedup is not None:
            cache._speedup = speedup
            cache.rule = cache._rule_for(coefficients)
        return cache

    @property
    def signal(self) -> str:
        return self.coefficients.signal

    @property
    def rel_l1_thresh(self) -> float:
        return self.rule.rel_l1_thresh

    def apply(self, pipe_or_transformer: Any, *, num_inference_steps: int | None = None) -> "TeaCache":
        """Hook the cache into a diffusers pipeline (its ``transformer``, and ``transformer_2`` when the
        pipeline has two experts, as Wan2.2) or into a transformer; returns self.

        The step count, needed to force the final steps, comes from the pipeline's cache context or its
        scheduler; for a bare transformer pass ``num_inference_steps``. With two experts each one has its
        own polynomial (the file's ``experts`` entry), state, rule and step count.
        """
        if self._applied:
            raise TeaCacheError("this TeaCache is already applied; call .remove() before applying it again.")
        experts, scheduler, pipe = _unpack(pipe_or_transformer)
        if len(experts) > 1 and self.rule.rule == "fixed_schedule":
            raise ConfigError(
                f"rule fixed_schedule computes a schedule of one transformer's steps, but this pipeline has "
                f"{len(experts)} experts ({', '.join(experts)}), each counting its own; use rule='searched_schedule' "
                "(searched over the generation's steps: calibrate.fit search=N) or rule='teacache' with it."
            )
        for transformer in experts.values():
            self._check_class(transformer)
        refuse_controlnet_pipeline(pipe_or_transformer)
        if len(experts) > 1 and not self.coefficients.experts:
            logger.warning(
                "%s holds one polynomial, but the pipeline has %d experts (%s); each expert gets its own state with "
                "that polynomial. Calibrate the pipeline itself (calibrate.record + calibrate.fit) for one "
                "polynomial per expert.",
                self.coefficients.origin, len(experts), ", ".join(experts),
            )
        # With two experts a branch's output forecasts follow its latent through both (runtime.forecasts).
        self._histories = BranchHistories() if len(experts) > 1 else None
        for name, transformer in experts.items():
            if name != "transformer" and name in self.coefficients.experts and self.rule.rule not in SCHEDULE_RULES:
                rule = self._rule_for(self.coefficients.for_expert(name))  # (one schedule spans both experts)
            else:
                rule = self.rule
            stats = self._stats.setdefault(name, CacheStats())
            steps = _step_counter(name, experts, scheduler, pipe, num_inference_steps)
            try:
                apply_teacache(transformer, TeaCacheConfig(rule, self.signal, stats, steps, scheduler=scheduler, histories=self._histories))
            except BaseException:
                self.remove()
                raise
            self._applied[name] = transformer
        self._check_pipeline(pipe)
        # Every diffusers pipeline sets its scheduler's timesteps when a generation starts: reset there too,
        # since the pipeline's own end-of-call reset never runs when a call raises (a cancelled request, a
        # callback that raises), and the next call would continue the broken call's trajectory.
        self._unwrap_scheduler = [
            run_before(scheduler, "set_timesteps", self.reset) or (lambda: None),
            mark_steps(scheduler, lambda: [states_of(t) for t in self._applied.values()]),
        ]
        return self

    def remove(self) -> None:
        """Take every hook off the transformer; its forward is then exactly what it was before."""
        for transformer in self._applied.values():
            remove_teacache(transformer)
        self._applied = {}
        for unwrap in self._unwrap_scheduler:
            unwrap()
        self._unwrap_scheduler = []

    def reset(self) -> None:
        """Forget the per-branch state, as a pipeline does after each generation (for bare transformer use)."""
        for transformer in self._applied.values():
            reset_teacache(transformer)
        if self._histories is not None:
            self._histories.reset()

    @property
    def stats(self) -> dict[str, BranchStats]:
        """Per CFG branch ("cond", "uncond", "default"): computed and skipped call counts, and the latest
        trace. With two experts (Wan2.2) the keys are ``"<expert>/<branch>"``, e.g. ``"transformer_2/cond"``."""
        if len(self._stats) <= 1:
            return next((dict(s.branches) for s in self._stats.values()), {})
        return {f"{expert}/{branch}": b for expert, s in self._stats.items() for branch, b in s.branches.items()}

    def reset_stats(self) -> None:
        for stats in self._stats.values():
            stats.clear()

    def __enter__(self) -> "TeaCache":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        target = " and ".join(type(t).__name__ for t in self._applied.values()) or "nothing"
        return (
            f"TeaCache(model={self.coefficients.model!r}, signal={self.signal!r}, "
            f"rel_l1_thresh={self.rel_l1_thresh}, applied to {target})"
        )

    def _check_pipeline(self, pipe: Any) -> None:
        """Warn when the file was fitted through another pipeline (Qwen-Image-Edit vs text-to-image: the same
        transformer class, but the edit pipeline's image latents change the trajectory)."""
        wanted = self.coefficients.recipe.get("pipeline")
        actual = type(pipe).__name__ if pipe is not None else None
        if wanted is not None and actual is not None and actual != wanted:
            logger.warning(
                "%s was fitted through a %s, but is applied to a %s; its polynomial and threshold table may not "
                "hold for this pipeline's trajectories: calibrate through %s (python -m calibrate.record / fit), "
                "or check it with python -m calibrate.score.",
                self.coefficients.origin, wanted, actual, actual,
            )

    def _check_class(self, transformer: nn.Module) -> None:
        names = {cls.__name__ for cls in type(transformer).__mro__}
        wanted = self.coefficients.transformer_class
        if wanted in names:
            return
        actual = type(transformer).__name__
        matching = _names_for_class(actual)
        hint = f"use one made for it ({', '.join(matching)})" if matching else "calibrate one for it"
        raise UnsupportedModelError(
            f"{self.coefficients.origin} holds coefficients for {wanted}, but apply() got a {actual}; {hint} "
            "with `python -m calibrate.record` and `python -m calibrate.fit`."
        )


def pipeline_experts(target: Any) -> dict[str, nn.Module]:
    """``{expert attribute name: transformer}`` of a pipeline (``transformer``, and ``transformer_2`` when it
    has a second expert, as Wan2.2) or of a bare transformer (``{"transformer": it}``)."""
    return _unpack(target)[0]


def _unpack(target: Any) -> tuple[dict[str, nn.Module], Any, Any]:
    """``({expert name: transformer}, scheduler, pipeline)`` of a pipeline or a bare transformer."""
    if isinstance(target, nn.Module):
        return {"transformer": target}, None, None
    transformer = getattr(target, "transformer", None)
    if isinstance(transformer, nn.Module):
        experts = {"transformer": transformer}
        second = getattr(target, "transformer_2", None)
        if isinstance(second, nn.Module):
            experts["transformer_2"] = second
        return experts, getattr(target, "scheduler", None), target
    raise UnsupportedModelError(
        f"apply() takes a diffusers pipeline with a `transformer` or a transformer module, got {type(target).__name__}."
    )


def _step_counter(name: str, experts: dict, scheduler: Any, pipe: Any, given: int | None) -> Callable[[], int | None]:
    """How many calls of each branch this expert gets per generation (to force its final steps).

    One expert: the scheduler's step count. Two experts (Wan2.2): the high-noise ``transformer`` runs the
    steps whose timestep is at or above ``boundary_ratio * num_train_timesteps``, ``transformer_2`` the rest.
    """

    def count() -> int | None:
        if given is not None and len(experts) == 1:
            return given
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None:
            return given
        if len(experts) == 1:
            return len(timesteps)
        high = high_noise_steps(pipe, scheduler)
        if high is None:
            return None
        return high if name == "transformer" else len(timesteps) - high

    return count


def high_noise_steps(pipe: Any, scheduler: Any) -> int | None:
    """How many of ``scheduler``'s timesteps a two-expert pipeline (Wan2.2) gives its high-noise ``transformer``:
    those at or above ``boundary_ratio * num_train_timesteps``; ``transformer_2`` runs the rest, from that step on.
    None when the pipeline has no ``boundary_ratio``."""
    ratio = getattr(getattr(pipe, "config", None), "boundary_ratio", None)
    if ratio is None:
        return None
    boundary = ratio * scheduler.config.num_train_timesteps
    return sum(1 for t in scheduler.timesteps if float(t) >= boundary)


def _names_for_class(class_name: str) -> list[str]:
    names = []
    for name in available_names():
        try:
            with open(coefficients_dir() / f"{name}.json", encoding="utf-8") as handle:
                if json.load(handle).get("transformer_class") == class_name:
                    names.append(name)
        except (OSError, ValueError, AttributeError):
            continue
    return names
