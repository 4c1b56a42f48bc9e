"""`TeaCache`: the object users hold. Load coefficients, apply to a pipeline, read stats, remove."""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any

from torch import nn

from .coefficients import Coefficients, available_names, coefficients_dir, load_coefficients
from .decision import DecisionRule
from .errors import ConfigError, TeaCacheError, UnsupportedModelError
from .hooks import apply_teacache, remove_teacache, reset_teacache
from .stats import BranchStats, CacheStats

logger = logging.getLogger(__name__)

_OVERRIDABLE = ("warmup_steps", "final_steps", "max_consecutive_skips")


class TeaCache:
    """Skip a diffusers transformer's block stack on steps where its output would barely change.

    >>> cache = TeaCache.from_coefficients("qwen_image").apply(pipe)   # doctest: +SKIP
    >>> image = pipe(prompt).images[0]                                 # doctest: +SKIP
    >>> cache.stats["cond"].computed, cache.stats["cond"].skipped      # doctest: +SKIP
    >>> cache.remove()                                                  # doctest: +SKIP
    """

    def __init__(self, coefficients: Coefficients, rel_l1_thresh: float | None = None, **overrides: Any) -> None:
        unknown = sorted(set(overrides) - set(_OVERRIDABLE))
        if unknown:
            raise ConfigError(
                f"unknown TeaCache setting {unknown[0]!r}; the settings are rel_l1_thresh, speedup, "
                f"{', '.join(_OVERRIDABLE)}."
            )
        defaults = coefficients.defaults
        self.coefficients = coefficients
        self.rule = DecisionRule(
            coefficients=coefficients.coefficients,
            x_range=coefficients.x_range,
            rel_l1_thresh=defaults.rel_l1_thresh if rel_l1_thresh is None else rel_l1_thresh,
            warmup_steps=overrides.get("warmup_steps", defaults.warmup_steps),
            final_steps=overrides.get("final_steps", defaults.final_steps),
            max_consecutive_skips=overrides.get("max_consecutive_skips", defaults.max_consecutive_skips),
        )
        self._stats = CacheStats()
        self._transformer: nn.Module | None = None
        self._scheduler: Any = None

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
        ``overrides`` may set ``warmup_steps``, ``final_steps`` and ``max_consecutive_skips``.
        """
        coefficients = source if isinstance(source, Coefficients) else load_coefficients(source)
        if speedup is not None:
            if rel_l1_thresh is not None:
                raise ConfigError("pass either rel_l1_thresh= or speedup=, not both.")
            rel_l1_thresh = coefficients.threshold_for_speedup(speedup)
        return cls(coefficients, rel_l1_thresh, **overrides)

    @property
    def signal(self) -> str:
        return self.coefficients.signal

    @property
    def rel_l1_thresh(self) -> float:
        return self.rule.rel_l1_thresh

    def apply(self, pipe_or_transformer: Any, *, num_inference_steps: int | None = None) -> "TeaCache":
        """Hook the cache into a diffusers pipeline (its ``transformer``) or a transformer; returns self.

        The step count, needed to force the final steps, comes from the pipeline's cache context or its
        scheduler; for a bare transformer pass ``num_inference_steps``.
        """
        if self._transformer is not None:
            raise TeaCacheError("this TeaCache is already applied; call .remove() before applying it again.")
        transformer, scheduler = _unpack(pipe_or_transformer)
        self._check_class(transformer)

        def num_steps() -> int | None:
            if num_inference_steps is not None:
                return num_inference_steps
            timesteps = getattr(scheduler, "timesteps", None)
            return len(timesteps) if timesteps is not None else None

        apply_teacache(transformer, self.rule, self.signal, self._stats, num_steps)
        self._transformer = transformer
        self._scheduler = _reset_on_new_generation(scheduler, self.reset)
        return self

    def remove(self) -> None:
        """Take every hook off the transformer; its forward is then exactly what it was before."""
        if self._transformer is not None:
            remove_teacache(self._transformer)
            self._transformer = None
        if self._scheduler is not None:
            self._scheduler.__dict__.pop("set_timesteps", None)
            self._scheduler = None

    def reset(self) -> None:
        """Forget the per-branch state, as a pipeline does after each generation (for bare transformer use)."""
        if self._transformer is not None:
            reset_teacache(self._transformer)

    @property
    def stats(self) -> dict[str, BranchStats]:
        """Per CFG branch ("cond", "uncond", ...): computed and skipped call counts, and the latest trace."""
        return dict(self._stats.branches)

    def reset_stats(self) -> None:
        self._stats.clear()

    def __enter__(self) -> "TeaCache":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        target = type(self._transformer).__name__ if self._transformer is not None else "nothing"
        return (
            f"TeaCache(model={self.coefficients.model!r}, signal={self.signal!r}, "
            f"rel_l1_thresh={self.rel_l1_thresh}, applied to {target})"
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


def _unpack(target: Any) -> tuple[nn.Module, Any]:
    if isinstance(target, nn.Module):
        return target, None
    transformer = getattr(target, "transformer", None)
    if isinstance(transformer, nn.Module):
        if getattr(target, "transformer_2", None) is not None:
            logger.warning(
                "TeaCache caches pipe.transformer only; pipe.transformer_2 (the low-noise expert) runs uncached, "
                "since one coefficients file describes one expert."
            )
        return transformer, getattr(target, "scheduler", None)
    raise UnsupportedModelError(
        f"apply() takes a diffusers pipeline with a `transformer` or a transformer module, got {type(target).__name__}."
    )


def _reset_on_new_generation(scheduler: Any, reset: Any) -> Any:
    """Every diffusers pipeline sets its scheduler's timesteps when a generation starts: reset there too.

    The pipeline's own end-of-call reset never runs when a call raises (a cancelled request, a callback
    that raises); without this the next call would continue the broken call's trajectory.
    """
    set_timesteps = getattr(scheduler, "set_timesteps", None)
    if set_timesteps is None or "set_timesteps" in vars(scheduler):
        return None

    @functools.wraps(set_timesteps)  # pipelines inspect its signature (sigmas=, timesteps=)
    def set_timesteps_and_reset(*args: Any, **kwargs: Any) -> Any:
        reset()
        return set_timesteps(*args, **kwargs)

    scheduler.set_timesteps = set_timesteps_and_reset
    return scheduler


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
