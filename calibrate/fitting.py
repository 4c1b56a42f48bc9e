"""Polynomial fits of the output change y against a signal change x, and what they are judged by.

Two methods:

- ``plain``: least squares on all points (``numpy.polyfit``), what upstream TeaCache did. Nothing
  stops it from going negative or decreasing inside the fitted range, and one outlier pulls it.
- ``robust`` (the default): Huber loss by iteratively reweighted least squares, each step a small
  quadratic program solved by scipy (SLSQP) under linear constraints that make the polynomial
  non-decreasing on a dense grid of the fitted x range and non-negative at its low end, hence
  non-negative on the whole range. The accumulator can then never run backwards, and a larger
  signal change never predicts a smaller output change.

R^2 is always that of the prediction the runtime makes: x clamped to the fitted range, the polynomial
evaluated there, negative values counted as 0.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from runtime.errors import TeaCacheError

METHODS = ("robust", "plain")


class FitError(TeaCacheError):
    """Traces that cannot be fitted: too few points, too few prompts, nonsense settings."""


@dataclass(frozen=True)
class PolyFit:
    """A fitted polynomial: coefficients highest power first (numpy.poly1d order) and its x range."""

    coefficients: tuple[float, ...]
    x_range: tuple[float, float]
    method: str

    def predict(self, x: np.ndarray) -> np.ndarray:
        """What the runtime predicts: the polynomial at x clamped to the range, floored at 0."""
        clamped = np.clip(np.asarray(x, dtype=np.float64), *self.x_range)
        return np.maximum(np.polyval(self.coefficients, clamped), 0.0)

    def min_slope(self, samples: int = 10_001) -> float:
        """The smallest derivative on the fitted range (>= 0 up to rounding for the robust method)."""
        grid = np.linspace(*self.x_range, samples)
        return float(np.min(np.polyval(np.polyder(self.coefficients), grid)))


def r_squared(y: np.ndarray, prediction: np.ndarray) -> float:
    """1 - SS_res / SS_tot; NaN when y has no spread or no points."""
    y = np.asarray(y, dtype=np.float64)
    if y.size < 2:
        return float("nan")
    total = float(np.sum((y - y.mean()) ** 2))
    if total == 0.0:
        return float("nan")
    return 1.0 - float(np.sum((y - prediction) ** 2)) / total


def fit_polynomial(x: np.ndarray, y: np.ndarray, degree: int = 4, method: str = "robust") -> PolyFit:
    """Fit y ~ p(x) of the given degree on finite points; the range is that of the x values seen."""
    if method not in METHODS:
        raise FitError(f"method={method!r} is not one of {', '.join(METHODS)}; pass method=robust or method=plain.")
    if not isinstance(degree, int) or degree < 1:
        raise FitError(f"degree must be an integer >= 1, got {degree!r}.")
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.size < degree + 1:
        raise FitError(f"{x.size} finite points cannot determine a degree-{degree} polynomial; record more prompts.")
    x_range = (float(x.min()), float(x.max()))
    if x_range[1] <= 0.0 or x_range[0] == x_range[1]:
        raise FitError(f"the signal change x never varies (range {x_range}), so nothing can be fitted to it.")
    if method == "plain":
        return PolyFit(tuple(float(c) for c in np.polyfit(x, y, degree)), x_range, method)
    return PolyFit(_robust_monotone(x, y, degree, x_range), x_range, method)


def _robust_monotone(x: np.ndarray, y: np.ndarray, degree: int, x_range: tuple[float, float]) -> tuple[float, ...]:
    from scipy.optimize import minimize  # imported here: the command lines check their arguments first

    scale = x_range[1]  # fit in u = x / scale, in [lo/scale, 1], for a well-conditioned problem
    u = x / scale
    powers = np.arange(degree, -1, -1)
    design = u[:, None] ** powers  # highest power first
    grid = np.linspace(x_range[0] / scale, 1.0, 257)
    slope_rows = np.where(powers > 0, powers * grid[:, None] ** np.maximum(powers - 1, 0), 0.0)
    low_row = (x_range[0] / scale) ** powers
    constraint_matrix = np.vstack([slope_rows, low_row[None, :]])
    constraints = [{"type": "ineq", "fun": lambda c: constraint_matrix @ c, "jac": lambda c: constraint_matrix}]

    weights = np.ones_like(y)
    coefficients = np.linalg.lstsq(design, y, rcond=None)[0]
    for iteration in range(100):
        sw = weights / weights.sum()
        hessian = design.T @ (design * sw[:, None])
        target = design.T @ (sw * y)
        offset = float(np.sum(sw * y * y))
        result = minimize(
            lambda c: c @ hessian @ c - 2 * target @ c + offset,
            coefficients,
            jac=lambda c: 2 * (hessian @ c - target),
            method="SLSQP",
            constraints=constraints,
            options={"maxiter": 500, "ftol": 1e-15},
        )
        previous, coefficients = coefficients, result.x
        residual = y - design @ coefficients
        spread = 1.4826 * np.median(np.abs(residual - np.median(residual)))
        delta = 1.345 * max(spread, 1e-12 * max(1.0, float(np.abs(y).max())))
        weights = np.minimum(1.0, delta / np.maximum(np.abs(residual), 1e-300))
        # Iteration 0 solves with uniform weights; convergence is judged between reweighted solves.
        if iteration > 0 and np.max(np.abs(coefficients - previous)) <= 1e-9 * max(1.0, float(np.max(np.abs(coefficients)))):
            break
    return tuple(float(c) for c in coefficients / scale ** powers)


def heldout_prompts(prompts: list[str], fraction: float) -> set[str]:
    """A deterministic split by prompt: the ``fraction`` of distinct prompts whose sha256 sorts first."""
    distinct = sorted(set(prompts), key=lambda p: hashlib.sha256(p.encode("utf-8")).hexdigest())
    if not 0.0 < fraction < 1.0:
        raise FitError(f"heldout_fraction must be in (0, 1), got {fraction!r}.")
    if len(distinct) < 2:
        raise FitError(
            f"the traces hold {len(distinct)} distinct prompt(s); at least 2 are needed to hold prompts out. "
            "Record more (raise limit=)."
        )
    count = min(len(distinct) - 1, max(1, round(fraction * len(distinct))))
    return set(distinct[:count])


def threshold_grid(p_steps: np.ndarray, p_totals: np.ndarray, count: int = 48) -> list[float]:
    """Thresholds from where the first steps start to skip to where nearly every step skips.

    ``p_steps`` are per-step predictions and ``p_totals`` per-trajectory sums of them. Values are
    rounded to 3 significant digits; 0 (never skip) comes first.
    """
    positive = p_steps[np.isfinite(p_steps) & (p_steps > 0)]
    totals = p_totals[np.isfinite(p_totals) & (p_totals > 0)]
    if positive.size == 0 or totals.size == 0:
        return [0.0]
    low = max(float(np.quantile(positive, 0.05)) * 0.5, 1e-6)
    high = max(float(np.quantile(totals, 0.95)), low * 10)
    grid = [float(f"{t:.3g}") for t in np.geomspace(low, high, count)]
    return [0.0] + sorted(set(grid))
