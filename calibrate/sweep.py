"""``python -m calibrate.sweep model=reference coefficients=<json> limit=N out=<dir>``: speed against quality.

On prompts and seeds the fit never saw, side by side in one run:

- ``full``: full compute, the reference every output is compared to;
- ``teacache``: our runtime with the coefficients file, over thresholds from its table;
- ``first_block_cache``: diffusers' FirstBlockCache over its threshold grid;
- ``mag_cache``: diffusers' MagCache, its ratios calibrated with its own calibrate mode on the same
  recipe (one prompt the fit saw), over its threshold grid;
- ``oracle``: the same accumulate-and-threshold rule as TeaCache, driven by the true output change
  measured in full compute instead of the fitted polynomial;
- ``taylorseer``: diffusers' TaylorSeer (``TaylorSeerCacheConfig``: attention outputs predicted by a Taylor
  expansion between full steps) over its ``cache_interval`` grid (1 computes every step), on every block's
  attention (:func:`taylorseer_identifiers`);
- the rule variants (``teacache_dsigma``, ``teacache_joint``, ``teacache_drift``, ``fixed_schedule``,
  ``searched_schedule``), each from the same file over its own calibrated table;
- ``uniform``: a fixed schedule, the same for every output: at each budget (a computed fraction) that many
  steps spread evenly, forced through our runtime. The simplest content-independent control;
- ``schedule_search``: per output and budget, the schedule (which steps to compute) with the smallest
  error of the final image against full compute, found by a search over real generations
  (calibrate/schedule_search.py), once per forecast (``schedule_search.forecasts``: what a skipped step
  does; by default every one the sampler runs), the best kept: the bound no skip rule should beat.

Per setting: PSNR and SSIM against full compute (LPIPS when its weights are already on disk), the
reference model's own judge (calibrate.metrics.Perceptual: agreement with full compute's verdict and a
feature distance), the computed fraction (calls in which the last block's attention really ran), and the
wall-clock speedup (median of repeats, all methods timed in the same loop; the search's own cost is
reported apart). Writes ``<out>/sweep.json`` and ``<out>/pareto.png``.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import logging
import math
import re
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import hydra
import numpy as np
from omegaconf import DictConfig
from tqdm.auto import tqdm

from runtime.coefficients import Coefficients, load_coefficients
from runtime.errors import ConfigError, TeaCacheError
from runtime.stats import CacheStats

from .cli import CONF_PATH, one_line_errors
from .recipe import Recipe
from .record import prompt_texts
from .traces import TraceFileError, load_traces

# torch, diffusers, the runtime's hooks, scipy (metrics) and the models load inside the functions that
# use them, once run_sweep has checked its arguments and files.
if TYPE_CHECKING:
    import torch

    from runtime.hooks import TeaCacheState

    from .models import LoadedModel

log = logging.getLogger(__name__)

METHODS = (
    "full", "teacache", "teacache_dsigma", "teacache_joint", "teacache_drift", "fixed_schedule", "searched_schedule", "oracle",
    "first_block_cache", "mag_cache",
    "taylorseer", "uniform", "schedule_search",
)
#: The runtime's rule variants, each run from the same file with its own calibrated table (runtime.rules).
RULE_VARIANTS = ("teacache_dsigma", "teacache_joint", "teacache_drift", "fixed_schedule", "searched_schedule")
#: Methods whose setting is a budget (computed fraction) from ``budgets``, not a threshold.
BUDGETED = ("uniform", "schedule_search")


@dataclass
class Row:
    method: str
    setting: float | None
    computed_fraction: float
    wall_speedup: float
    psnr: float | None  # None: identical to full compute (infinite PSNR)
    ssim: float
    lpips: float | None
    agreement: float | None  # fraction of outputs the model's judge scores like full compute (None: no judge)
    feature_distance: float | None  # mean distance in the judge's embedding (None: no judge or no embedding)
    n_outputs: int
    max_abs_diff: float


class ComputeProbe:
    """Counts transformer calls and the calls in which the last block's attention really ran.

    The probe sits on the attention's first linear layer, not on the attention module: diffusers' TaylorSeer
    replaces the attention's forward by a prediction, which a hook on the module itself would still count.
    """

    def __init__(self, transformer: torch.nn.Module) -> None:
        import torch

        from runtime.adapters import adapter_for

        last = adapter_for(transformer).blocks(transformer)[-1][1]
        attention = next(m for name, m in last.named_children() if name.startswith("attn"))
        projection = next(m for m in attention.modules() if isinstance(m, torch.nn.Linear))
        self.calls = self.computed = 0
        self._handles = [
            transformer.register_forward_pre_hook(lambda *_: self._count("calls")),
            projection.register_forward_hook(lambda *_: self._count("computed")),
        ]

    def _count(self, name: str) -> None:
        setattr(self, name, getattr(self, name) + 1)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class _Identity:
    """p(x) = x over all x: the oracle's polynomial (its x is already the true output change)."""

    coefficients = (1.0, 0.0)
    x_range = None


_IDENTITY = _Identity()


class OracleChange:
    """x replaced by the true output change of full compute at this step: TeaCache's rule, perfectly informed."""

    def __init__(self, true_changes: dict, current: dict) -> None:
        self.true_changes = true_changes
        self.current = current

    def __call__(self, signal: torch.Tensor, previous: torch.Tensor, state: TeaCacheState, branch: str) -> torch.Tensor:
        import torch

        value = self.true_changes[self.current["key"]][branch][state.step]
        return torch.tensor(value, dtype=torch.float32, device=signal.device)


def teacache_thresholds(coefficients: Coefficients, points: int) -> list[float]:
    """0, then up to ``points`` thresholds of the file's table spread over computed fractions 0.25-0.95."""
    rows = [r for r in coefficients.thresholds if 0.25 <= r.computed_fraction <= 0.95]
    if not rows:
        raise ConfigError(
            f"{coefficients.origin} has no threshold table rows between 25% and 95% computed; re-fit it with "
            "`python -m calibrate.fit` (which writes the table)."
        )
    picks = np.unique(np.linspace(0, len(rows) - 1, min(points, len(rows))).round().astype(int))
    return [0.0] + [rows[i].rel_l1_thresh for i in picks]


def magcache_ratios(model: LoadedModel, recipe: Recipe, prompt: str, seed: int) -> list[float]:
    """Run diffusers' MagCache calibrate mode once and read the ratios it prints (cond branch)."""
    from diffusers import MagCacheConfig

    transformer = model.transformer
    transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=recipe.num_inference_steps))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            model.generate(prompt, seed, recipe)
    finally:
        transformer.disable_cache()
    lists = [ast.literal_eval(line) for line in printed.getvalue().splitlines() if line.startswith("[") and line.endswith("]")]
    if not lists:
        raise TeaCacheError("diffusers' MagCache calibrate mode printed no ratios; its output format may have changed.")
    return lists[0]


def held_out_work(cfg: DictConfig, coefficients: Coefficients) -> list[tuple[str, int]]:
    """(prompt, seed) pairs of the sweep: prompts the fit's traces never held, seeds they never used."""
    seen_prompts: set[str] = set()
    seen_seeds: set[int] = set()
    for entry in coefficients.provenance.get("traces", []):
        try:
            traces = load_traces(entry["path"])
        except TraceFileError:
            log.warning("cannot read %s to check that the sweep is held out from the fit", entry["path"])
            continue
        seen_prompts |= {t.prompt for t in traces.trajectories}
        seen_seeds |= {t.seed for t in traces.trajectories}
    seeds = [int(s) for s in cfg.seeds]
    if set(seeds) & seen_seeds:
        raise ConfigError(
            f"seeds {sorted(set(seeds) & seen_seeds)} were used by the fit's traces; pass unseen ones, e.g. seeds=[1000]."
        )
    prompts = [p for p in prompt_texts(cfg, "sweep_prompt_set") if p not in seen_prompts][: cfg.limit]
    if not prompts:
        raise ConfigError("every prompt of the set was seen by the fit; pass prompts=<another set>.")
    return [(p, s) for p in prompts for s in seeds]


@contextlib.contextmanager
def method_applied(
    method: str, setting: float | None, model: LoadedModel, coefficients: Coefficients, extras: dict[str, Any]
) -> Iterator[None]:
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    from runtime import DecisionRule, TeaCache
    from runtime.hooks import TeaCacheConfig, apply_teacache, remove_teacache

    from .schedule_search import ScheduleChange, computed_steps, forced_schedule, uniform_schedule

    transformer = model.transformer
    if method == "full":
        yield
    elif method in BUDGETED:
        steps = extras["steps"]
        forecast: Any = "reuse"
        if method == "uniform":
            change = ScheduleChange(uniform_schedule(steps, computed_steps(setting, steps)))
        else:
            schedules = extras["schedules"]
            change = ScheduleChange(lambda: schedules[extras["current"]["key"]][setting][0])
            forecast = lambda: schedules[extras["current"]["key"]][setting][1]  # noqa: E731 (per output)
        scheduler = model.pipe.scheduler
        with forced_schedule(transformer, change, lambda: len(scheduler.timesteps), forecast, scheduler):
            yield
    elif method == "teacache":  # the upstream rule, whichever rule is the file's default
        with TeaCache.from_coefficients(coefficients, rule="teacache", rel_l1_thresh=setting).apply(model.pipe):
            yield
    elif method in RULE_VARIANTS:
        with TeaCache.from_coefficients(coefficients, rule=method, rel_l1_thresh=setting).apply(model.pipe):
            yield
    elif method == "oracle":
        d = coefficients.defaults
        rule = DecisionRule.of(_IDENTITY, d.with_overrides(rel_l1_thresh=setting, rule="teacache"))
        scheduler = model.pipe.scheduler
        oracle = OracleChange(extras["true_changes"], extras["current"])
        apply_teacache(transformer, TeaCacheConfig(rule, "modulated_input", CacheStats(), lambda: len(scheduler.timesteps), oracle))
        try:
            yield
        finally:
            remove_teacache(transformer)
    elif method in ("first_block_cache", "mag_cache", "taylorseer"):
        if method == "first_block_cache":
            config = FirstBlockCacheConfig(threshold=setting)
        elif method == "taylorseer":
            import torch

            taylor = extras["taylorseer"]
            config = TaylorSeerCacheConfig(
                cache_interval=int(setting),
                cache_identifiers=taylorseer_identifiers(transformer),
                disable_cache_before_step=int(taylor["disable_cache_before_step"]),
                max_order=int(taylor["max_order"]),
                taylor_factors_dtype=getattr(torch, str(taylor["factors_dtype"])),
            )
        else:
            config = MagCacheConfig(
                threshold=setting,
                mag_ratios=extras["mag_ratios"],
                num_inference_steps=extras["steps"],
                max_skip_steps=extras["mag_cache"]["max_skip_steps"],
                retention_ratio=extras["mag_cache"]["retention_ratio"],
            )
        transformer.enable_cache(config)
        try:
            yield
        finally:
            transformer.disable_cache()
            transformer._reset_stateful_cache()
    else:
        raise ConfigError(f"unknown method {method!r}; methods are {', '.join(METHODS)}.")


def taylorseer_identifiers(transformer: torch.nn.Module) -> list[str]:
    """The attention modules of every block, as TaylorSeer's ``cache_identifiers``. diffusers' defaults
    (``^blocks.*attn`` and the like, under ``re.fullmatch``) mean every block's attention but match only names
    ending in ``attn``: Wan's ``attn1``/``attn2`` escape them, and TaylorSeer then hooks nothing and computes
    every step (0.42.1). These patterns name the same modules on the other families."""
    from runtime.adapters import adapter_for

    return [rf"{re.escape(name)}\.\d+\.attn\d*" for name in adapter_for(transformer).block_lists]


def two_experts_refused(what: str, experts) -> str:
    return (
        f"{what} {len(experts)} experts ({', '.join(experts)}, Wan2.2), but the sweep hooks one transformer (its "
        "forced schedules, peers, traces and timing would see the first expert alone); sweep a one-transformer model."
    )


def run_sweep(cfg: DictConfig) -> Path:
    from .traces import check_output

    for name in ("repeats", "teacache_points", "limit"):  # checked before anything loads
        value = cfg.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}; pass a positive count, e.g. {name}=1.")
    check_output(Path(str(cfg.out)), folder=True, error=ConfigError)
    coefficients = load_coefficients(cfg.coefficients)
    if coefficients.experts:
        raise ConfigError(two_experts_refused(f"{coefficients.origin} holds polynomials for", coefficients.expert_names))
    recipe = Recipe.from_config(cfg)
    if recipe.for_coefficients() != {k: v for k, v in coefficients.recipe.items() if k != "pipeline"}:
        log.warning("the sweep's recipe %s differs from the one %s was fitted for", recipe, coefficients.origin)
    work = held_out_work(cfg, coefficients)
    methods = [m for m in cfg.methods if m != "full"]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ConfigError(f"unknown method {unknown[0]!r} in methods=; choose from {', '.join(METHODS)}.")
    search_cfg = _check_search_settings(cfg, methods, recipe.num_inference_steps)
    import torch  # and diffusers with the models: only now, after the checks above

    from runtime.cache import pipeline_experts

    from .metrics import Lpips, Perceptual, psnr, ssim
    from .models import load_model, output_array, resolve_device, resolve_dtype
    from .recorder import TraceRecorder

    device = resolve_device(cfg.device)
    model = load_model(cfg.model, device, resolve_dtype(cfg.dtype))
    experts = pipeline_experts(model.pipe)
    if len(experts) > 1:
        raise ConfigError(two_experts_refused(f"model={cfg.model.name} has", tuple(experts)))

    settings: list[tuple[str, float | None]] = [("full", None)]
    extras: dict[str, Any] = {
        "steps": recipe.num_inference_steps, "mag_cache": dict(cfg.mag_cache), "taylorseer": dict(cfg.taylorseer), "current": {},
    }
    for method in methods:
        if method in ("teacache", "oracle"):
            grid = teacache_thresholds(coefficients, cfg.teacache_points)
        elif method == "fixed_schedule":
            grid = [coefficients.for_rule("teacache").defaults.rel_l1_thresh]  # one schedule: what that threshold computes
        elif method in RULE_VARIANTS:
            grid = teacache_thresholds(coefficients.for_rule(method), cfg.teacache_points)[1:]  # 0 is teacache's
        elif method in BUDGETED:
            grid = list(cfg.budgets)
        else:
            grid = list(cfg.thresholds[method])
        settings += [(method, float(t)) for t in grid]
    if "oracle" in methods:
        with TraceRecorder(model.transformer) as recorder:
            extras["true_changes"] = {
                (p, s): {b: v["y"].tolist() for b, v in recorder.run(lambda: model.generate(p, s, recipe)).items()}
                for p, s in work
            }
    if "mag_cache" in methods:
        calibration_prompt = prompt_texts(cfg)[0]
        extras["mag_ratios"] = magcache_ratios(model, recipe, calibration_prompt, seed=0)
    search_report = None
    if "schedule_search" in methods:
        extras["schedules"], search_report = search_all(model, recipe, work, [float(b) for b in cfg.budgets], search_cfg)

    def generate_all() -> list[np.ndarray]:
        images = []
        for prompt, seed in work:
            extras["current"]["key"] = (prompt, seed)
            images.append(output_array(model.generate(prompt, seed, recipe, output_type="np")))
        return images

    def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, result

    times: dict[tuple[str, float | None], list[float]] = {s: [] for s in settings}
    outputs: dict[tuple[str, float | None], list[np.ndarray]] = {}
    fractions: dict[tuple[str, float | None], float] = {}
    bar = tqdm(total=len(settings) * cfg.repeats, desc="sweep", unit="setting", dynamic_ncols=True)
    for repeat in range(cfg.repeats):
        for method, setting in settings:
            bar.set_postfix_str(f"{method} {setting if setting is not None else ''}")
            with method_applied(method, setting, model, coefficients, extras):
                probe = ComputeProbe(model.transformer) if repeat == 0 else None
                seconds, images = timed(generate_all)
                if probe is not None:
                    probe.remove()
                    fractions[(method, setting)] = probe.computed / max(probe.calls, 1)
                    outputs[(method, setting)] = images
            times[(method, setting)].append(seconds)
            bar.update()
    bar.close()

    lpips = Lpips()
    if not lpips.available:
        log.info("LPIPS skipped: %s", lpips.reason)
    judge = Perceptual(str(cfg.model.source))
    full_images, full_time = outputs[("full", None)], statistics.median(times[("full", None)])
    rows = []
    for key in settings:
        images = outputs[key]
        psnrs = [psnr(a, b) for a, b in zip(images, full_images)]
        lp = [lpips(a, b) for a, b in zip(images, full_images)]
        finite = [v for v in psnrs if math.isfinite(v)]
        judged = [judge(a, b, prompt) for a, b, (prompt, _) in zip(images, full_images, work)]
        agreements = [a for a, _ in judged if a is not None]
        distances = [d for _, d in judged if d is not None]
        rows.append(
            Row(
                method=key[0],
                setting=key[1],
                computed_fraction=round(fractions[key], 4),
                wall_speedup=round(full_time / statistics.median(times[key]), 4),
                psnr=None if not finite else round(float(np.mean([min(v, 100.0) for v in psnrs])), 3),
                ssim=round(float(np.mean([ssim(a, b) for a, b in zip(images, full_images)])), 5),
                lpips=None if lp[0] is None else round(float(np.mean(lp)), 5),
                agreement=round(float(np.mean(agreements)), 4) if agreements else None,
                feature_distance=round(float(np.mean(distances)), 5) if distances else None,
                n_outputs=len(images),
                max_abs_diff=float(max(np.abs(a - b).max() for a, b in zip(images, full_images))),
            )
        )

    out = Path(str(cfg.out))
    document = {
        "model": cfg.model.name,
        "coefficients": str(cfg.coefficients),
        "recipe": recipe.for_coefficients(),
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "repeats": cfg.repeats,
        "outputs": [{"prompt": p, "seed": s} for p, s in work],
        "lpips": "computed" if lpips.available else f"skipped: {lpips.reason}",
        "psnr_note": "mean over outputs, each capped at 100 dB; null when every output equals full compute",
        "perceptual": judge.description,
        "rows": [asdict(r) for r in rows],
    }
    if search_report is not None:
        document["schedule_search"] = {**search_report, "bound_check": bound_check(rows)}
    choice = rule_ranking(rows)
    if choice is not None:
        document["rule_ranking"] = choice
    # the default rule the file has after this run (choose_rule=true writes the ranking's best)
    default_rule = choice["best"] if cfg.get("choose_rule") and choice is not None else coefficients.defaults.rule
    target = target_check(rows, default_rule)
    if target is not None:
        document["target_check"] = target
    from runtime.coefficients import unwritable, write_atomically

    text = json.dumps(document, indent=1) + "\n"
    try:  # atomically, like every file the tools write: a kill or a full disk never leaves half a file
        write_atomically(out / "sweep.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(unwritable(out / "sweep.json", exc)) from None
    from .plots import plot_pareto

    plot_pareto(out / "pareto.png", rows, title=f"{cfg.model.name}: {len(work)} held-out outputs, {recipe.num_inference_steps} steps")
    _print_table(rows)
    if cfg.get("choose_rule") and choice is not None:
        _write_default_rule(coefficients, choice["best"], str(cfg.coefficients))
    return out


def rule_ranking(rows: list[Row], fractions: tuple[float, ...] = tuple(np.linspace(0.3, 0.7, 9))) -> dict[str, Any] | None:
    """The runtime's rules (TeaCache and its variants) ranked by held-out quality: each rule's PSNR
    interpolated at the computed fractions in [0.3, 0.7] that every swept rule covers, averaged. None
    when fewer than two thresholded rules were swept or they share no fraction."""
    curves = {}
    for method in ("teacache", *RULE_VARIANTS):
        points = sorted((r.computed_fraction, min(r.psnr, 60.0) if r.psnr is not None else 60.0)
                        for r in rows if r.method == method)
        if len(points) >= 2:
            curves[method] = points
    if len(curves) < 2:
        return None
    lo = max(p[0][0] for p in curves.values())
    hi = min(p[-1][0] for p in curves.values())
    grid = [f for f in fractions if lo <= f <= hi]
    if not grid:
        return None
    scores = {m: float(np.mean(np.interp(grid, [p[0] for p in pts], [p[1] for p in pts]))) for m, pts in curves.items()}
    best = max(scores, key=scores.get)
    return {"fractions": [float(round(f, 3)) for f in grid], "mean_psnr_db": {m: round(v, 3) for m, v in scores.items()}, "best": best}


#: The peers the file's default rule is held against, and the margins it should keep (dB).
PEERS = ("first_block_cache", "mag_cache", "taylorseer")
PEER_MARGIN_DB, BOUND_GAP_DB = 1.0, 2.0


def _curve(rows: list[Row], method: str, axis: str) -> tuple[np.ndarray, np.ndarray] | None:
    """A method's PSNR (capped at 60 dB) against ``axis`` (computed_fraction or wall_speedup), sorted by it; with
    several rows at one abscissa, their best PSNR. None with fewer than two distinct abscissae."""
    best: dict[float, float] = {}
    for r in rows:
        if r.method == method:
            x = float(getattr(r, axis))
            best[x] = max(best.get(x, -np.inf), min(r.psnr, 60.0) if r.psnr is not None else 60.0)
    if len(best) < 2:
        return None
    xs = np.array(sorted(best))
    return xs, np.array([best[x] for x in xs])


def target_check(rows: list[Row], rule: str, fractions: tuple[float, ...] = tuple(np.linspace(0.3, 0.7, 9))) -> dict[str, Any] | None:
    """The file's default rule against the peers and the bound, as the calibration target states it: at every
    computed fraction in [0.3, 0.7] that both curves cover (linear between settings), the rule's PSNR minus each
    peer's (want >= 1 dB), and the search's PSNR minus the rule's (want <= 2 dB); the same against each peer at
    matched wall-clock speedup. ``met`` is whether every margin compared holds (None: nothing to compare)."""
    own = {axis: _curve(rows, rule, axis) for axis in ("computed_fraction", "wall_speedup")}
    if own["computed_fraction"] is None:
        return None
    report: dict[str, Any] = {"rule": rule, "peer_margin_db": PEER_MARGIN_DB, "bound_gap_db": BOUND_GAP_DB}
    held = []
    for axis, grid_of in (("computed_fraction", lambda lo, hi: [f for f in fractions if lo - 1e-9 <= f <= hi + 1e-9]),
                          ("wall_speedup", lambda lo, hi: list(np.linspace(lo, hi, 5)) if hi > lo else [])):
        mine = own[axis]
        if mine is None:
            continue
        section = {}
        for other in (*PEERS, "schedule_search"):
            theirs = _curve(rows, other, axis)
            if theirs is None or (axis == "wall_speedup" and other == "schedule_search"):
                continue
            grid = grid_of(max(mine[0][0], theirs[0][0]), min(mine[0][-1], theirs[0][-1]))
            if not grid:
                continue
            a, b = np.interp(grid, *mine), np.interp(grid, *theirs)
            if other == "schedule_search":
                gaps = b - a
                section[other] = {"at": [round(float(g), 3) for g in grid], "gap_db": [round(float(v), 2) for v in gaps]}
                held.append(bool(np.all(gaps <= BOUND_GAP_DB)))
            else:
                margins = a - b
                section[other] = {"at": [round(float(g), 3) for g in grid], "margin_db": [round(float(v), 2) for v in margins]}
                held.append(bool(np.all(margins >= PEER_MARGIN_DB)))
        report[axis] = section
    report["met"] = all(held) if held else None
    return report


def _write_default_rule(coefficients: Coefficients, rule: str, source: str) -> None:
    """Make ``rule`` the file's default (with that rule's own threshold and table); only for files on disk."""
    from runtime.coefficients import resolve_coefficients, save_coefficients

    path = resolve_coefficients(source)
    import dataclasses

    chosen = coefficients.for_rule(rule)
    rules = dict(coefficients.rules)
    if coefficients.defaults.rule == "teacache" and rule != "teacache":  # keep the upstream rule's own threshold
        rules["teacache"] = {"rel_l1_thresh": coefficients.defaults.rel_l1_thresh}
    save_coefficients(dataclasses.replace(coefficients, defaults=chosen.defaults, rules=rules), path)
    log.info("%s: default rule is now %s (rel_l1_thresh %s), chosen by held-out PSNR", path, rule, chosen.defaults.rel_l1_thresh)


def _print_table(rows: list[Row]) -> None:
    print(f"{'method':<18} {'setting':>8} {'computed':>9} {'speedup':>8} {'PSNR':>8} {'SSIM':>7} {'agree':>6} {'feat.d':>7}")
    for r in rows:
        setting = "" if r.setting is None else f"{r.setting:g}"
        quality = "inf" if r.psnr is None else f"{r.psnr:.2f}"
        agree = "" if r.agreement is None else f"{r.agreement:.2f}"
        distance = "" if r.feature_distance is None else f"{r.feature_distance:.4f}"
        print(
            f"{r.method:<18} {setting:>8} {r.computed_fraction:>9.3f} {r.wall_speedup:>8.2f} {quality:>8} {r.ssim:>7.4f}"
            f" {agree:>6} {distance:>7}"
        )


def _check_search_settings(cfg: DictConfig, methods: list[str], num_steps: int) -> dict[str, Any]:
    """``budgets``, ``schedule_search.*`` and TaylorSeer's settings, checked before anything loads; returns the
    search settings."""
    from .schedule_search import computed_steps

    if any(m in BUDGETED for m in methods):
        budgets = list(cfg.budgets or [])
        if not budgets:
            raise ConfigError("budgets is empty but uniform or schedule_search was asked for; pass e.g. budgets=[0.3,0.5,0.7].")
        for budget in budgets:
            computed_steps(budget, num_steps)  # raises ConfigError for a budget outside (0, 1]
    if "taylorseer" in methods:
        if str(cfg.taylorseer.factors_dtype) not in ("float32", "bfloat16", "float16"):
            raise ConfigError(
                f"taylorseer.factors_dtype={cfg.taylorseer.factors_dtype!r} is not float32, bfloat16 or float16; pass one of those."
            )
        intervals = list(cfg.thresholds.taylorseer or [])
        if not intervals or any(not isinstance(i, int) or isinstance(i, bool) or i < 1 for i in intervals):
            raise ConfigError(
                f"thresholds.taylorseer={intervals} must list cache intervals, integers >= 1; pass e.g. thresholds.taylorseer=[1,2,4]."
            )
    search = dict(cfg.schedule_search)
    for name, low in (("passes", 0), ("radius", 1)):
        value = search.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(
                f"schedule_search.{name} must be an integer >= {low}, got {value!r}; "
                f"pass e.g. schedule_search.{name}={max(low, 2)}."
            )
    if not isinstance(search.get("greedy"), bool):
        raise ConfigError(f"schedule_search.greedy must be true or false, got {search.get('greedy')!r}.")
    from .schedule_search import check_forecasts

    forecasts = check_forecasts(search.get("forecasts", "auto"), "schedule_search.forecasts")
    search["forecasts"] = forecasts if forecasts == "auto" else list(forecasts)
    return search


def search_all(
    model: LoadedModel, recipe: Recipe, work: list[tuple[str, int]], budgets: list[float], search: dict[str, Any]
) -> tuple[dict[tuple[str, int], dict[float, frozenset]], dict[str, Any]]:
    """The schedule search for every output: ``{(prompt, seed): {budget: (steps, forecast)}}`` and the report for
    sweep.json (settings, cost, and per output and budget the schedule, its forecast and its gain over uniform).
    One search per forecast of ``search["forecasts"]``; per output and budget the better result is kept."""
    from .metrics import psnr_of_mse
    from .schedule_search import computed_steps, resolve_forecasts, schedule_errors, search_each_forecast

    steps = recipe.num_inference_steps
    counts = {b: computed_steps(b, steps) for b in budgets}
    schedules: dict[tuple[str, int], dict[float, frozenset]] = {}
    per_output, evaluations, seconds = [], 0, 0.0
    forecasts = list(resolve_forecasts(search.get("forecasts", "auto"), model.pipe.scheduler, "schedule_search.forecasts"))
    for prompt, seed in tqdm(work, desc="schedule search", unit="output", dynamic_ncols=True):

        @contextlib.contextmanager
        def objective(forecast: str) -> Iterator[Callable[[frozenset], float]]:
            with schedule_errors(model, recipe, [(prompt, seed)], forecast) as mse:
                yield lambda candidate: mse(candidate)[0]

        found = search_each_forecast(objective, forecasts, steps, list(counts.values()),
                                     passes=search["passes"], radius=search["radius"], greedy=search["greedy"])
        results, best = found.results, found.forecasts
        evaluations, seconds = evaluations + found.cost.evaluations, seconds + found.cost.seconds
        schedules[(prompt, seed)] = {b: (results[k].steps, best[k]) for b, k in counts.items()}
        per_output.append({
            "prompt": prompt,
            "seed": seed,
            "evaluations": found.cost.evaluations,
            "budgets": [
                {
                    "budget": b,
                    "computed_steps": k,
                    "steps": sorted(results[k].steps),
                    "forecast": best[k],
                    "start": results[k].start,
                    "psnr": round(psnr_of_mse(results[k].error), 3),
                    "psnr_by_forecast": {f: round(psnr_of_mse(found.by_forecast[f][k].error), 3) for f in forecasts},
                    # the uniform method's schedule reuses the residual: its error under that forecast when searched
                    "uniform_psnr": round(psnr_of_mse(found.by_forecast.get("reuse", results)[k].uniform_error), 3),
                }
                for b, k in counts.items()
            ],
        })
    report = {
        "settings": {**search, "forecasts": forecasts, "budgets": budgets},
        "evaluations": evaluations,
        "seconds": round(seconds, 2),
        "seconds_per_evaluation": round(seconds / max(evaluations, 1), 4),
        "per_output": per_output,
    }
    log.info("schedule search: %d generations in %.1f s", evaluations, seconds)
    return schedules, report


def bound_check(rows: list[Row]) -> list[dict[str, Any]]:
    """Each rule's row against the search's PSNR at the same computed fraction (linear between the
    search's budgets; rows outside their range are left out). ``margin_db`` > 0: the rule beat the search.

    TaylorSeer is left out: it does not skip steps but predicts the attention outputs (the rest of every block
    still runs), so its computed fraction counts something else and the search's space does not hold it."""
    bound = sorted((r.computed_fraction, r.psnr) for r in rows if r.method == "schedule_search" and r.psnr is not None)
    if len(bound) < 1:
        return []
    fractions = [f for f, _ in bound]
    checks = []
    for r in rows:
        if r.method in ("full", "schedule_search", "taylorseer") or r.psnr is None:
            continue
        if not fractions[0] <= r.computed_fraction <= fractions[-1]:
            continue
        at = float(np.interp(r.computed_fraction, fractions, [p for _, p in bound]))
        checks.append({
            "method": r.method, "setting": r.setting, "computed_fraction": r.computed_fraction,
            "psnr": r.psnr, "search_psnr": round(at, 3), "margin_db": round(r.psnr - at, 3),
        })
    return checks


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="sweep")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        run_sweep(cfg)


if __name__ == "__main__":
    main()
