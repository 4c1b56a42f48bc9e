"""Every ``searched_schedule`` row of one or more coefficients files, scored on a sweep's held-out outputs.

    python bench/searched_rows.py --model reference --outputs 20 [--seed 3000] [--every-forecast]
                                  [--per-output-schedules K] FILE [FILE ...]

Per file and row (computed steps, forecast): the mean PSNR (dB, each output capped at 100) against full compute
over the first ``--outputs`` outputs of ``sweep/<model>/sweep.json``, each row run through the runtime with its
own forecast (``bench._sweep_setup.schedule_psnrs``). Compares fits of the same traces made with other
settings (``search=16``, say) on outputs none of them saw. With ``--seed N`` the outputs are the sweep's held-out
prompts in turn at seeds N, N+1, ... instead: a validation set, so that fit settings are chosen without looking
at the outputs the sweep reports. Beside every later file, each row's mean difference to the first file's row
with as many steps, and its standard error over the outputs.

With ``--every-forecast`` each row's schedule also runs under every forecast the model's sampler runs, and the line
adds the mean over outputs of the best of them per output: what choosing the forecast per output (knowing the
final error) could add to a shared schedule, one part of the per-output search's lead (``schedule_search``
chooses both per output).

With ``--per-output-schedules K`` the schedules the sweep's per-output search found with K computed steps (one per
sweep output, each with its forecast) also run, as shared schedules, on the same outputs, each beside the first
file's K-step row (paired difference and standard error): is there a better shared K-step schedule among them? Run
it with ``--seed`` so that the outputs are not those the schedules were found on.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._sweep_setup import (  # noqa: E402
    held_out_parser, held_out_setup, paired_difference, schedule_psnrs, searched_schedules,
)


def main() -> None:
    parser = held_out_parser(__doc__)
    parser.add_argument("--seed", type=int, default=None,
                        help="score the sweep's held-out prompts at seeds SEED, SEED+1, ... instead of its outputs")
    parser.add_argument("--every-forecast", action="store_true",
                        help="also run each row under every forecast the sampler runs, and the per-output best of them")
    parser.add_argument("--per-output-schedules", type=int, default=None, metavar="K",
                        help="also run the sweep's per-output K-step schedules as shared schedules, against the K-step row")
    parser.add_argument("files", nargs="+", type=Path, help="coefficients files fitted for --model")
    args = parser.parse_args()
    rows = {path: searched_schedules(path) for path in args.files}
    missing = [str(p) for p, r in rows.items() if r is None]
    if missing:
        parser.error(f"{', '.join(missing)} has no searched_schedule rule; fit it with `python -m calibrate.fit search=8`.")
    setup = held_out_setup(args.model)
    if args.seed is None:
        work, what = setup.outputs(args.outputs), "held-out outputs"
    else:
        work = setup.fresh_outputs(args.outputs, args.seed)
        what = f"held-out prompts at seeds {args.seed}..{args.seed + args.outputs - 1}"
    print(f"{args.model}: mean PSNR (dB) over {len(work)} {what}, per row (computed steps, forecast)")
    first: dict[int, np.ndarray] = {}
    for path, schedules in rows.items():
        psnr = schedule_psnrs(setup, work, schedules)  # [output, row]
        by_steps = {len(steps): (f, psnr[:, j]) for j, (steps, f) in enumerate(schedules)}
        cells = []
        for k, (f, p) in sorted(by_steps.items()):
            cell = f"{k} {f} {p.mean():.2f}"
            if first and k in first and len(p) > 1:
                mean, se = paired_difference(p, first[k])
                cell += f" ({mean:+.2f} +- {se:.2f})"
            cells.append(cell)
        print(f"  {path}: " + "  ".join(cells))
        if args.every_forecast:
            print_every_forecast(setup, work, schedules, psnr)
        if not first:
            first = {k: p for k, (_, p) in by_steps.items()}
    if args.per_output_schedules is not None:
        k = args.per_output_schedules
        if k not in first:
            parser.error(f"--per-output-schedules {k}: {args.files[0]} has no {k}-step row (it has {sorted(first)}).")
        print_per_output_schedules(setup, work, k, first[k])


def print_every_forecast(setup, work, schedules, psnr) -> None:
    """Per row: the mean PSNR under each forecast the sampler runs, and the mean of the per-output best."""
    from calibrate.schedule_search import resolve_forecasts

    forecasts = resolve_forecasts("auto", setup.model.pipe.scheduler, "forecasts")
    every = np.stack([psnr] * len(forecasts))  # [forecast, output, row]; each row's own forecast is scored already
    for i, f in enumerate(forecasts):
        others = [j for j, (_, own) in enumerate(schedules) if own != f]
        if others:
            every[i][:, others] = schedule_psnrs(setup, work, [(schedules[j][0], f) for j in others])
    for j, (steps, own) in enumerate(schedules):
        cells = "  ".join(f"{f} {every[i, :, j].mean():.2f}" for i, f in enumerate(forecasts))
        print(f"    {len(steps)} steps ({own} {psnr[:, j].mean():.2f}): {cells}  best per output {every[:, :, j].max(0).mean():.2f}")


def print_per_output_schedules(setup, work, k: int, row: np.ndarray) -> None:
    """The sweep's per-output ``k``-step schedules (distinct ones) run as shared schedules on ``work``, each beside
    the file's ``k``-step row (``row``: its PSNR per output)."""
    found = []
    for entry in setup.sweep["schedule_search"]["per_output"]:
        budget = next((b for b in entry["budgets"] if b["computed_steps"] == k), None)
        if budget is not None and (frozenset(budget["steps"]), budget["forecast"]) not in found:
            found.append((frozenset(budget["steps"]), budget["forecast"]))
    if not found:
        raise SystemExit(f"the sweep's per-output search has no {k}-step schedule; pass one of its budgets' step counts.")
    psnr = schedule_psnrs(setup, work, found)
    print(f"  the sweep's {len(found)} per-output {k}-step schedules as shared ones, against the file's row ({row.mean():.2f}):")
    for j, (steps, forecast) in enumerate(found):
        mean, se = paired_difference(psnr[:, j], row)
        print(f"    {sorted(steps)} {forecast} {psnr[:, j].mean():.2f} ({mean:+.2f} +- {se:.2f})")


if __name__ == "__main__":
    main()
