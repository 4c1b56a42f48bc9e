"""The output forecasts (runtime.forecasts) at a file's searched schedules and at the sweep's per-output ones.

    python bench/output_forecast.py [--model reference] [--outputs 10] [--json PATH]

Runs the file's ``searched_schedule`` rows, each with the forecast the file gives it, beside the same schedules
under ``output_linear`` and (where the sampler allows it: Euler, UniPC, DEIS or DPM-Solver) ``output_corrected``; and the sweep's
per-output schedules (the bound's) under the output forecasts, beside the PSNR the search recorded with its own
forecast. All through the runtime (``bench._sweep_setup.schedule_psnrs``), on the sweep's first ``--outputs``
held-out outputs. Mean PSNR (dB) against full compute, each output capped at 100.

This measured the case for building the output forecasts (then a prototype hook, which the runtime reproduces to
the hundredth of a dB) before the fit and the bound searched them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._sweep_setup import held_out_parser, held_out_setup, schedule_psnrs, searched_schedules  # noqa: E402


def main() -> None:
    from runtime.forecasts import OUTPUT_FORECASTS, forecasts_for

    parser = held_out_parser(__doc__, outputs=10)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    setup = held_out_setup(args.model)
    work = setup.outputs(args.outputs)
    forecasts = [f for f in OUTPUT_FORECASTS if f in forecasts_for(setup.model.pipe.scheduler)]
    rows = searched_schedules(ROOT / "coefficients" / f"{args.model}.json")
    if rows is None:
        parser.error(f"coefficients/{args.model}.json has no searched_schedule rule; fit it with `python -m calibrate.fit search=8`.")
    per_output = {(p["prompt"], p["seed"]): p["budgets"] for p in setup.sweep["schedule_search"]["per_output"]}

    results = {"rows": [], "per_output": []}
    as_filed = schedule_psnrs(setup, work, rows).mean(axis=0)
    by_forecast = {f: schedule_psnrs(setup, work, [(steps, f) for steps, _ in rows]).mean(axis=0) for f in forecasts}
    for i, (steps, forecast) in enumerate(rows):
        results["rows"].append({"computed_steps": len(steps), "runtime_forecast": forecast, "runtime": round(float(as_filed[i]), 2),
                                **{f: round(float(by_forecast[f][i]), 2) for f in forecasts}})
    for b, budget in enumerate(per_output[work[0]]):
        entry = {"budget": budget["budget"], "computed_steps": budget["computed_steps"],
                 "bound": round(float(np.mean([per_output[pair][b]["psnr"] for pair in work])), 2)}
        for f in forecasts:  # each output under its own schedule
            own = [schedule_psnrs(setup, [pair], [(frozenset(per_output[pair][b]["steps"]), f)])[0, 0] for pair in work]
            entry[f] = round(float(np.mean(own)), 2)
        results["per_output"].append(entry)

    print(f"{args.model}, {len(work)} held-out outputs, mean PSNR (dB) against full compute")
    header = "".join(f"  {f:>16}" for f in forecasts)
    print(f"  the file's searched_schedule rows: steps  as filed (its forecast)  {header}")
    for r in results["rows"]:
        print(f"  {r['computed_steps']:>39}  {r['runtime']:>8.2f} ({r['runtime_forecast']:<16})"
              + "".join(f"  {r[f]:>16.2f}" for f in forecasts))
    print(f"  the per-output search's schedules: steps  bound (as searched)      {header}")
    for r in results["per_output"]:
        print(f"  {r['computed_steps']:>39}  {r['bound']:>8.2f}{'':>17}" + "".join(f"  {r[f]:>16.2f}" for f in forecasts))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "outputs": len(work), **results}, indent=1))


if __name__ == "__main__":
    main()
