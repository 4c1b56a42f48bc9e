"""Can a per-output planner that follows the output's own forecast error beat the file's one shared schedule?

    python bench/error_planner.py --model reference_video [--outputs 8] [--json PATH]

The natural per-output rule, as an ODE solver's step-size control: after each computed step, skip the next
steps while the summed error of the skipped outputs' forecast stays under a tolerance. Here the planner is
given the *true* error of each skipped step, which no runtime has: the relative L1 distance, over every CFG
branch, between the full-compute transformer output at that step and the line through the outputs of the last
two computed steps (what ``output_linear`` returns there; from the last one alone before two exist). Each
step's error is weighted by ``(dsigma_i / mean dsigma) ** p``, the sampler's step there to a power: p = 1
charges a stale output by the step it is integrated over (as ``teacache_dsigma`` does), p = 0 counts every
step alike, p = -1 and -2 charge early steps more (their errors propagate further).

For each weighting and a range of tolerances, every output gets the schedule its own errors give; the
schedules run through the runtime (closed loop, both output forecasts) and are scored by PSNR against full
compute (``calibrate.schedule_search.forced_schedule``), beside the file's ``searched_schedule`` rows (one
schedule for every output, searched on training pairs, each with its own forecast) on the same outputs.
Per weighting, its PSNR at the file rows' computed fractions (interpolated between tolerances).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._sweep_setup import held_out_parser, held_out_setup, searched_schedules  # noqa: E402

POWERS = (1.0, 0.0, -1.0, -2.0)
TOLERANCES = np.geomspace(0.004, 8.0, 23)


def full_outputs(setup, pairs, num_steps: int):
    """Per pair, the full-compute transformer outputs ``[steps, branches, ...]`` (float64) and the output image."""
    import torch

    from calibrate.models import output_array
    from runtime.forecasts import sample_of

    calls: list = []
    handle = setup.model.transformer.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(sample_of(out).detach().double().clone()), with_kwargs=True)
    trajectories, images = [], []
    try:
        for prompt, seed in pairs:
            calls.clear()
            images.append(output_array(setup.model.generate(prompt, seed, setup.recipe, output_type="np")).astype(np.float64))
            branches = len(calls) // num_steps
            trajectories.append(torch.stack([torch.stack(calls[i * branches:(i + 1) * branches]) for i in range(num_steps)]))
    finally:
        handle.remove()
    return trajectories, images


def forecast_errors(v) -> np.ndarray:
    """``E[a2 + 1, a, i]``: relative L1 error at step ``i`` of the line through the outputs at ``a2 < a`` (``a2 = -1``,
    index 0: the output at ``a`` alone), for every ``i > a``."""
    n = v.shape[0]
    errors = np.full((n + 1, n, n), np.nan)
    scale = v.flatten(1).abs().mean(1)
    for a in range(n):
        for a2 in range(-1, a):
            slope = 0.0 if a2 < 0 else (v[a] - v[a2]) / (a - a2)
            for i in range(a + 1, n):
                errors[a2 + 1, a, i] = float(((v[a] + slope * (i - a)) - v[i]).abs().mean() / scale[i])
    return errors


def plan(errors: np.ndarray, weights: np.ndarray, tol: float) -> frozenset:
    """Compute step 0; skip each later step while the weighted errors summed since the last computed step stay
    below ``tol``."""
    computed, acc = [0], 0.0
    for i in range(1, len(weights)):
        a2 = computed[-2] if len(computed) > 1 else -1
        e = errors[a2 + 1, computed[-1], i] * weights[i]
        if acc + e < tol:
            acc += e
        else:
            computed.append(i)
            acc = 0.0
    return frozenset(computed)


def main() -> None:
    from calibrate.metrics import psnr_of_mse
    from calibrate.models import output_array
    from calibrate.schedule_search import ScheduleChange, forced_schedule

    parser = held_out_parser(__doc__, "reference_video")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    setup = held_out_setup(args.model)
    pairs = list(dict.fromkeys(setup.outputs(10**6)))[: args.outputs]  # distinct (prompt, seed) outputs
    n = setup.recipe.num_inference_steps
    scheduler = setup.model.pipe.scheduler
    start = time.perf_counter()
    trajectories, fulls = full_outputs(setup, pairs, n)
    sigmas = scheduler.sigmas.double().numpy()
    dsigma = np.abs(sigmas[:n] - sigmas[1 : n + 1])
    errors = [forecast_errors(v) for v in trajectories]

    current = {"steps": frozenset()}

    def psnrs(forecast: str, schedules: list[frozenset]) -> list[float]:
        """Each pair generated under its own schedule."""
        out = []
        with forced_schedule(setup.model.transformer, ScheduleChange(lambda: current["steps"]), lambda: len(scheduler.timesteps),
                             forecast, scheduler):
            for (prompt, seed), full, steps in zip(pairs, fulls, schedules):
                current["steps"] = steps
                image = output_array(setup.model.generate(prompt, seed, setup.recipe, output_type="np")).astype(np.float64)
                out.append(psnr_of_mse(float(np.mean((image - full) ** 2))))
        return out

    rows = searched_schedules(ROOT / "coefficients" / f"{args.model}.json") or []
    file_rows = [{"computed_fraction": round(len(s) / n, 4), "forecast": f,
                  "psnr": round(float(np.mean(psnrs(f, [s] * len(pairs)))), 2)} for s, f in rows]
    planners = []
    for power in POWERS:
        weights = (dsigma / dsigma.mean()) ** power
        for forecast in ("output_linear", "output_corrected"):
            points, seen = [], set()
            for tol in TOLERANCES:
                schedules = [plan(e, weights, float(tol)) for e in errors]
                fraction = float(np.mean([len(s) for s in schedules])) / n
                key = tuple(sorted(map(tuple, map(sorted, schedules))))
                if not 0.25 <= fraction <= 0.85 or key in seen:
                    continue
                seen.add(key)
                points.append({"tol": round(float(tol), 5), "computed_fraction": round(fraction, 4),
                               "psnr": round(float(np.mean(psnrs(forecast, schedules))), 2),
                               "distinct_schedules": len(set(schedules))})
            points.sort(key=lambda p: p["computed_fraction"])
            fx, fy = [p["computed_fraction"] for p in points], [p["psnr"] for p in points]
            at_rows = [round(float(np.interp(r["computed_fraction"], fx, fy)), 2)
                       if fx and fx[0] <= r["computed_fraction"] <= fx[-1] else None for r in file_rows]
            planners.append({"power": power, "forecast": forecast, "points": points, "at_file_rows": at_rows})
            print(f"p = {power:+.0f}, {forecast}: " + ", ".join(f"{p['computed_fraction']:.3f} -> {p['psnr']:.2f}" for p in points),
                  flush=True)
    seconds = time.perf_counter() - start

    print(f"\n{args.model}, {len(pairs)} held-out outputs, mean PSNR (dB) against full compute ({seconds:.0f} s)")
    print("computed | file's searched_schedule (forecast) | " + " | ".join(f"planner p={p['power']:+.0f} {p['forecast']}" for p in planners))
    for j, r in enumerate(file_rows):
        cells = [f"{p['at_file_rows'][j]:.2f}" if p["at_file_rows"][j] is not None else "-" for p in planners]
        print(f"{r['computed_fraction']:.2f} | {r['psnr']:.2f} ({r['forecast']}) | " + " | ".join(cells))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "outputs": [{"prompt": p, "seed": s} for p, s in pairs],
                                         "seconds": round(seconds, 1), "file_rows": file_rows, "planners": planners}, indent=1))


if __name__ == "__main__":
    main()
