"""``python -m calibrate.score coefficients=<name or path> traces=<h5...>``: how well a coefficients file
(published or ours) fits your own traces, and whether to recalibrate.

On the traces' decision steps (the calls where the rule actually decides: not step 0, not the file's
warm-up steps, not its forced final steps) it reports:

- the decision-step R² of ``y`` against the prediction this runtime makes (x clamped to the file's
  ``x_range``, p floored at 0), and against the raw polynomial as the other ports evaluate it;
- the share of x outside the file's ``x_range`` (below and above);
- where the raw polynomial is negative or decreasing over the traces' x, and the share of decision
  steps where the runtime's evaluation lands in such a region;
- the replayed threshold table: the runtime's rule replayed on every trajectory at the file's tabulated
  thresholds (or a grid), computed fraction mean and spread over prompts, beside the file's own table.

Then one summary line, ``recalibrate: <reasons>`` or ``ok: ...``, a JSON report and a PNG. The file
and the traces must be of the same transformer class.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra

from runtime.errors import TeaCacheError

from .cli import CONF_PATH, one_line_errors
from .export import negative_or_decreasing, write_text_atomic

if TYPE_CHECKING:
    import numpy as np

    from runtime.coefficients import Coefficients

    from .traces import TraceSet

SIGNAL_FIELDS = {"modulated_input": "x", "timestep_embedding": "x_temb"}


class ScoreError(TeaCacheError):
    """Coefficients and traces that cannot be scored together, or nonsense settings."""


@dataclass(frozen=True)
class ScoreSettings:
    """The bars of the summary line: past any of them, the line says to recalibrate."""

    min_r2: float = 0.5
    max_outside: float = 0.1
    max_bad_share: float = 0.05
    max_fraction_shift: float = 0.1
    max_r2_gain: float = 0.1
    rel_l1_thresh: float | None = None

    def __post_init__(self) -> None:
        for name in ("min_r2", "max_outside", "max_bad_share", "max_fraction_shift", "max_r2_gain"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ScoreError(f"{name} must be a finite number, got {value!r}.")
        for name in ("max_outside", "max_bad_share", "max_fraction_shift"):
            if not 0 <= getattr(self, name) <= 1:
                raise ScoreError(f"{name} must be in [0, 1] (a share), got {getattr(self, name)!r}.")
        thresh = self.rel_l1_thresh
        if thresh is not None and (not isinstance(thresh, (int, float)) or isinstance(thresh, bool) or not math.isfinite(thresh) or thresh < 0):
            raise ScoreError(f"rel_l1_thresh must be a finite number >= 0 or null (the file's default), got {thresh!r}.")


def decision_mask(num_steps: int, warmup_steps: int, final_steps: int) -> "np.ndarray":
    """True on the steps where the rule decides: not step 0, not warm-up, not the forced final steps."""
    import numpy as np

    steps = np.arange(num_steps)
    return (steps > 0) & (steps >= warmup_steps) & (steps < num_steps - final_steps)


def runtime_prediction(c: "Coefficients", x: "np.ndarray") -> "np.ndarray":
    import numpy as np

    clamped = np.clip(x, *c.x_range) if c.x_range is not None else x
    return np.maximum(np.polyval(c.coefficients, clamped), 0.0)


def _r2(y: "np.ndarray", prediction: "np.ndarray") -> float | None:
    from .fitting import r_squared

    value = r_squared(y, prediction)
    return None if not math.isfinite(value) else float(value)


def replay_table(c: "Coefficients", traces: "TraceSet", field: str, thresholds: list[float]) -> list[dict[str, float]]:
    """The runtime's rule replayed on every trajectory per threshold: mean and std over prompts of the
    computed fraction (each prompt's value averaged over its seeds and branches)."""
    import numpy as np
    import torch

    from runtime.decision import DecisionRule, replay

    by_length: dict[int, list] = {}
    for t in traces.trajectories:
        by_length.setdefault(len(t.data[field]), []).append(t)
    prompt_ids = {p: i for i, p in enumerate(sorted({t.prompt for t in traces.trajectories}))}
    groups = [
        (torch.from_numpy(np.stack([t.data[field] for t in group]).astype(np.float32)), np.array([prompt_ids[t.prompt] for t in group]))
        for group in by_length.values()
    ]
    rows = []
    for thresh in thresholds:
        rule = DecisionRule.of(c, c.defaults.with_overrides(rel_l1_thresh=thresh))
        sums, counts = np.zeros(len(prompt_ids)), np.zeros(len(prompt_ids))
        for x, ids in groups:
            fractions = replay(rule, x).double().mean(dim=1).numpy()
            sums += np.bincount(ids, weights=fractions, minlength=len(prompt_ids))
            counts += np.bincount(ids, minlength=len(prompt_ids))
        means = sums / counts
        rows.append({"rel_l1_thresh": float(thresh), "computed_fraction": round(float(means.mean()), 4),
                     "computed_fraction_std": round(float(means.std()), 4)})
    return rows


def score(c: "Coefficients", traces: "TraceSet", settings: ScoreSettings = ScoreSettings()) -> dict[str, Any]:
    """The whole score as a JSON-ready dict (plus ``_points`` for the plot). The polynomial is scored as the
    upstream rule runs it (with its own default threshold where the file's default is another rule)."""
    import numpy as np

    from .fitting import threshold_grid

    c = c.for_rule("teacache")

    if traces.transformer_class != c.transformer_class:
        raise ScoreError(
            f"{c.origin} is for {c.transformer_class}, but {traces.files[0]} holds traces of a "
            f"{traces.transformer_class}; score coefficients against traces of the same transformer class."
        )
    field = SIGNAL_FIELDS[c.signal]
    xs, ys, all_x, all_y = [], [], [], []
    for t in traces.trajectories:
        x = np.asarray(t.data[field], dtype=np.float64)
        y = np.asarray(t.data["y"], dtype=np.float64)
        mask = decision_mask(len(x), c.defaults.warmup_steps, c.defaults.final_steps)
        finite = np.isfinite(x) & np.isfinite(y)
        xs.append(x[mask & finite])
        ys.append(y[mask & finite])
        all_x.append(x[finite])
        all_y.append(y[finite])
    x, y = np.concatenate(xs), np.concatenate(ys)
    if x.size < 2:
        raise ScoreError(
            f"{', '.join(map(str, traces.files))} hold {x.size} finite decision steps (after step 0, "
            f"{c.defaults.warmup_steps} warm-up and {c.defaults.final_steps} final steps); record longer or more runs."
        )
    prediction = runtime_prediction(c, x)
    report: dict[str, Any] = {
        "coefficients": c.origin,
        "model": c.model,
        "transformer_class": c.transformer_class,
        "signal": c.signal,
        "provenance": c.provenance.get("kind"),
        "traces": [str(p) for p in traces.files],
        "traces_model": traces.model,
        "trajectories": len(traces.trajectories),
        "decision_points": int(x.size),
        "r2_decision": _r2(y, prediction),
        "r2_decision_raw_polynomial": _r2(y, np.polyval(c.coefficients, x)),
        "r2_all_steps": _r2(np.concatenate(all_y), runtime_prediction(c, np.concatenate(all_x))),
        "r2_fresh_fit": _fresh_fit_r2(x, y, len(c.coefficients) - 1),
        "x_traces": [float(x.min()), float(x.max())],
        "x_range": list(c.x_range) if c.x_range is not None else None,
    }
    recipe_file = {k: v for k, v in (c.recipe or {}).items() if v is not None}
    recipe_traces = {**traces.recipe.for_coefficients(), "pipeline": traces.pipeline_class}
    report["recipe_differs"] = {k: [v, recipe_traces.get(k)] for k, v in recipe_file.items() if recipe_traces.get(k) != v}

    if c.x_range is not None:
        lo, hi = c.x_range
        report["share_below_x_range"] = float(np.mean(x < lo))
        report["share_above_x_range"] = float(np.mean(x > hi))
        report["share_outside_x_range"] = report["share_below_x_range"] + report["share_above_x_range"]
    else:
        report["share_below_x_range"] = report["share_above_x_range"] = report["share_outside_x_range"] = None
    regions = negative_or_decreasing(c.coefficients, float(x.min()), float(x.max()))
    report["negative_on"] = [[float(f"{a:.6g}"), float(f"{b:.6g}")] for a, b in regions["negative"]]
    report["decreasing_on"] = [[float(f"{a:.6g}"), float(f"{b:.6g}")] for a, b in regions["decreasing"]]
    evaluated = np.clip(x, *c.x_range) if c.x_range is not None else x
    negative = np.polyval(c.coefficients, evaluated) < 0
    decreasing = np.polyval(np.polyder(c.coefficients), evaluated) < 0
    report["share_negative"] = float(np.mean(negative))
    report["share_decreasing"] = float(np.mean(decreasing))
    report["share_negative_or_decreasing"] = float(np.mean(negative | decreasing))

    default = c.defaults.rel_l1_thresh if settings.rel_l1_thresh is None else float(settings.rel_l1_thresh)
    if c.thresholds:
        grid = [row.rel_l1_thresh for row in c.thresholds]
    else:
        p_steps = prediction
        totals = np.array([runtime_prediction(c, np.nan_to_num(np.asarray(t.data[field], dtype=np.float64)[
            decision_mask(len(t.data[field]), c.defaults.warmup_steps, c.defaults.final_steps)])).sum()
            for t in traces.trajectories])
        grid = threshold_grid(p_steps, totals, count=24)
    grid = sorted(set(grid) | {default})
    rows = replay_table(c, traces, field, grid)
    theirs = {row.rel_l1_thresh: row.computed_fraction for row in c.thresholds}
    for row in rows:
        row["file_computed_fraction"] = theirs.get(row["rel_l1_thresh"])
    report["thresholds"] = rows
    at_default = next(row for row in rows if row["rel_l1_thresh"] == default)
    report["rel_l1_thresh"] = default
    report["computed_fraction_at_threshold"] = at_default["computed_fraction"]
    report["file_computed_fraction_at_threshold"] = at_default["file_computed_fraction"]

    reasons = []
    r2 = report["r2_decision"]
    if r2 is None or r2 < settings.min_r2:
        reasons.append(f"decision-step R² {_fmt(r2)} < {settings.min_r2:g}")
    fresh = report["r2_fresh_fit"]
    if r2 is not None and fresh is not None and fresh - r2 > settings.max_r2_gain:
        reasons.append(f"a fresh degree-{len(c.coefficients) - 1} fit of these traces reaches R² {fresh:.3f} (+{fresh - r2:.3f})")
    if report["share_outside_x_range"] is not None and report["share_outside_x_range"] > settings.max_outside:
        reasons.append(f"{report['share_outside_x_range']:.0%} of x outside the file's x_range (> {settings.max_outside:.0%})")
    if report["share_negative_or_decreasing"] > settings.max_bad_share:
        reasons.append(
            f"the polynomial is negative or decreasing at {report['share_negative_or_decreasing']:.0%} of decision steps "
            f"(> {settings.max_bad_share:.0%})"
        )
    if at_default["file_computed_fraction"] is not None:
        shift = abs(at_default["computed_fraction"] - at_default["file_computed_fraction"])
        if shift > settings.max_fraction_shift:
            reasons.append(
                f"at rel_l1_thresh {default:g} these traces compute {at_default['computed_fraction']:.2f} of calls, the file's "
                f"table says {at_default['file_computed_fraction']:.2f}"
            )
    report["recalibrate"] = bool(reasons)
    report["reasons"] = reasons
    if reasons:
        report["summary"] = (
            f"recalibrate: {c.model} fits these traces poorly ({'; '.join(reasons)}); run `python -m calibrate.fit "
            f"traces={traces.files[0]}`."
        )
    else:
        outside = report["share_outside_x_range"]
        report["summary"] = (
            f"ok: no need to recalibrate: decision-step R² {_fmt(r2)}, "
            + (f"{outside:.0%} of x outside x_range, " if outside is not None else "no x_range stated, ")
            + f"computed fraction {at_default['computed_fraction']:.2f} at rel_l1_thresh {default:g}."
        )
    report["_points"] = (x, y)
    return report


def _fresh_fit_r2(x: "np.ndarray", y: "np.ndarray", degree: int) -> float | None:
    """R² of a plain least-squares polynomial of the same degree fitted to these decision steps (in
    sample): about the best any polynomial of that degree can do here."""
    import numpy as np

    if x.size <= degree + 1 or np.ptp(x) == 0:
        return None
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", np.exceptions.RankWarning if hasattr(np, "exceptions") else Warning)
            fit = np.polyfit(x, y, degree)
    return _r2(y, np.polyval(fit, x))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def plot_score(path: Path, c: "Coefficients", report: dict[str, Any]) -> Path:
    """Left: the decision-step (x, y) cloud with the runtime's and the raw polynomial, the x range, and
    where the polynomial is negative or decreasing. Right: the replayed threshold table beside the file's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker as ticker
    import numpy as np

    x, y = report["_points"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    left.scatter(x, y, s=6, alpha=0.4, color="0.45", label=f"decision steps ({x.size})")
    lo_x, hi_x = float(x.min()), float(x.max())
    span = hi_x - lo_x or max(hi_x, 1e-3)
    grid = np.linspace(max(0.0, lo_x - 0.1 * span), hi_x + 0.1 * span, 400)
    if c.x_range is not None:
        left.axvspan(*c.x_range, color="tab:blue", alpha=0.06, label="file's x_range")
    left.plot(grid, runtime_prediction(c, grid), color="tab:blue", lw=2.2, label=f"this runtime: R² {_fmt(report['r2_decision'])}")
    left.plot(grid, np.polyval(c.coefficients, grid), color="tab:red", lw=1.3, ls="--",
              label=f"raw polynomial (other ports): R² {_fmt(report['r2_decision_raw_polynomial'])}")
    for i, (a, b) in enumerate(report["negative_on"]):
        left.axvspan(a, b, color="tab:red", alpha=0.12, label="negative" if i == 0 else None)
    for i, (a, b) in enumerate(report["decreasing_on"]):
        left.axvspan(a, b, color="tab:orange", alpha=0.12, hatch="//", label="decreasing" if i == 0 else None)
    top = float(np.quantile(y, 0.995)) * 1.3 if y.size else 1.0
    left.set_ylim(min(0.0, float(np.min(np.polyval(c.coefficients, grid)))) * 1.1 if top else 0, top or 1.0)
    left.set_xlabel(f"x: rel-L1 change of the {c.signal.replace('_', ' ')}")
    left.set_ylabel("y: rel-L1 change of the transformer output")
    left.set_title(f"{c.model} on {Path(report['traces'][0]).name}", fontsize=10)
    left.legend(fontsize=8, loc="upper left")

    rows = [r for r in report["thresholds"] if r["rel_l1_thresh"] > 0]
    if rows:
        t = np.array([r["rel_l1_thresh"] for r in rows])
        f = np.array([r["computed_fraction"] for r in rows])
        s = np.array([r["computed_fraction_std"] for r in rows])
        right.plot(t, f, color="tab:blue", marker="o", ms=3, label="replayed on these traces")
        right.fill_between(t, f - s, f + s, color="tab:blue", alpha=0.2)
        theirs = [(r["rel_l1_thresh"], r["file_computed_fraction"]) for r in rows if r["file_computed_fraction"] is not None]
        if theirs:
            right.plot(*zip(*theirs), color="0.3", ls="--", marker="x", ms=3, label="the file's table")
        right.set_xscale("log")
        right.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        right.xaxis.set_minor_formatter(ticker.NullFormatter())
    right.axvline(report["rel_l1_thresh"], color="tab:green", ls=":", label=f"rel_l1_thresh {report['rel_l1_thresh']:g}")
    right.set_ylim(0, 1.05)
    right.set_xlabel("rel_l1_thresh")
    right.set_ylabel("computed fraction (mean over prompts)")
    right.legend(fontsize=8, loc="upper right")
    right.set_title("replayed threshold table", fontsize=10)
    import textwrap

    fig.suptitle("\n".join(textwrap.wrap(report["summary"], 150)), fontsize=9,
                 color="tab:red" if report["recalibrate"] else "tab:green")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def one_expert(c: "Coefficients", traces: "TraceSet", expert: str | None) -> tuple["Coefficients", "TraceSet"]:
    """The file and the traces as one expert of a two-expert pipeline (Wan2.2) sees them: that expert's trajectories,
    and its own polynomial (a one-polynomial file serves every expert, as in the runtime). Traces of one transformer
    pass as they are."""
    experts = traces.experts
    if expert in (None, ""):
        if len(experts) > 1:
            raise ScoreError(
                f"{traces.files[0]} holds traces of {len(experts)} experts ({', '.join(experts)}), each with its own "
                f"polynomial; score one at a time: expert={experts[0]} or expert={experts[1]}."
            )
        return c, traces
    if expert not in experts:
        raise ScoreError(f"expert={expert}: the traces hold {', '.join(experts)}; pass one of them.")
    return (c.for_expert(expert) if c.experts else c), traces.of_expert(expert)


def run_score(cfg) -> dict[str, Any]:
    """The CLI's work: arguments and files first, then the runtime (torch), the score, the JSON and the PNG."""
    if cfg.coefficients in (None, ""):
        raise ScoreError("coefficients= is required: a name in coefficients/ (e.g. coefficients=qwen_image) or a path to a .json file.")
    if cfg.traces in (None, "") or (not isinstance(cfg.traces, str) and len(cfg.traces) == 0):
        raise ScoreError("traces= is required: a trace file, a glob (quoted), or a list, as `python -m calibrate.record` writes them.")
    settings = ScoreSettings(
        min_r2=cfg.min_r2,
        max_outside=cfg.max_outside,
        max_bad_share=cfg.max_bad_share,
        max_fraction_shift=cfg.max_fraction_shift,
        max_r2_gain=cfg.max_r2_gain,
        rel_l1_thresh=cfg.rel_l1_thresh,
    )
    from runtime.coefficients import load_coefficients

    from .traces import expand_paths, load_traces

    spec = cfg.traces if isinstance(cfg.traces, str) else [str(t) for t in cfg.traces]
    expand_paths(spec)  # a missing trace file is named before anything loads
    c = load_coefficients(str(cfg.coefficients))
    traces = load_traces(spec)
    expert = cfg.get("expert") or None
    c, traces = one_expert(c, traces, expert)
    report = {**score(c, traces, settings), "expert": expert}
    out = Path(str(cfg.out)) if cfg.out else Path(f"score_{c.model}_{Path(traces.files[0]).stem}.png")
    if out.suffix.lower() != ".png":
        raise ScoreError(f"out={out} must name a .png file (the JSON report is written beside it).")
    document = {k: v for k, v in report.items() if not k.startswith("_")}
    write_text_atomic(out.with_suffix(".json"), json.dumps(document, indent=1) + "\n")
    if cfg.plot:
        plot_score(out, c, report)
    _print(report, out, cfg.plot)
    return report


def _print(report: dict[str, Any], out: Path, plotted: bool) -> None:
    pct = lambda v: "n/a (the file states no x_range)" if v is None else f"{v:.1%}"  # noqa: E731
    lines = [
        f"{report['model']} ({report['transformer_class']}, signal {report['signal']}"
        + (f", expert {report['expert']}" if report.get("expert") else "")
        + f") on {report['trajectories']} trajectories of {', '.join(report['traces'])}",
        f"  decision-step R² {_fmt(report['r2_decision'])} (raw polynomial, as other ports evaluate it: "
        f"{_fmt(report['r2_decision_raw_polynomial'])}; all steps: {_fmt(report['r2_all_steps'])}) on {report['decision_points']} points; "
        f"a fresh plain fit of the same degree: {_fmt(report['r2_fresh_fit'])}",
        f"  x of the traces [{report['x_traces'][0]:.4g}, {report['x_traces'][1]:.4g}], file's x_range "
        f"{report['x_range']}: outside {pct(report['share_outside_x_range'])}",
        f"  polynomial negative on {report['negative_on'] or 'none'}, decreasing on {report['decreasing_on'] or 'none'} "
        f"(runtime evaluation lands there at {report['share_negative_or_decreasing']:.1%} of decision steps)",
    ]
    if report["recipe_differs"]:
        lines.append("  recipe differs (file, traces): " + ", ".join(f"{k} {v[0]} vs {v[1]}" for k, v in report["recipe_differs"].items()))
    lines.append("  rel_l1_thresh -> computed fraction replayed on these traces (file's table):")
    for row in report["thresholds"]:
        theirs = row["file_computed_fraction"]
        mark = "  <- threshold" if row["rel_l1_thresh"] == report["rel_l1_thresh"] else ""
        lines.append(
            f"    {row['rel_l1_thresh']:<8g} {row['computed_fraction']:.3f} ± {row['computed_fraction_std']:.3f}"
            + (f"  ({theirs:.3f})" if theirs is not None else "") + mark
        )
    lines.append(f"  wrote {out.with_suffix('.json')}" + (f" and {out}" if plotted else ""))
    lines.append(report["summary"])
    print("\n".join(lines))
    sys.stdout.flush()


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="score")
def main(cfg) -> None:
    with one_line_errors():
        run_score(cfg)


if __name__ == "__main__":
    main()
