"""How much of the shared schedule's shortfall is the sampling noise of choosing it on a few outputs?

    python bench/schedule_choice_noise.py --model reference_video [--fresh 16] [--json PATH]

Per budget, two shared schedules (each with its own forecast): the file's ``searched_schedule`` row, chosen on
the fit's training pairs, and the in-sample optimum ``bench/shared_schedule_bound.py`` found on the sweep's
first held-out outputs (``bench/results/shared_schedule_bound_<model>.json``). Each runs, through the runtime,
on three sets of outputs: the training pairs the file's row was chosen on, the held-out outputs the other was
chosen on, and ``--fresh`` outputs neither saw (the sweep's held-out prompts in turn, at seeds 3000, 3001, ...). Per set:
mean PSNR (dB) against full compute of each, and their paired difference with its standard error over the
set's outputs. A schedule that wins by a margin on the outputs it was chosen on and loses it on the others
was chosen by noise.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._sweep_setup import (  # noqa: E402
    held_out_parser, held_out_setup, paired_difference, schedule_psnrs, searched_schedules,
)

FRESH_SEED = 3000


def main() -> None:
    parser = held_out_parser(__doc__, "reference_video")
    parser.add_argument("--fresh", type=int, default=16, help="outputs neither schedule was chosen on")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    bound_path = ROOT / "bench" / "results" / f"shared_schedule_bound_{args.model}.json"
    if not bound_path.exists():
        parser.error(f"{bound_path} is missing: run `python bench/shared_schedule_bound.py --model {args.model} "
                     f"--json {bound_path.relative_to(ROOT)}` first.")
    bound = json.loads(bound_path.read_text())
    coefficients = ROOT / "coefficients" / f"{args.model}.json"
    entry = json.loads(coefficients.read_text())["rules"]["searched_schedule"]
    setup = held_out_setup(args.model)
    sets = {
        "training pairs (the file's row chosen here)": [(p["prompt"], p["seed"]) for p in entry["fit"]["pairs"]],
        "held-out outputs (the other chosen here)": setup.outputs(bound["outputs"]),
        "fresh outputs (neither)": setup.fresh_outputs(args.fresh, FRESH_SEED),
    }
    rows = {len(steps): (steps, forecast) for steps, forecast in searched_schedules(coefficients)}
    pairs = [(b, (rows[b["computed_steps"]], (frozenset(b["shared_in_sample_steps"]), b["shared_in_sample_forecast"])))
             for b in bound["rows"] if b["computed_steps"] in rows]
    schedules = [s for _, two in pairs for s in two]
    start = time.perf_counter()
    scores = {name: schedule_psnrs(setup, outputs, schedules) for name, outputs in sets.items()}
    seconds = time.perf_counter() - start

    result = []
    print(f"{args.model}: mean PSNR (dB) against full compute; 'other' is the in-sample optimum on the sweep's first "
          f"{bound['outputs']} held-out outputs ({seconds:.0f} s)")
    for j, (b, ((file_steps, file_forecast), (other_steps, other_forecast))) in enumerate(pairs):
        row = {"budget": b["budget"], "computed_steps": b["computed_steps"],
               "file": {"steps": sorted(file_steps), "forecast": file_forecast},
               "other": {"steps": sorted(other_steps), "forecast": other_forecast}, "sets": {}}
        print(f"  {b['computed_steps']} steps: file {sorted(file_steps)} ({file_forecast}), other {sorted(other_steps)} ({other_forecast})")
        for name, m in scores.items():
            file_psnr, other_psnr = m[:, 2 * j], m[:, 2 * j + 1]
            mean, se = paired_difference(other_psnr, file_psnr)
            row["sets"][name] = {"outputs": len(file_psnr), "file": round(float(file_psnr.mean()), 2),
                                 "other": round(float(other_psnr.mean()), 2),
                                 "other_minus_file": round(mean, 2), "standard_error": round(se, 2)}
            print(f"     {name:<45} ({len(file_psnr):2d}): file {file_psnr.mean():6.2f}, other {other_psnr.mean():6.2f}, "
                  f"other - file {mean:+5.2f} +- {se:.2f}")
        result.append(row)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "seconds": round(seconds, 1),
                                         "sets": {k: [{"prompt": p, "seed": s} for p, s in v] for k, v in sets.items()},
                                         "rows": result}, indent=1))


if __name__ == "__main__":
    main()
