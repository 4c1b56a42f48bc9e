"""How close can one schedule, shared by every output, come to the per-output search? An in-sample bound.

    python bench/shared_schedule_bound.py --model reference_video [--outputs 8] [--json PATH]

Reads a sweep's ``sweep.json`` (``sweep/<model>/sweep.json``, run with ``schedule_search``), takes its first
``--outputs`` held-out outputs, and searches the one schedule per budget that serves *those very outputs* best
(mean PSNR against full compute; the sweep's search settings, ``calibrate.schedule_search.search_schedules``
with passes 2, radius 1, greedy, once per forecast, the best kept per budget). No schedule shared by these
outputs can beat it, so its distance to the per-output search is what sharing a schedule costs; beside both,
the file's ``searched_schedule`` (searched on training pairs, not on these outputs) on the same outputs, each
row with its own forecast.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._sweep_setup import held_out_parser, held_out_setup, searched_schedules  # noqa: E402


def main() -> None:
    from calibrate.metrics import psnr_of_mse
    from calibrate.schedule_search import computed_steps, resolve_forecasts, schedule_errors, search_each_forecast

    parser = held_out_parser(__doc__, "reference_video")
    parser.add_argument("--coefficients", type=Path, default=None,
                        help="the file whose searched schedules to score (default coefficients/<model>.json)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--forecasts", type=lambda v: v.split(","), default=None,
                        help="what a skipped step does, one search each (comma-separated; default, as the sweep's: "
                             "every forecast the model's sampler runs)")
    args = parser.parse_args()
    setup = held_out_setup(args.model)
    args.forecasts = list(resolve_forecasts(args.forecasts or "auto", setup.model.pipe.scheduler, "--forecasts"))
    sweep, work, recipe, model = setup.sweep, setup.outputs(args.outputs), setup.recipe, setup.model
    per_output = {(p["prompt"], p["seed"]): {b["budget"]: b["psnr"] for b in p["budgets"]}
                  for p in sweep["schedule_search"]["per_output"]}
    budgets = list(sweep["schedule_search"]["settings"]["budgets"])
    n = recipe.num_inference_steps
    source = args.coefficients or ROOT / "coefficients" / f"{args.model}.json"
    rows = searched_schedules(source)
    if rows is None:
        parser.error(f"{source} has no searched_schedule rule; fit it with `python -m calibrate.fit search=8`.")
    counts = {b: computed_steps(b, n) for b in budgets}
    start = time.perf_counter()
    searched_psnr: dict[int, float] = {}

    @contextlib.contextmanager
    def objective(forecast: str):
        with schedule_errors(model, recipe, work, forecast) as mse:

            def psnrs(steps) -> list[float]:
                return [psnr_of_mse(m) for m in mse(frozenset(steps))]

            for steps, row_forecast in rows:
                if row_forecast == forecast and len(steps) in counts.values():  # the file's row, run as the runtime runs it
                    searched_psnr[len(steps)] = float(np.mean(psnrs(steps)))
            yield lambda steps: -float(np.mean(psnrs(steps))) / 10

    # one in-sample search per forecast; per budget the better is kept
    found = search_each_forecast(objective, args.forecasts, n, list(counts.values()), passes=2, radius=1, greedy=True)
    evaluations = found.cost.evaluations
    rows = []
    for budget, k in counts.items():
        rows.append({
            "budget": budget, "computed_steps": k,
            "per_output_search_psnr": round(float(np.mean([per_output[w][budget] for w in work])), 3),
            "shared_in_sample_psnr": round(-10 * found.results[k].error, 3),
            "shared_in_sample_steps": sorted(found.results[k].steps),
            "shared_in_sample_forecast": found.forecasts[k],
            "searched_schedule_psnr": round(searched_psnr[k], 3) if k in searched_psnr else None,
        })
    print(f"{args.model}: {len(work)} held-out outputs, {evaluations} shared schedules searched in "
          f"{time.perf_counter() - start:.0f} s")
    print(f"{'budget':>7}{'per-output':>12}{'shared, in-sample':>19}{'searched_schedule':>19}")
    for r in rows:
        searched = "" if r["searched_schedule_psnr"] is None else f"{r['searched_schedule_psnr']:.2f}"
        print(f"{r['budget']:>7}{r['per_output_search_psnr']:>12.2f}{r['shared_in_sample_psnr']:>19.2f}{searched:>19}")
    print("mean PSNR (dB) against full compute over the outputs")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "outputs": len(work), "evaluations": evaluations, "forecasts": args.forecasts,
                                         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
