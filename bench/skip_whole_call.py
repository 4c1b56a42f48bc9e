"""What skipping the whole transformer call saves: the file's searched schedules, each row run by the runtime
(``searched_schedule``: under an output forecast a skipped call runs nothing of the model) beside the same
schedule and forecast forced through the runtime's hooks with the skip inside the model (the embeddings and
the head still run, their output replaced), interleaved, on the sweep's held-out outputs.

    python bench/skip_whole_call.py --model reference_video [--outputs 4] [--repeats 5] [--json PATH]

Per row: the median over ``--repeats`` of the wall-clock time of generating the outputs each way (the two
alternate, so they share the machine's noise), their ratio, and whether the images are identical. Rows whose
forecast acts inside the model (``reuse``, ``linear``) have no whole-call skip and are timed as a control.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._sweep_setup import held_out_parser, held_out_setup, searched_schedules  # noqa: E402


def main() -> None:
    from calibrate.models import output_array
    from calibrate.schedule_search import ScheduleChange, forced_schedule
    from runtime import TeaCache
    from runtime.coefficients import load_coefficients
    from runtime.forecasts import OUTPUT_FORECASTS

    parser = held_out_parser(__doc__, "reference_video", outputs=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    setup = held_out_setup(args.model)
    model, recipe, work = setup.model, setup.recipe, setup.outputs(args.outputs)
    path = ROOT / "coefficients" / f"{args.model}.json"
    coefficients = load_coefficients(str(path))
    entry = coefficients.rules["searched_schedule"]
    scheduler = model.pipe.scheduler

    def generate_all() -> tuple[float, list[np.ndarray]]:
        start = time.perf_counter()
        images = [output_array(model.generate(p, s, recipe, output_type="np")) for p, s in work]
        return time.perf_counter() - start, images

    rows = []
    for (steps, forecast), threshold in zip(searched_schedules(path), [r["rel_l1_thresh"] for r in entry["thresholds"]]):
        whole, inside, same = [], [], True
        for _ in range(args.repeats):
            with TeaCache.from_coefficients(coefficients, rule="searched_schedule", rel_l1_thresh=threshold).apply(model.pipe):
                seconds, fast = generate_all()
            whole.append(seconds)
            with forced_schedule(model.transformer, ScheduleChange(steps), lambda: len(scheduler.timesteps), forecast, scheduler):
                seconds, forced = generate_all()
            inside.append(seconds)
            same = same and all(np.array_equal(a, b) for a, b in zip(fast, forced))
        row = {
            "computed_steps": len(steps), "forecast": forecast, "whole_call_skip": forecast in OUTPUT_FORECASTS,
            "seconds_whole_call_skip": round(statistics.median(whole), 4), "seconds_skip_inside": round(statistics.median(inside), 4),
            "speedup": round(statistics.median(inside) / statistics.median(whole), 4), "identical_images": same,
        }
        rows.append(row)
        print(f"{len(steps):>3} steps  {forecast:<17} whole-call skip {row['seconds_whole_call_skip']:.3f} s  skip inside "
              f"{row['seconds_skip_inside']:.3f} s  ratio {row['speedup']:.3f}  identical {same}")
    print(f"{args.model}: {len(work)} outputs per timing, median of {args.repeats}; ratio = skip inside / whole-call skip")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "outputs": len(work), "repeats": args.repeats, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
