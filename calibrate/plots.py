"""The PNG beside a coefficients file: judge the fit and the threshold curve at a glance.

PNGs are written like the JSON: a temp file beside the target, fsync, the mode of the file replaced,
rename, so a kill mid-write never leaves a truncated PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as ticker  # noqa: E402
import numpy as np  # noqa: E402

from runtime import Coefficients  # noqa: E402
from runtime.coefficients import commit_file, stage_file, unwritable  # noqa: E402
from runtime.errors import TeaCacheError  # noqa: E402


def stage_figure(fig: Any, path: Path, error: type[TeaCacheError] = TeaCacheError) -> Path:
    """Render ``fig`` as PNG into a fsync'd temp file beside ``path`` (see ``runtime.coefficients.stage_file``)
    and close it; returns the temp path for ``commit_file``. A failed write raises ``error``, changing nothing."""
    try:
        return stage_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    except OSError as exc:
        raise error(unwritable(Path(path), exc)) from None
    finally:
        plt.close(fig)


def save_figure(fig: Any, path: Path, error: type[TeaCacheError] = TeaCacheError) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically (temp, fsync, rename) and close it."""
    staged = stage_figure(fig, path, error)
    try:
        return commit_file(staged, path)
    except OSError as exc:
        raise error(unwritable(Path(path), exc)) from None


def plot_fit(path: Path, coefficients: Coefficients, extras: dict[str, Any]) -> Path:
    """:func:`fit_figure` written to ``path`` atomically."""
    return save_figure(fit_figure(coefficients, extras), path)


def fit_figure(coefficients: Coefficients, extras: dict[str, Any]) -> Any:
    """Left: the (x, y) cloud, training and held-out, with the written fit and the plain fit.
    Right: threshold -> mean computed fraction (band: spread over prompts), default marked."""
    result = extras["results"][extras["signal"]]
    points, fit, plain = result["points"], result["fit"], result["plain"]
    report = coefficients.fit or {}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)

    train = ~points.heldout
    left.scatter(points.x[train], points.y[train], s=6, alpha=0.35, color="0.45", label="training prompts")
    left.scatter(points.x[~train], points.y[~train], s=8, alpha=0.6, color="tab:orange", label="held-out prompts")
    lo, hi = fit.x_range
    span = hi - lo
    grid = np.linspace(max(0.0, lo - 0.1 * span), hi + 0.1 * span, 400)
    left.axvspan(lo, hi, color="tab:blue", alpha=0.06, label="fitted x range")
    left.plot(grid, fit.predict(grid), color="tab:blue", lw=2.2,
              label=f"{fit.method} fit: R² {report.get('r2'):.3f}, held-out {report.get('r2_heldout'):.3f}")
    left.plot(grid, np.polyval(plain.coefficients, grid), color="tab:red", lw=1.5, ls="--",
              label=f"plain least squares: held-out {report['plain']['r2_heldout']:.3f}")
    ymax = float(np.quantile(points.y, 0.995)) * 1.3 if points.y.size else 1.0
    left.set_ylim(min(0.0, float(np.min(np.polyval(plain.coefficients, grid)))) * 1.1 if ymax else 0, ymax)
    left.set_xlabel(f"x: rel-L1 change of the {coefficients.signal.replace('_', ' ')}")
    left.set_ylabel("y: rel-L1 change of the transformer output")
    left.set_title(f"{coefficients.model}: {report.get('points')} + {report.get('points_heldout')} held-out points")
    left.legend(fontsize=8, loc="upper left")

    rows = extras["rows"]
    thresholds = np.array([r.rel_l1_thresh for r in rows])
    fraction = np.array([r.computed_fraction for r in rows])
    spread = np.array([r.computed_fraction_std for r in rows])
    shown = thresholds > 0
    right.plot(thresholds[shown], fraction[shown], color="tab:blue", marker="o", ms=3)
    right.fill_between(thresholds[shown], (fraction - spread)[shown], (fraction + spread)[shown], color="tab:blue", alpha=0.2,
                       label="± std over prompts")
    default = extras["default"]
    right.axvline(default, color="tab:green", ls=":", label=f"default rel_l1_thresh {default}")
    for speedup in (1.5, 2.0, 3.0):
        right.axhline(1 / speedup, color="0.6", lw=0.8, ls="--")
        right.text(thresholds[shown][0], 1 / speedup + 0.01, f"{speedup:g}x", fontsize=8, color="0.4")
    right.set_xscale("log")
    right.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    right.xaxis.set_minor_formatter(ticker.NullFormatter())
    right.set_ylim(0, 1.05)
    right.set_xlabel("rel_l1_thresh")
    right.set_ylabel("computed fraction (replayed decision rule)")
    right.set_title("threshold -> computed fraction (ideal speedup = 1 / fraction)")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    return fig


_STYLES = {
    "teacache": ("tab:blue", "o", "TeaCache (calibrated)"),
    "oracle": ("black", "s", "oracle (true output change)"),
    "first_block_cache": ("tab:orange", "^", "FirstBlockCache"),
    "mag_cache": ("tab:green", "D", "MagCache (own calibration)"),
    "taylorseer": ("tab:brown", "v", "TaylorSeer (attention only)"),
    "teacache_dsigma": ("tab:cyan", "o", "TeaCache, sigma-weighted"),
    "teacache_joint": ("tab:purple", "o", "TeaCache, branches joint"),
    "teacache_drift": ("tab:pink", "o", "TeaCache, drift since last compute"),
    "fixed_schedule": ("tab:olive", "P", "fixed schedule (from traces)"),
    "searched_schedule": ("darkgreen", "*", "searched schedule (calibrated on training outputs)"),
    "uniform": ("tab:gray", "x", "uniform schedule"),
    "schedule_search": ("tab:red", "*", "schedule search (bound)"),
}


#: PSNR drawn at most this high (outputs identical to full compute are drawn there too).
CEILING_DB = 60.0


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both speedup and quality (higher is better), sorted by speedup."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):  # fastest first; keep a point if it is better than all faster ones
        if not front or y > front[-1][1]:
            front.append((x, y))
    return sorted(front)


def plot_pareto(path: Path, rows: list, title: str) -> Path:
    """PSNR against speedup, wall clock (left) and 1 / computed fraction (right): every setting of each method as a
    marker, and its Pareto front (the settings no other setting of the method beats on both axes) as a line sorted
    by speedup, labelled with the method's name at its fast end."""
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.6), constrained_layout=True)
    finite = [r.psnr for r in rows if r.psnr is not None]
    # Above ~60 dB outputs are indistinguishable; drawing them (and identical ones) at a ceiling keeps the axis on
    # the range where the methods differ.
    ceiling = min(max(finite) + 3, CEILING_DB) if finite else CEILING_DB
    for ax, key, label in (
        (axes[0], lambda r: r.wall_speedup, "wall-clock speedup (median of repeats)"),
        (axes[1], lambda r: 1 / max(r.computed_fraction, 1e-6), "ideal speedup = 1 / computed fraction"),
    ):
        ends = []
        for method, (color, marker, name) in _STYLES.items():
            mine = [r for r in rows if r.method == method]
            if not mine:
                continue
            points = [(key(r), ceiling if r.psnr is None else min(r.psnr, ceiling)) for r in mine]
            ax.scatter(*zip(*points), color=color, marker=marker, s=60 if marker == "*" else 24, alpha=0.45, zorder=2)
            front = pareto_front(points)
            ax.plot(*zip(*front), color=color, marker=marker, ms=8 if marker == "*" else 5, lw=1.8, label=name, zorder=3)
            ends.append((front[-1], color, name.split(" (")[0]))
        xspan = max(x for (x, _), _, _ in ends) - min(x for (x, _), _, _ in ends) if ends else 1.0
        for (x, y), color, name in _label_positions(ends, 0.2 * max(xspan, 0.1)):
            ax.annotate(name, (x, y), xytext=(6, 0), textcoords="offset points", color=color, fontsize=8,
                        va="center", fontweight="bold")
        ax.axhline(ceiling, color="0.7", ls=":", lw=1)
        ax.text(ax.get_xlim()[0], ceiling, f" identical to full compute, or >= {ceiling:.0f} dB", va="bottom", fontsize=8,
                color="0.4")
        ax.set_xlim(right=ax.get_xlim()[1] + 0.18 * (ax.get_xlim()[1] - ax.get_xlim()[0]))  # room for the labels
        ax.set_xlabel(label)
        ax.set_ylabel("PSNR vs full compute (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(title + "; lines: each method's Pareto front")
    return save_figure(fig, path)


def _label_positions(ends: list, width: float) -> list:
    """Labels at the fronts' fast ends, nudged apart vertically so that they do not overlap."""
    placed: list = []
    span = max((y for (_, y), _, _ in ends), default=1.0) - min((y for (_, y), _, _ in ends), default=0.0)
    gap = max(span, 1.0) * 0.035
    for (x, y), color, name in sorted(ends, key=lambda e: e[0][1]):
        for (px, py), _, _ in placed:
            if abs(px - x) < width and abs(py - y) < gap:
                y = py + gap
        placed.append(((x, y), color, name))
    return placed
