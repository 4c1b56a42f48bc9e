"""The fitter's guarantees on controlled (x, y) samples: monotone, non-negative, robust to outliers."""

import numpy as np
import pytest

from calibrate.fitting import FitError, fit_polynomial, heldout_prompts, r_squared, threshold_grid


def sample(n=2000, seed=0, outliers=0.0):
    """y = a smooth increasing curve of x plus noise; a fraction of points replaced by large errors."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.02, 0.3, n)
    y = 0.05 + 2.0 * x**2 + rng.normal(0, 0.005, n)
    bad = rng.random(n) < outliers
    y[bad] = rng.uniform(0.5, 2.0, bad.sum())
    return x, y


def test_robust_fit_is_monotone_and_nonnegative_where_plain_is_not():
    # A dip: least squares of degree 4 wiggles, and it goes negative near the low end.
    rng = np.random.default_rng(1)
    x = np.sort(rng.uniform(0.0, 1.0, 400))
    y = np.where(x < 0.2, 0.0, x - 0.2) + 0.3 * np.exp(-((x - 0.05) / 0.03) ** 2) * (x < 0.1)
    plain = fit_polynomial(x, y, 4, "plain")
    robust = fit_polynomial(x, y, 4, "robust")
    grid = np.linspace(*plain.x_range, 2001)
    assert np.min(np.diff(np.polyval(plain.coefficients, grid))) < 0
    assert robust.min_slope() >= -1e-6
    assert np.polyval(robust.coefficients, grid).min() >= -1e-9


def test_robust_fit_resists_outliers():
    clean_x, clean_y = sample()
    dirty_x, dirty_y = sample(outliers=0.05)
    truth = 0.05 + 2.0 * clean_x**2
    robust = fit_polynomial(dirty_x, dirty_y, 4, "robust")
    plain = fit_polynomial(dirty_x, dirty_y, 4, "plain")
    error = lambda fit: float(np.sqrt(np.mean((fit.predict(clean_x) - truth) ** 2)))  # noqa: E731
    assert error(robust) < 0.003
    assert error(plain) > 5 * error(robust)


def test_plain_is_numpy_polyfit_and_range_is_the_data():
    x, y = sample(200)
    fit = fit_polynomial(x, y, 3, "plain")
    np.testing.assert_allclose(fit.coefficients, np.polyfit(x, y, 3))
    assert fit.x_range == (x.min(), x.max())
    assert fit.predict(np.array([-1.0]))[0] == pytest.approx(max(np.polyval(fit.coefficients, x.min()), 0))


def test_fit_errors():
    with pytest.raises(FitError, match="method='lasso'"):
        fit_polynomial(np.ones(10), np.ones(10), 4, "lasso")
    with pytest.raises(FitError, match="cannot determine a degree-4"):
        fit_polynomial(np.arange(3.0), np.arange(3.0), 4)
    with pytest.raises(FitError, match="never varies"):
        fit_polynomial(np.full(10, 0.1), np.arange(10.0), 2)


def test_heldout_split_is_by_prompt_and_deterministic():
    prompts = [f"p{i}" for i in range(20)] * 3
    held = heldout_prompts(prompts, 0.25)
    assert len(held) == 5 and held == heldout_prompts(list(reversed(prompts)), 0.25)
    with pytest.raises(FitError, match="at least 2 are needed"):
        heldout_prompts(["only"] * 5, 0.25)


def test_r_squared_and_grid():
    y = np.array([1.0, 2.0, 3.0])
    assert r_squared(y, y) == 1.0 and r_squared(y, np.full(3, 2.0)) == 0.0
    grid = threshold_grid(np.array([0.01, 0.02, 0.05]), np.array([0.5, 1.0]))
    assert grid[0] == 0.0 and grid == sorted(set(grid)) and len(grid) > 10
