"""``python -m calibrate.sweep model=reference coefficients=<json> limit=N out=<dir>``: speed against quality.

On prompts and seeds the fit never saw, side by side in one run:

- ``full``: full compute, the reference every output is compared to;
- ``teacache``: our runtime with the coefficients file, over thresholds from its table;
- ``first_block_cache``: diffusers' FirstBlockCache over its threshold grid;
- ``mag_cache``: diffusers' MagCache, its ratios calibrated with its own calibrate mode on the same
  recipe (one prompt the fit saw), over its threshold grid;
- ``oracle``: the same accumulate-and-threshold rule as TeaCache, driven by the true output change
  measured in full compute instead of the fitted polynomial: what no coefficient fit can beat.

Per setting: PSNR and SSIM against full compute (LPIPS when its weights are already on disk), the
computed fraction (calls in which the last block ran), and the wall-clock speedup (median of repeats,
all methods timed in the same loop). Writes ``<out>/sweep.json`` and ``<out>/pareto.png``.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import logging
import math
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

METHODS = ("full", "teacache", "oracle", "first_block_cache", "mag_cache")


@dataclass
class Row:
    method: str
    setting: float | None
    computed_fraction: float
    wall_speedup: float
    psnr: float | None  # None: identical to full compute (infinite PSNR)
    ssim: float
    lpips: float | None
    n_outputs: int
    max_abs_diff: float


class ComputeProbe:
    """Counts transformer calls and the calls in which the last block really ran (its attention)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        from runtime.adapters import adapter_for

        last = adapter_for(transformer).blocks(transformer)[-1][1]
        attention = next(m for name, m in last.named_children() if name.startswith("attn"))
        self.calls = self.computed = 0
        self._handles = [
            transformer.register_forward_pre_hook(lambda *_: self._count("calls")),
            attention.register_forward_hook(lambda *_: self._count("computed")),
        ]

    def _count(self, name: str) -> None:
        setattr(self, name, getattr(self, name) + 1)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


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


def _images(output: Any) -> np.ndarray:
    array = output.frames if hasattr(output, "frames") else output.images
    return np.asarray(array[0], dtype=np.float32)


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
    from diffusers import FirstBlockCacheConfig, MagCacheConfig

    from runtime import DecisionRule, TeaCache
    from runtime.hooks import apply_teacache, remove_teacache

    transformer = model.transformer
    if method == "full":
        yield
    elif method == "teacache":
        with TeaCache.from_coefficients(coefficients, rel_l1_thresh=setting).apply(model.pipe):
            yield
    elif method == "oracle":
        d = coefficients.defaults
        rule = DecisionRule((1.0, 0.0), None, setting, d.warmup_steps, d.final_steps, d.max_consecutive_skips)
        scheduler = model.pipe.scheduler
        oracle = OracleChange(extras["true_changes"], extras["current"])
        apply_teacache(transformer, rule, "modulated_input", CacheStats(), lambda: len(scheduler.timesteps), oracle)
        try:
            yield
        finally:
            remove_teacache(transformer)
    elif method in ("first_block_cache", "mag_cache"):
        if method == "first_block_cache":
            config = FirstBlockCacheConfig(threshold=setting)
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


def run_sweep(cfg: DictConfig) -> Path:
    from .traces import check_output

    for name in ("repeats", "teacache_points", "limit"):  # checked before anything loads
        value = cfg.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}; pass a positive count, e.g. {name}=1.")
    check_output(Path(str(cfg.out)), folder=True, error=ConfigError)
    coefficients = load_coefficients(cfg.coefficients)
    recipe = Recipe.from_config(cfg)
    if recipe.for_coefficients() != {k: v for k, v in coefficients.recipe.items() if k != "pipeline"}:
        log.warning("the sweep's recipe %s differs from the one %s was fitted for", recipe, coefficients.origin)
    work = held_out_work(cfg, coefficients)
    methods = [m for m in cfg.methods if m != "full"]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ConfigError(f"unknown method {unknown[0]!r} in methods=; choose from {', '.join(METHODS)}.")
    import torch  # and diffusers with the models: only now, after the checks above

    from .metrics import Lpips, psnr, ssim
    from .models import load_model, resolve_device, resolve_dtype
    from .recorder import TraceRecorder

    device = resolve_device(cfg.device)
    model = load_model(cfg.model, device, resolve_dtype(cfg.dtype))

    settings: list[tuple[str, float | None]] = [("full", None)]
    extras: dict[str, Any] = {"steps": recipe.num_inference_steps, "mag_cache": dict(cfg.mag_cache), "current": {}}
    for method in methods:
        if method in ("teacache", "oracle"):
            grid = teacache_thresholds(coefficients, cfg.teacache_points)
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

    def generate_all() -> list[np.ndarray]:
        images = []
        for prompt, seed in work:
            extras["current"]["key"] = (prompt, seed)
            images.append(_images(model.generate(prompt, seed, recipe, output_type="np")))
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
    full_images, full_time = outputs[("full", None)], statistics.median(times[("full", None)])
    rows = []
    for key in settings:
        images = outputs[key]
        psnrs = [psnr(a, b) for a, b in zip(images, full_images)]
        lp = [lpips(a, b) for a, b in zip(images, full_images)]
        finite = [v for v in psnrs if math.isfinite(v)]
        rows.append(
            Row(
                method=key[0],
                setting=key[1],
                computed_fraction=round(fractions[key], 4),
                wall_speedup=round(full_time / statistics.median(times[key]), 4),
                psnr=None if not finite else round(float(np.mean([min(v, 100.0) for v in psnrs])), 3),
                ssim=round(float(np.mean([ssim(a, b) for a, b in zip(images, full_images)])), 5),
                lpips=None if lp[0] is None else round(float(np.mean(lp)), 5),
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
        "rows": [asdict(r) for r in rows],
    }
    from runtime.coefficients import unwritable, write_atomically

    text = json.dumps(document, indent=1) + "\n"
    try:  # atomically, like every file the tools write: a kill or a full disk never leaves half a file
        write_atomically(out / "sweep.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(unwritable(out / "sweep.json", exc)) from None
    from .plots import plot_pareto

    plot_pareto(out / "pareto.png", rows, title=f"{cfg.model.name}: {len(work)} held-out outputs, {recipe.num_inference_steps} steps")
    _print_table(rows)
    return out


def _print_table(rows: list[Row]) -> None:
    print(f"{'method':<18} {'setting':>8} {'computed':>9} {'speedup':>8} {'PSNR':>8} {'SSIM':>7}")
    for r in rows:
        setting = "" if r.setting is None else f"{r.setting:g}"
        quality = "inf" if r.psnr is None else f"{r.psnr:.2f}"
        print(f"{r.method:<18} {setting:>8} {r.computed_fraction:>9.3f} {r.wall_speedup:>8.2f} {quality:>8} {r.ssim:>7.4f}")


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="sweep")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        run_sweep(cfg)


if __name__ == "__main__":
    main()
