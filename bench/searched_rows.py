"""Every ``searched_schedule`` row of one or more coefficients files, scored on a sweep's held-out outputs.

    python bench/searched_rows.py --model reference --outputs 20 FILE [FILE ...]

Per file and row (computed steps, forecast): the mean PSNR (dB, each output capped at 100) against full compute
over the first ``--outputs`` outputs of ``sweep/<model>/sweep.json``, each row run through the runtime with its
own forecast (``bench._sweep_setup.schedule_psnrs``). Compares fits of the same traces made with other
settings (``search=16``, say) on outputs none of them saw.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._sweep_setup import held_out_parser, held_out_setup, schedule_psnrs, searched_schedules  # noqa: E402


def main() -> None:
    parser = held_out_parser(__doc__)
    parser.add_argument("files", nargs="+", type=Path, help="coefficients files fitted for --model")
    args = parser.parse_args()
    rows = {path: searched_schedules(path) for path in args.files}
    missing = [str(p) for p, r in rows.items() if r is None]
    if missing:
        parser.error(f"{', '.join(missing)} has no searched_schedule rule; fit it with `python -m calibrate.fit search=8`.")
    setup = held_out_setup(args.model)
    work = setup.outputs(args.outputs)
    print(f"{args.model}: mean PSNR (dB) over {len(work)} held-out outputs, per row (computed steps, forecast)")
    for path, schedules in rows.items():
        psnr = schedule_psnrs(setup, work, schedules).mean(axis=0)
        scored = sorted((len(steps), f, float(p)) for (steps, f), p in zip(schedules, psnr))
        print(f"  {path}: " + "  ".join(f"{k} {f} {p:.2f}" for k, f, p in scored))


if __name__ == "__main__":
    main()
