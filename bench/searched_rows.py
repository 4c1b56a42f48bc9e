"""Every ``searched_schedule`` row of one or more coefficients files, scored on a sweep's held-out outputs.

    python bench/searched_rows.py --model reference --outputs 20 FILE [FILE ...]

Per file and row (computed steps, forecast): the mean PSNR (dB, each output capped at 100) against full compute
over the first ``--outputs`` outputs of ``sweep/<model>/sweep.json``, each row run through the runtime with its
own forecast (``calibrate.schedule_search.schedule_errors``). Compares fits of the same traces made with other
settings (``search=16``, say) on outputs none of them saw.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._sweep_setup import held_out_parser, held_out_setup  # noqa: E402


def main() -> None:
    from calibrate.schedule_search import schedule_errors
    from runtime.coefficients import load_coefficients

    parser = held_out_parser(__doc__)
    parser.add_argument("files", nargs="+", type=Path, help="coefficients files fitted for --model")
    args = parser.parse_args()
    entries = {path: load_coefficients(str(path)).rules.get("searched_schedule") for path in args.files}
    missing = [str(p) for p, e in entries.items() if e is None]
    if missing:
        parser.error(f"{', '.join(missing)} has no searched_schedule rule; fit it with `python -m calibrate.fit search=8`.")
    setup = held_out_setup(args.model)
    work = setup.outputs(args.outputs)
    print(f"{args.model}: mean PSNR (dB) over {len(work)} held-out outputs, per row (computed steps, forecast)")
    for path, entry in entries.items():
        forecasts = entry.get("forecasts") or ["reuse"] * len(entry["schedules"])
        scored = []
        for forecast in sorted(set(forecasts)):
            with schedule_errors(setup.model, setup.recipe, work, forecast) as mse:
                for steps, f in zip(entry["schedules"], forecasts):
                    if f == forecast:
                        psnr = np.mean([min(100.0, -10 * np.log10(max(m, 1e-10))) for m in mse(frozenset(steps))])
                        scored.append((len(steps), f, float(psnr)))
        print(f"  {path}: " + "  ".join(f"{k} {f} {p:.2f}" for k, f, p in sorted(scored)))


if __name__ == "__main__":
    main()
