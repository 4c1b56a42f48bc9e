"""What the forecasts add to the x-driven rules: each rule at its own table's thresholds, under each forecast
(the residual reused, extrapolated, the output extrapolated, corrected), on the sweep's held-out outputs.

    python bench/forecast_gain.py --model reference [--outputs 8] [--forecasts reuse,linear] [--json PATH]

Per rule and threshold: the computed fraction and the mean PSNR against full compute over the outputs (each
capped at 100 dB), per forecast (``--forecasts``; default: every one the model's sampler runs). The outputs are
the first ``--outputs`` of ``sweep/<model>/sweep.json`` (held-out prompts, seed 1000).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._sweep_setup import held_out_parser, held_out_setup  # noqa: E402


def main() -> None:
    from calibrate.metrics import psnr_of_mse
    from calibrate.models import output_array
    from calibrate.sweep import teacache_thresholds
    from runtime import TeaCache
    from runtime.coefficients import load_coefficients
    from runtime.forecasts import forecasts_for

    parser = held_out_parser(__doc__)
    parser.add_argument("--rules", default="teacache,teacache_drift", help="comma-separated rules of the file")
    parser.add_argument("--forecasts", default=None, help="comma-separated forecasts (default: all the sampler runs)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    setup = held_out_setup(args.model)
    forecasts = args.forecasts.split(",") if args.forecasts else list(forecasts_for(setup.model.pipe.scheduler))
    work, recipe, model = setup.outputs(args.outputs), setup.recipe, setup.model
    coefficients = load_coefficients(str(ROOT / "coefficients" / f"{args.model}.json"))

    def outputs() -> list[np.ndarray]:
        return [output_array(model.generate(p, s, recipe, output_type="np")).astype(np.float64) for p, s in work]

    fulls = outputs()
    rows = []
    for rule in args.rules.split(","):
        for thresh in teacache_thresholds(coefficients.for_rule(rule), 6)[1:]:
            row = {"rule": rule, "rel_l1_thresh": thresh}
            for forecast in forecasts:
                with TeaCache.from_coefficients(coefficients, rule=rule, rel_l1_thresh=thresh, forecast=forecast).apply(model.pipe) as cache:
                    images = outputs()
                stats = cache.stats.values()
                row[f"{forecast}_computed"] = round(sum(s.computed for s in stats) / max(1, sum(s.calls for s in stats)), 4)
                psnrs = [psnr_of_mse(float(np.mean((a - b) ** 2))) for a, b in zip(images, fulls)]
                row[f"{forecast}_psnr"] = round(float(np.mean(psnrs)), 3)
            rows.append(row)
            print(f"{rule:<16} {thresh:>8.4g}  " + "   ".join(
                f"{f} {row[f + '_computed']:.3f} {row[f + '_psnr']:6.2f} dB" for f in forecasts), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "outputs": len(work), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
