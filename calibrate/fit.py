"""``python -m calibrate.fit traces=<file or glob> out=<json>``: traces in, a validated coefficients file out.

With no arguments it fits what ``python -m calibrate.record`` with no arguments wrote. Steps:

1. read the trace files (shards), check they agree, drop non-finite points and say how many;
2. split by prompt (never by point) into training and held-out prompts;
3. fit both candidate signals (``x``: modulated input, ``x_temb``: timestep embedding) with the robust
   monotone method and with the plain least-squares method, and keep the signal whose robust fit
   predicts ``y`` better on held-out prompts; fit each CFG branch on its own too, for the report;
4. replay the runtime's decision rule (``runtime.replay``) on every trajectory over a grid of
   thresholds: the threshold table, and the default threshold (the smallest one whose mean computed
   fraction reaches ``1 / default_speedup``);
5. with ``search=N`` (and ``model=``), the ``searched_schedule`` rule: per budget, the one schedule whose real
   generations of N training prompt x seed pairs come closest to full compute;
6. with ``closed_loop=N``, the runtime run on N held-out pairs at the tables' thresholds (realized fractions);
7. write the coefficients file through the runtime's schema, and a PNG beside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, Iterator

import hydra
import numpy as np
from omegaconf import DictConfig
from tqdm.auto import tqdm

from runtime.coefficients import Coefficients, ThresholdRow, save_coefficients, threshold_reaching
from runtime.settings import DecisionSettings

from .cli import CONF_PATH, one_line_errors
from .fitting import METHODS, FitError, PolyFit, fit_polynomial, heldout_prompts, r_squared, threshold_grid
from .traces import TraceSet, expand_paths, file_digest, library_versions, load_traces

if TYPE_CHECKING:
    from runtime.decision import DecisionRule

log = logging.getLogger(__name__)

SIGNAL_FIELDS = {"modulated_input": "x", "timestep_embedding": "x_temb"}


@dataclass(frozen=True)
class FitSettings:
    degree: int = 4
    method: str = "robust"
    signal: str = "auto"
    heldout_fraction: float = 0.25
    default_speedup: float = 1.5
    # The decision settings the file's defaults carry and the table is replayed with (its threshold is
    # the fit's to choose): the one settings object of the runtime.
    decision: DecisionSettings = DecisionSettings(rel_l1_thresh=0.0)

    def __post_init__(self) -> None:
        if not isinstance(self.degree, int) or isinstance(self.degree, bool) or not 1 <= self.degree <= 12:
            raise FitError(
                f"degree must be an integer from 1 to 12, got {self.degree!r}; pass e.g. degree=4, the default."
            )
        fraction = self.heldout_fraction
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0.0 < fraction < 1.0:
            raise FitError(
                f"heldout_fraction must be a number in (0, 1), the share of prompts held out of the fit, got "
                f"{fraction!r}; pass e.g. heldout_fraction=0.25."
            )
        if self.method not in METHODS:
            raise FitError(f"method={self.method!r} is not one of {', '.join(METHODS)}.")
        if self.signal != "auto" and self.signal not in SIGNAL_FIELDS:
            raise FitError(f"signal={self.signal!r} is not one of auto, {', '.join(SIGNAL_FIELDS)}.")
        if not isinstance(self.default_speedup, (int, float)) or self.default_speedup < 1:
            raise FitError(f"default_speedup must be a number >= 1, got {self.default_speedup!r}.")

    @property
    def warmup_steps(self) -> int:
        return self.decision.warmup_steps

    def rule(
        self, rel_l1_thresh: float, fit: PolyFit | None = None, rule: str = "teacache",
        weights: tuple[float, ...] | None = None, max_lag: int | None = None,
    ) -> DecisionRule:
        """The runtime's rule with this polynomial at ``rel_l1_thresh`` (the upstream rule unless ``rule``
        names a variant; ``weights`` are teacache_dsigma's step weights; ``max_lag`` caps the skips in a
        row at the longest recorded lag, as the file's teacache_drift entry does at the runtime)."""
        from runtime.decision import DecisionRule  # torch

        polynomial = SimpleNamespace(
            coefficients=fit.coefficients if fit is not None else (0.0,),
            x_range=fit.x_range if fit is not None else None,
            step_weights=weights,
        )
        decision = self.decision.with_overrides(rel_l1_thresh=rel_l1_thresh, rule=rule)
        return DecisionRule.of(polynomial, decision if max_lag is None else decision.capped(max_lag))


@dataclass
class Points:
    """Finite (x, y) points of one signal, with the split and the step kind of each.

    ``train``: prompt and seed both in the training split; ``heldout``: prompt and seed both held out
    (neither seen in training; with one seed only, the prompt decides); points of a seen prompt with a
    held-out seed (or the reverse) are in neither. ``decision``: a step where the rule decides (not step
    0, not a warm-up step, not a forced final step): what the fit is made on and the headline R² scores.
    """

    x: np.ndarray
    y: np.ndarray
    train: np.ndarray
    heldout: np.ndarray
    decision: np.ndarray
    branch: np.ndarray
    dropped: int
    dropped_first_steps: int

    @classmethod
    def gather(cls, traces: TraceSet, field: str, split: "Split", settings: "FitSettings") -> "Points":
        trajectories = traces.trajectories
        lengths = np.array([len(t.data["y"]) for t in trajectories])
        x = np.concatenate([t.data[field] for t in trajectories]).astype(np.float64)
        y = np.concatenate([t.data["y"] for t in trajectories]).astype(np.float64)
        steps = np.concatenate([t.data["step"] for t in trajectories])
        ends = np.repeat(lengths, lengths)
        train = np.repeat([split.trains(t) for t in trajectories], lengths)
        held = np.repeat([split.holds(t) for t in trajectories], lengths)
        branch = np.repeat([t.branch for t in trajectories], lengths)
        decision = (steps >= max(1, settings.decision.warmup_steps)) & (steps < ends - settings.decision.final_steps)
        finite = np.isfinite(x) & np.isfinite(y)
        return cls(
            x=x[finite],
            y=y[finite],
            train=train[finite],
            heldout=held[finite],
            decision=decision[finite],
            branch=branch[finite],
            dropped=int((~finite).sum()),
            dropped_first_steps=int((~finite & (steps == 0)).sum()),
        )

    @classmethod
    def gather_lagged(cls, traces: TraceSet, split: "Split", settings: "FitSettings", lags: int) -> "Points":
        """The pairs (x_lag, y_lag) of every lag 1..``lags``: the signal's and the output's change between
        a step and each of the ``lags`` steps before it (the drift rule's polynomial is fitted on them)."""
        xs, ys, train, held, decision, branch, dropped, first = [], [], [], [], [], [], 0, 0
        for t in traces.trajectories:
            x = np.asarray(t.data["x_lag"][:, :lags], dtype=np.float64)
            y = np.asarray(t.data["y_lag"][:, :lags], dtype=np.float64)
            steps = np.repeat(np.asarray(t.data["step"])[:, None], lags, axis=1)
            lag = np.arange(1, lags + 1)[None, :]
            finite = np.isfinite(x) & np.isfinite(y)
            dropped += int((~finite & (steps >= lag)).sum())  # pairs whose earlier step exists
            first += int((~finite & (steps == 0)).sum())
            n = len(steps)
            on_decision = (steps >= max(1, settings.decision.warmup_steps)) & (steps < n - settings.decision.final_steps)
            xs.append(x[finite])
            ys.append(y[finite])
            decision.append(on_decision[finite])
            count = int(finite.sum())
            train.append(np.full(count, split.trains(t)))
            held.append(np.full(count, split.holds(t)))
            branch.append(np.full(count, t.branch, dtype=object))
        return cls(
            x=np.concatenate(xs), y=np.concatenate(ys), train=np.concatenate(train), heldout=np.concatenate(held),
            decision=np.concatenate(decision), branch=np.concatenate(branch), dropped=dropped, dropped_first_steps=first,
        )

    def select(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.x[mask], self.y[mask]


@dataclass(frozen=True)
class Split:
    """Which prompts and seeds are held out of the fit (deterministic: by hash of the prompt, and the
    highest seeds); with one seed, prompts alone."""

    prompts: frozenset[str]
    seeds: frozenset[int]

    @classmethod
    def of(cls, traces: TraceSet, fraction: float) -> "Split":
        prompts = heldout_prompts([t.prompt for t in traces.trajectories], fraction)
        seeds = sorted({t.seed for t in traces.trajectories})
        count = min(len(seeds) - 1, max(1, round(fraction * len(seeds)))) if len(seeds) > 1 else 0
        return cls(frozenset(prompts), frozenset(seeds[len(seeds) - count :]) if count else frozenset())

    def trains(self, t: Any) -> bool:
        return t.prompt not in self.prompts and t.seed not in self.seeds

    def holds(self, t: Any) -> bool:
        return t.prompt in self.prompts and (not self.seeds or t.seed in self.seeds)


def _scores(fit: PolyFit, points: Points, mask: np.ndarray | None = None) -> dict[str, float]:
    """R² on the decision steps (the headline: where p decides), and over all steps beside it."""
    base = np.ones_like(points.heldout) if mask is None else mask
    scores = {}
    for suffix, steps in (("", points.decision), ("_all_steps", np.ones_like(points.decision))):
        train, held = base & steps & points.train, base & steps & points.heldout
        scores[f"r2{suffix}"] = r_squared(points.y[train], fit.predict(points.x[train]))
        scores[f"r2_heldout{suffix}"] = r_squared(points.y[held], fit.predict(points.x[held]))
    return scores


def _fit_signal(points: Points, settings: FitSettings) -> dict[str, Any]:
    train = points.train & points.decision
    if train.sum() <= settings.degree or (points.heldout & points.decision).sum() == 0:
        raise FitError(
            f"{int(train.sum())} training and {int((points.heldout & points.decision).sum())} held-out finite points "
            f"on the decision steps are too few for a degree-{settings.degree} fit; record more prompts (raise limit=) "
            "or seeds, or check the traces for NaN."
        )
    chosen = fit_polynomial(*points.select(train), degree=settings.degree, method=settings.method)
    plain = fit_polynomial(*points.select(train), degree=settings.degree, method="plain")
    robust = chosen if settings.method == "robust" else fit_polynomial(*points.select(train), settings.degree, "robust")
    return {"fit": chosen, "plain": plain, "robust": robust, "points": points}


def threshold_table(
    traces: TraceSet, field: str, fit: PolyFit, settings: FitSettings, rule: str = "teacache",
    weights: tuple[float, ...] | None = None,
) -> list[ThresholdRow]:
    """Replay the runtime's rule on every trajectory over a grid of thresholds: per threshold, the
    mean and the spread over prompts of the computed fraction. ``rule`` names the variant
    (``teacache_joint`` replays the leading branch, which every branch follows; ``teacache_dsigma``
    weights each step's prediction by ``weights``)."""
    import torch

    from runtime.decision import replay

    trajectories = traces.trajectories
    lagged = rule == "teacache_drift"  # replays the lagged changes [steps, lags] (see runtime.decision.replay)
    lags = min(t.data["x_lag"].shape[1] for t in trajectories) if lagged else None
    if rule == "teacache_joint":
        leader = "cond" if any(t.branch == "cond" for t in trajectories) else min(t.branch for t in trajectories)
        trajectories = [t for t in trajectories if t.branch == leader]
    by_length: dict[int, list] = {}
    for t in trajectories:
        by_length.setdefault(len(t.data[field]), []).append(t)
    prompt_ids = {p: i for i, p in enumerate(sorted({t.prompt for t in trajectories}))}
    groups, p_steps, p_totals = [], [], []
    for group in by_length.values():
        x = np.stack([t.data["x_lag"][:, :lags] if lagged else t.data[field] for t in group]).astype(np.float32)
        groups.append((torch.from_numpy(x), np.array([prompt_ids[t.prompt] for t in group])))
        p = fit.predict(np.where(np.isfinite(x), x, fit.x_range[0]))
        if weights is not None:
            w = np.ones(p.shape[1])
            w[: min(len(weights), len(w))] = weights[: len(w)]
            p = p * w
        p[:, : max(1, settings.warmup_steps)] = 0.0
        p_steps.append(p[:, 1:].ravel())
        # the drift rule compares one prediction (not a sum) with the threshold: its grid tops out at the largest
        p_totals.append(p.reshape(len(p), -1).max(axis=1) if lagged else p.sum(axis=1))
    grid = threshold_grid(np.concatenate(p_steps), np.concatenate(p_totals))

    rows = []
    for thresh in grid:
        replayed = settings.rule(thresh, fit, rule=rule, weights=weights, max_lag=lags)
        sums, counts = np.zeros(len(prompt_ids)), np.zeros(len(prompt_ids))
        for x, ids in groups:
            fractions = replay(replayed, x).double().mean(dim=1).numpy()
            sums += np.bincount(ids, weights=fractions, minlength=len(prompt_ids))
            counts += np.bincount(ids, minlength=len(prompt_ids))
        means = sums / counts  # per prompt: over its seeds and branches
        rows.append(ThresholdRow(thresh, round(float(means.mean()), 4), round(float(means.std()), 4)))
    return rows


def step_weights(traces: TraceSet) -> tuple[float, ...] | None:
    """Per step, the sampler's step there over its mean step, from the recorded timesteps (their median
    over trajectories; a scale-free ratio, so sigma, 1000 sigma or 1 - sigma give the same weights). The
    last step, whose end the traces do not show, gets 1 (it is always computed)."""
    lengths = [len(t.data["timestep"]) for t in traces.trajectories if t.expert == "transformer"] or [0]
    n = max(set(lengths), key=lengths.count)
    rows = [t.data["timestep"] for t in traces.trajectories if len(t.data["timestep"]) == n]
    if n < 3 or not rows:
        return None
    tau = np.median(np.stack(rows).astype(np.float64), axis=0)
    steps = np.abs(np.diff(tau))
    if not np.all(np.isfinite(steps)) or steps.mean() <= 0:
        return None
    return tuple(round(float(w), 4) for w in (*(steps / steps.mean()), 1.0))


def fixed_schedule(traces: TraceSet, field: str, fit: PolyFit, settings: FitSettings, thresh: float) -> tuple[int, ...]:
    """The content-independent control: the steps the rule computes most often at ``thresh`` over all
    trajectories, as many as it computes on average (the forced steps always among them)."""
    import torch

    from runtime.decision import replay

    n = max({len(t.data[field]) for t in traces.trajectories}, key=[len(t.data[field]) for t in traces.trajectories].count)
    x = np.stack([t.data[field] for t in traces.trajectories if len(t.data[field]) == n]).astype(np.float32)
    computed = replay(settings.rule(thresh, fit), torch.from_numpy(x)).double().numpy()
    frequency = computed.mean(axis=0)
    count = int(round(computed.sum(axis=1).mean()))
    order = sorted(range(n), key=lambda step: (-frequency[step], step))
    return tuple(sorted(order[:count]))


def drift_variant(traces: TraceSet, split: Split, settings: FitSettings) -> dict[str, Any] | None:
    """The ``teacache_drift`` entry of the file: a polynomial fitted on the lagged pairs (the change since
    the last computed step predicts the output's change over the same span), its threshold table, and
    ``max_lag``, the longest lag recorded (the runtime caps the skips in a row there). None when the
    traces hold no lagged changes (recorded with ``drift_lags=0``, or before they existed)."""
    if not all("x_lag" in t.data and "y_lag" in t.data for t in traces.trajectories):
        log.info("the traces hold no lagged changes (x_lag, y_lag), so the teacache_drift rule is not calibrated")
        return None
    lags = min(t.data["x_lag"].shape[1] for t in traces.trajectories)
    points = Points.gather_lagged(traces, split, settings, lags)
    try:
        fit = _fit_signal(points, settings)["fit"]
    except FitError as exc:
        log.warning("teacache_drift not calibrated: %s", exc)
        return None
    rows = threshold_table(traces, "x", fit, settings, rule="teacache_drift")
    scores = _scores(fit, points)
    report = {
        "points": int((points.train & points.decision).sum()),
        "points_heldout": int((points.heldout & points.decision).sum()),
        "fitted_on": f"pairs (step, each of the {lags} steps before it) on decision steps of training prompts x seeds",
        **scores,
    }
    log.info("teacache_drift: R^2 %.3f on decision steps (held out %.3f), lags 1..%d", scores["r2"], scores["r2_heldout"], lags)
    return {
        "rel_l1_thresh": default_threshold(rows, settings.default_speedup),
        "thresholds": [row.to_dict() for row in rows],
        "coefficients": list(fit.coefficients),
        "x_range": list(fit.x_range),
        "max_lag": lags,
        "fit": _rounded(report),
    }


def default_threshold(rows: list[ThresholdRow], speedup: float) -> float:
    """The threshold ``speedup=`` picks at the runtime (smallest reaching 1/speedup), else the largest."""
    row = threshold_reaching(rows, speedup)
    return (row or rows[-1]).rel_l1_thresh


def fit_traces(traces: TraceSet, settings: FitSettings) -> tuple[Coefficients, dict[str, Any]]:
    """The whole fit, as a pure function of the traces; returns the coefficients and what the plot needs."""
    traces.trajectories.sort(key=lambda t: t.name)  # shards in any order give the same fit
    split = Split.of(traces, settings.heldout_fraction)
    results, failures = {}, {}
    for signal, field in SIGNAL_FIELDS.items():
        points = Points.gather(traces, field, split, settings)
        if points.x.size == 0:
            continue
        try:
            results[signal] = _fit_signal(points, settings)
        except FitError as exc:
            if settings.signal == signal:
                raise
            failures[signal] = exc
    if not results and failures:
        raise failures.get("modulated_input") or next(iter(failures.values()))  # the real reason, not "non-finite"
    if not results:
        raise FitError(
            f"every point of {', '.join(map(str, traces.files))} is non-finite (NaN or inf), so the traces hold "
            "nothing to fit; re-record them and check the model's outputs for NaN."
        )
    if settings.signal == "auto":
        scored = {s: _scores(r["robust"], r["points"])["r2_heldout"] for s, r in results.items()}
        signal = max(scored, key=lambda s: (np.nan_to_num(scored[s], nan=-np.inf), s == "modulated_input"))
    else:
        if settings.signal not in results:
            raise FitError(f"signal={settings.signal} has no finite points in the traces; use signal=auto.")
        signal = settings.signal
    chosen, points = results[signal]["fit"], results[signal]["points"]
    field = SIGNAL_FIELDS[signal]
    log.info(
        "dropped %d non-finite points (%d of them first steps, which have no previous step)",
        points.dropped,
        points.dropped_first_steps,
    )

    branches = {}
    names = sorted(set(points.branch.tolist()))
    if len(names) > 1:
        for name in names:
            mask = points.branch == name
            own_train = mask & points.train & points.decision
            own = fit_polynomial(points.x[own_train], points.y[own_train], settings.degree, settings.method)
            branches[name] = {
                "coefficients": list(own.coefficients),
                "x_range": list(own.x_range),
                "r2_heldout": _scores(own, points, mask)["r2_heldout"],
                "written_fit_r2_heldout": _scores(chosen, points, mask)["r2_heldout"],
            }

    rows = threshold_table(traces, field, chosen, settings)
    default = default_threshold(rows, settings.default_speedup)
    # The rule variants, calibrated from the same traces (TeaCache.from_coefficients(..., rule=<name>)).
    weights = step_weights(traces)
    variants = {}
    for name in ("teacache_dsigma", "teacache_joint"):
        if name == "teacache_dsigma" and weights is None:
            continue
        own_rows = threshold_table(traces, field, chosen, settings, rule=name, weights=weights)
        variants[name] = {
            "rel_l1_thresh": default_threshold(own_rows, settings.default_speedup),
            "thresholds": [row.to_dict() for row in own_rows],
        }
    drift = drift_variant(traces, split, settings) if field == "x" else None
    if drift is not None:
        variants["teacache_drift"] = drift
    schedule = fixed_schedule(traces, field, chosen, settings, default)
    scores = _scores(chosen, points)
    report = {
        "degree": settings.degree,
        "method": settings.method,
        "points": int((points.train & points.decision).sum()),
        "points_heldout": int((points.heldout & points.decision).sum()),
        "fitted_on": "decision steps (not step 0, warm-up or forced final steps) of training prompts x seeds",
        "prompts": len({t.prompt for t in traces.trajectories}),
        "prompts_heldout": len(split.prompts),
        "heldout_prompts": sorted(split.prompts),
        "heldout_seeds": sorted(split.seeds),
        "dropped_nonfinite": points.dropped,
        "r2": scores["r2"],
        "r2_heldout": scores["r2_heldout"],
        "r2_all_steps": scores["r2_all_steps"],
        "r2_heldout_all_steps": scores["r2_heldout_all_steps"],
        "min_slope": chosen.min_slope(),
        "plain": {"coefficients": list(results[signal]["plain"].coefficients), **_scores(results[signal]["plain"], points)},
        "signals": {s: _scores(r["robust"], r["points"]) for s, r in results.items()},
        "branches": branches,
        "default_threshold": f"smallest threshold whose mean computed fraction <= 1/{settings.default_speedup}",
    }
    coefficients = Coefficients(
        model=traces.model,
        transformer_class=traces.transformer_class,
        signal=signal,
        coefficients=chosen.coefficients,
        x_range=chosen.x_range,
        recipe={**traces.recipe.for_coefficients(), **({"pipeline": traces.pipeline_class} if traces.pipeline_class else {})},
        defaults=settings.decision.with_overrides(rel_l1_thresh=default),
        thresholds=tuple(rows),
        fit=_rounded(report),
        rules=variants,
        step_weights=weights,
        schedule=schedule,
        provenance={
            "kind": "calibrated",
            "traces": [{"path": str(p), "sha256": file_digest(p)} for p in traces.files],
            "trajectories": len(traces.trajectories),
            "tool_version": library_versions()["teacache-calibrate"],
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )
    return coefficients, {"results": results, "signal": signal, "rows": rows, "default": default}


def fit_pipeline(traces: TraceSet, settings: FitSettings) -> tuple[Coefficients, dict[str, Any]]:
    """:func:`fit_traces` per expert: one polynomial, x range, table and default threshold for each of the
    pipeline's transformers (Wan2.2: ``transformer`` and ``transformer_2``), in one file. Every expert uses
    the signal chosen for ``transformer`` (a file names one signal)."""
    experts = traces.experts
    if experts == ["transformer"]:
        return fit_traces(traces, settings)
    main, extras = fit_traces(traces.of_expert("transformer"), settings)
    same_signal = dataclasses.replace(settings, signal=main.signal)
    entries = {}
    for name in experts:
        if name == "transformer":
            continue
        own, _ = fit_traces(traces.of_expert(name), same_signal)
        entries[name] = {
            "coefficients": list(own.coefficients),
            "x_range": list(own.x_range),
            "rel_l1_thresh": own.defaults.rel_l1_thresh,
            "thresholds": [row.to_dict() for row in own.thresholds],
            "fit": dict(own.fit or {}),
        }
        log.info("expert %s: R^2 %.3f (held out %.3f)", name, own.fit["r2"], own.fit["r2_heldout"])
    provenance = {**main.provenance, "trajectories": len(traces.trajectories)}
    # The drift rule is calibrated for one transformer only (runtime.Coefficients.for_rule refuses it with experts).
    rules = {name: entry for name, entry in main.rules.items() if name != "teacache_drift"}
    return dataclasses.replace(main, experts=entries, provenance=provenance, rules=rules), extras


def _rounded(value: Any, key: str | None = None) -> Any:
    """Report numbers at 6 significant digits (NaN as None), polynomials at full precision."""
    if key in ("coefficients", "x_range"):
        return value
    if isinstance(value, float):
        return None if not np.isfinite(value) else float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def load_traced_model(traces: TraceSet, model_cfg: Any, option: str) -> Any:
    """The pipeline the traces were recorded from (``option`` names the setting that needs it, for the error)."""
    from .models import load_model, resolve_device, resolve_dtype

    if model_cfg.name != traces.model:
        raise FitError(
            f"{option} needs the traces' model, but model={model_cfg.name} was given for traces of {traces.model}; "
            f"pass model={traces.model}."
        )
    return load_model(model_cfg, resolve_device("auto"), resolve_dtype(model_cfg.dtype))


@dataclass(frozen=True)
class SearchSettings:
    """``search=N``: the searched_schedule rule's search over real generations of N training pairs."""

    pairs: int
    budgets: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    passes: int = 1
    radius: int = 1
    forecasts: tuple[str, ...] | str = "auto"  # auto: every forecast the model's sampler runs
    seed: int | None = None  # the pairs' seeds are seed, seed + 1, ... (one each); None: the recorded training pairs

    def __post_init__(self) -> None:
        for name, low in (("pairs", 0), ("passes", 0), ("radius", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise FitError(f"search{'' if name == 'pairs' else '_' + name} must be an integer >= {low}, got {value!r}.")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            raise FitError(f"search_seed must be an integer >= 0 (the first of the search pairs' seeds) or null (the "
                           f"recorded training pairs), got {self.seed!r}.")
        if not self.budgets or any(
            not isinstance(b, (int, float)) or isinstance(b, bool) or not 0 < b < 1 for b in self.budgets
        ):
            raise FitError(
                f"search_budgets must list computed fractions in (0, 1), got {list(self.budgets)!r}; pass e.g. "
                "search_budgets=[0.3,0.5,0.7]."
            )
        from .schedule_search import check_forecasts

        object.__setattr__(self, "forecasts", check_forecasts(self.forecasts, "search_forecasts", FitError))


def training_pairs(traces: TraceSet, coefficients: Coefficients, count: int, seed: int | None = None) -> list[tuple[str, int]]:
    """``count`` (prompt, seed) pairs of the fit's training split, spread evenly over its sorted pairs; with ``seed``,
    ``count`` training prompts spread evenly over the sorted ones (in turn if there are fewer), the i-th at seed
    ``seed + i``: a search on a few recorded seeds fits their noise (digits: two seeds for eight pairs)."""
    fit = coefficients.fit or {}
    held_prompts, held_seeds = set(fit.get("heldout_prompts", [])), set(fit.get("heldout_seeds", []))
    pairs = sorted({(t.prompt, t.seed) for t in traces.trajectories if t.prompt not in held_prompts and t.seed not in held_seeds})
    if not pairs:
        raise FitError("search found no training prompt x seed pair in the traces; record more prompts or seeds.")
    if seed is not None:
        seeds = range(seed, seed + count)
        recorded = {t.seed for t in traces.trajectories}  # held-out seeds among them
        if recorded & set(seeds):
            raise FitError(
                f"search_seed={seed} gives seeds {seed}..{seed + count - 1}, which include the recorded seeds "
                f"{sorted(recorded & set(seeds))}; pass a search_seed past them (e.g. search_seed={max(recorded) + 100})."
            )
        prompts = sorted({p for p, _ in pairs})
        picks = np.linspace(0, len(prompts) - 1, count).round().astype(int) if count <= len(prompts) else np.arange(count) % len(prompts)
        return [(prompts[i], s) for i, s in zip(picks, seeds)]
    picks = np.unique(np.linspace(0, len(pairs) - 1, min(count, len(pairs))).round().astype(int))
    return [pairs[i] for i in picks]


def searched_variant(
    coefficients: Coefficients, traces: TraceSet, model: Any, search: SearchSettings, speedup: float = 1.5
) -> Coefficients:
    """The ``searched_schedule`` rule: at each budget, the one schedule (both CFG branches alike) whose real
    generations on training prompt x seed pairs come closest to full compute (mean of log MSE over the pairs,
    so each pair counts alike), found by :func:`calibrate.schedule_search.search_schedules` as the per-output
    bound is. Step 0 is in every schedule (and, with two experts, the second one's first step: one schedule spans
    the generation's steps); the search decides every other step, the last included (the rule has no warm-up or
    final steps of its own). In the file: one threshold row per budget, its
    ``rel_l1_thresh`` the fraction of steps skipped, and the schedule beside it; the default is the row
    ``speedup`` picks."""
    from .schedule_search import computed_steps, fixed_steps, resolve_forecasts, schedule_errors, search_each_forecast

    recipe, n = traces.recipe, traces.recipe.num_inference_steps
    fixed = fixed_steps(model.pipe, n)  # step 0, and a second expert's first step (Wan2.2)
    counts = [k for k in sorted({computed_steps(b, n) for b in search.budgets}, reverse=True) if len(fixed) <= k < n]
    if not counts:
        raise FitError(f"search_budgets {list(search.budgets)} leave nothing to skip of {n} steps; pass smaller budgets.")
    pairs = training_pairs(traces, coefficients, search.pairs, search.seed)
    @contextlib.contextmanager
    def objective(forecast: str) -> Iterator[Callable[[frozenset], float]]:
        bar = tqdm(desc=f"searched_schedule, {forecast} ({len(pairs)} pairs)", unit="schedule", dynamic_ncols=True)
        with bar, schedule_errors(model, recipe, pairs, forecast) as mse:

            def error(steps: frozenset) -> float:
                bar.update()
                return float(np.mean([np.log10(max(m, 1e-12)) for m in mse(steps)]))

            yield error

    # one search per forecast; per budget the better schedule is kept
    forecasts = resolve_forecasts(search.forecasts, model.pipe.scheduler, "search_forecasts", FitError)
    search_result = search_each_forecast(objective, forecasts, n, counts, passes=search.passes, radius=search.radius, fixed=fixed)
    results, best = search_result.results, search_result.forecasts
    evaluations, seconds = search_result.cost.evaluations, search_result.cost.seconds
    order = sorted(results, reverse=True)  # most steps first: thresholds increase
    ordered = [results[k] for k in order]
    rows = [ThresholdRow(round(1 - r.computed / n, 4), round(r.computed / n, 4)) for r in ordered]
    report = {
        "pairs": [{"prompt": p, "seed": s} for p, s in pairs],
        "objective": "mean over the pairs of log10 MSE of the output against full compute",
        "psnr": [round(-10 * r.error, 3) for r in ordered],
        # every forecast searched, so the choice per row can be judged
        "psnr_by_forecast": {f: [round(-10 * search_result.by_forecast[f][k].error, 3) for k in order] for f in forecasts},
        "uniform_psnr": [round(-10 * r.uniform_error, 3) for r in ordered],
        "start": [r.start for r in ordered],
        "passes": search.passes,
        "radius": search.radius,
        "evaluations": evaluations,
        "generations": evaluations * len(pairs),
        "seconds": round(seconds, 1),
    }
    log.info("searched_schedule: %d schedules over %d training pairs, %d generations in %.0f s (PSNR on them %s, "
             "forecasts %s; uniform %s)", len(rows), len(pairs), report["generations"], seconds, report["psnr"],
             [best[k] for k in order], report["uniform_psnr"])
    entry = {
        "rel_l1_thresh": default_threshold(rows, speedup),
        "thresholds": [row.to_dict() for row in rows],
        "schedules": [sorted(r.steps) for r in ordered],
        "forecasts": [best[k] for k in order],
        "num_steps": n,
        "fit": report,
    }
    return dataclasses.replace(coefficients, rules={**coefficients.rules, "searched_schedule": entry})


def closed_loop_check(coefficients: Coefficients, traces: TraceSet, model: Any, pairs: int, rows: int = 8) -> Coefficients:
    """Run the runtime on held-out prompt x seed pairs at the table's thresholds (up to ``rows`` of them,
    25-95% computed) and store each realized computed fraction beside the replayed one: at run time
    skipping changes the trajectory, which a replay of full-compute traces cannot see."""
    from runtime import TeaCache

    fit = coefficients.fit or {}
    held_prompts, held_seeds = set(fit.get("heldout_prompts", [])), set(fit.get("heldout_seeds", []))
    runs = sorted({(t.prompt, t.seed) for t in traces.trajectories
                   if t.prompt in held_prompts and (not held_seeds or t.seed in held_seeds)})[:pairs]
    if not runs:
        raise FitError("closed_loop found no held-out prompt x seed pair in the traces; record more prompts or seeds.")
    recipe = traces.recipe

    def realize(rule: str, table: list[ThresholdRow]) -> tuple[list[ThresholdRow], int]:
        candidates = [i for i, r in enumerate(table) if 0.25 <= r.computed_fraction <= 0.95]
        picks = sorted({candidates[int(j)] for j in np.linspace(0, len(candidates) - 1, min(rows, len(candidates)))}) if candidates else []
        for i in picks:
            row = table[i]
            with TeaCache.from_coefficients(coefficients, rule=rule, rel_l1_thresh=row.rel_l1_thresh).apply(model.pipe) as cache:
                for prompt, seed in runs:
                    model.generate(prompt, seed, recipe)
            stats = cache.stats.values()
            realized = sum(s.computed for s in stats) / max(1, sum(s.calls for s in stats))
            table[i] = dataclasses.replace(row, realized_fraction=round(realized, 4))
        return table, len(picks)

    def max_diff(table: list[ThresholdRow]) -> float:
        return round(max(abs(r.realized_fraction - r.computed_fraction) for r in table if r.realized_fraction is not None), 4)

    table, count = realize(coefficients.defaults.rule, list(coefficients.thresholds))
    if not count:
        raise FitError("closed_loop found no table row between 25% and 95% computed; record more prompts or seeds.")
    summary = {"pairs": len(runs), "rows": count, "max_abs_diff": max_diff(table), "rules": {}}
    rules = {}
    for name, entry in coefficients.rules.items():  # each rule variant's own table, run with that rule
        own, own_count = realize(name, [ThresholdRow(**row) for row in entry.get("thresholds") or ()])
        rules[name] = {**entry, "thresholds": [row.to_dict() for row in own]}
        if own_count:
            summary["rules"][name] = {"rows": own_count, "max_abs_diff": max_diff(own)}
    log.info("closed loop on %d held-out pairs: realized vs replayed computed fraction differ by at most %.3f (%s)",
             len(runs), summary["max_abs_diff"],
             ", ".join(f"{k}: {v['max_abs_diff']:.3f}" for k, v in summary["rules"].items()) or "no rule variants")
    return dataclasses.replace(coefficients, thresholds=tuple(table), rules=rules, fit={**fit, "closed_loop": summary})


def decision_settings(cfg: DictConfig) -> DecisionSettings:
    """The decision settings of the fit's config (checked by the runtime's own settings object)."""
    from runtime.errors import ConfigError

    try:
        return DecisionSettings(
            rel_l1_thresh=0.0,
            warmup_steps=cfg.warmup_steps,
            final_steps=cfg.final_steps,
            max_consecutive_skips=cfg.max_consecutive_skips,
        )
    except ConfigError as exc:
        raise FitError(str(exc).replace("decision settings: ", "")) from None


def run_fit(cfg: DictConfig) -> Path:
    closed_loop = cfg.get("closed_loop", 0)
    if not isinstance(closed_loop, int) or isinstance(closed_loop, bool) or closed_loop < 0:
        raise FitError(f"closed_loop must be a number of held-out prompt x seed pairs >= 0 (0: off), got {closed_loop!r}.")
    search = SearchSettings(
        pairs=cfg.get("search", 0),
        budgets=tuple(cfg.get("search_budgets") or ()),
        passes=cfg.get("search_passes", 1),
        radius=cfg.get("search_radius", 1),
        forecasts=cfg.get("search_forecasts", "auto"),
        seed=cfg.get("search_seed", None),
    )
    settings = FitSettings(
        degree=cfg.degree,
        method=cfg.method,
        signal=cfg.signal,
        heldout_fraction=cfg.heldout_fraction,
        default_speedup=cfg.default_speedup,
        decision=decision_settings(cfg),
    )
    from runtime.coefficients import commit_file, unwritable
    from runtime.errors import CoefficientsError

    if cfg.out is not None and not isinstance(cfg.out, str):
        raise CoefficientsError(f"out={cfg.out!r} is not a path; pass e.g. out=coefficients/<model>.json.")
    if cfg.out:  # an out= that cannot be written is refused before the traces are even read
        _check_outputs(Path(cfg.out), cfg.plot)
    traces = load_traces(traces_spec(cfg.traces))
    if traces.duplicates:
        log.info("skipped %d trajectories found in more than one file", traces.duplicates)
    out = Path(cfg.out) if cfg.out else Path("coefficients") / f"{traces.model}.json"
    if not cfg.out:
        _check_outputs(out, cfg.plot)
    coefficients, extras = fit_pipeline(traces, settings)
    if search.pairs or closed_loop:
        model = load_traced_model(traces, cfg.model, "search" if search.pairs else "closed_loop")
        if search.pairs:
            coefficients = searched_variant(coefficients, traces, model, search, settings.default_speedup)
        if closed_loop:
            coefficients = closed_loop_check(coefficients, traces, model, closed_loop)
    png, staged = out.with_suffix(".png"), None
    if cfg.plot:  # rendered first, so that a failure leaves both files as they were
        from .plots import fit_figure, stage_figure

        staged = stage_figure(fit_figure(coefficients, extras), png, error=CoefficientsError)
    try:
        save_coefficients(coefficients, out)
    except BaseException:
        if staged is not None:
            staged.unlink(missing_ok=True)
        raise
    if staged is not None:
        try:
            commit_file(staged, png)
        except OSError as exc:
            raise CoefficientsError(unwritable(png, exc)) from None
    _summary(out, coefficients)
    return out


def traces_spec(value: Any) -> Any:
    """``traces=`` as :func:`calibrate.traces.load_traces` takes it: a path or glob, or a list of them."""
    if isinstance(value, str) or value is None or isinstance(value, (int, float)):
        return value if isinstance(value, str) else str(value)
    try:
        return [str(v) for v in value]
    except TypeError:
        return str(value)


def _check_outputs(out: Path, plot: bool) -> None:
    from runtime.errors import CoefficientsError

    from .traces import check_output

    check_output(out, error=CoefficientsError)
    if out.suffix != ".json":  # the PNG goes to out with .png: out=x.png would be overwritten by it
        raise CoefficientsError(
            f"out={out} does not end in .json; pass a coefficients file path such as {out.with_suffix('.json')}."
        )
    if plot:
        check_output(out.with_suffix(".png"), error=CoefficientsError)


def _summary(out: Path, c: Coefficients) -> None:
    fit = c.fit or {}
    lines = [
        f"wrote {out} ({c.model}, {c.transformer_class}, signal {c.signal})",
        f"  decision-step R^2 train {fit.get('r2')}, held-out {fit.get('r2_heldout')} "
        f"(plain least squares: {fit['plain']['r2']}, held-out {fit['plain']['r2_heldout']}); "
        f"all steps: {fit.get('r2_all_steps')}, held-out {fit.get('r2_heldout_all_steps')}",
        f"  points {fit.get('points')} + {fit.get('points_heldout')} held out; dropped {fit.get('dropped_nonfinite')} non-finite",
        f"  default rel_l1_thresh {c.defaults.rel_l1_thresh}",
    ]
    print("\n".join(lines))


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="fit")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        expand_paths(traces_spec(cfg.traces))  # before torch loads
        run_fit(cfg)


if __name__ == "__main__":
    main()
