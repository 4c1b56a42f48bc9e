"""Does the per-output search's lead survive a nudge of the output it was found on? What part of the bound a rule
that follows the content could reach, and what part is the search fitting one realization.

    python bench/bound_stability.py --model reference [--outputs 8] [--eps 0.02 0.1 0.3] [--json PATH]

For each of the sweep's first ``--outputs`` distinct held-out outputs and each ``schedule_search`` budget, two
schedules run through the runtime (``bench._sweep_setup.schedule_psnrs``), each with its own forecast: the one the
per-output search found for that output (the bound's), and the file's ``searched_schedule`` row with as many
computed steps (one schedule for every output). Each runs on the output itself and on nudged copies of it: the
same prompt and seed, with the pipeline's initial noise ``z`` replaced by ``sqrt(1 - eps^2) z + eps z'``, where
``z'`` is ``z`` shifted by one element (independent of ``z`` element by element; the mix is again unit Gaussian
noise). PSNR is against full compute of the same nudged output.

Per budget and ``eps``: the mean lead of the output's own schedule over the shared row (dB), and its standard
error over the outputs. A lead that holds under a small nudge belongs to the content of the output, which a rule
could in principle follow; a lead that vanishes under a nudge that leaves the output nearly unchanged was the search
fitting that one realization, and no rule that does not know the final error can reach it.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._sweep_setup import (  # noqa: E402
    held_out_parser, held_out_setup, paired_difference, schedule_psnrs, searched_schedules,
)


@contextlib.contextmanager
def nudged_noise(pipe, eps: float):
    """Within it, ``pipe``'s initial noise ``z`` becomes ``sqrt(1 - eps^2) z + eps roll(z)`` (``eps`` 0: unchanged)."""
    import torch

    original = pipe.prepare_latents

    def prepare(*args, **kwargs):
        out = original(*args, **kwargs)
        latents = out[0] if isinstance(out, tuple) else out
        flat = latents.flatten()
        mixed = (math.sqrt(1.0 - eps * eps) * flat + eps * torch.roll(flat, 1)).view_as(latents)
        return (mixed, *out[1:]) if isinstance(out, tuple) else mixed

    pipe.prepare_latents = prepare
    try:
        yield
    finally:
        del pipe.prepare_latents


def output_distance(setup, pairs, eps: float) -> float:
    """Mean PSNR (dB) of the nudged outputs' full compute against the outputs' own (how far the nudge moves them)."""
    from calibrate.metrics import psnr_of_mse
    from calibrate.models import output_array

    def outputs():
        return [output_array(setup.model.generate(p, s, setup.recipe, output_type="np")).astype(np.float64) for p, s in pairs]

    base = outputs()
    with nudged_noise(setup.model.pipe, eps):
        moved = outputs()
    return float(np.mean([psnr_of_mse(float(np.mean((a - b) ** 2))) for a, b in zip(base, moved)]))


def main() -> None:
    parser = held_out_parser(__doc__)
    parser.add_argument("--eps", type=float, nargs="+", default=[0.02, 0.1, 0.3], help="nudge sizes (0 < eps < 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    if not all(0.0 < e < 1.0 for e in args.eps):
        parser.error(f"--eps {args.eps}: each nudge must lie strictly between 0 and 1.")
    setup = held_out_setup(args.model)
    search = setup.sweep.get("schedule_search")
    if not search:
        parser.error(f"sweep/{args.model}/sweep.json has no schedule_search; run the sweep with it (the README's sweep command).")
    rows = searched_schedules(ROOT / "coefficients" / f"{args.model}.json")
    if rows is None:
        parser.error(f"coefficients/{args.model}.json has no searched_schedule rule; fit it with `python -m calibrate.fit search=8`.")
    shared = {len(steps): (steps, f) for steps, f in rows}
    found, seen = [], set()
    for entry in search["per_output"]:
        key = tuple((tuple(b["steps"]), b["forecast"]) for b in entry["budgets"])
        if key not in seen:  # another phrasing of an output already taken
            seen.add(key)
            found.append(entry)
    found = found[: args.outputs]
    pairs = [(o["prompt"], o["seed"]) for o in found]
    budgets = [b["budget"] for b in found[0]["budgets"] if b["computed_steps"] in shared]
    print(f"{args.model}: {len(found)} outputs, per budget the per-output search's schedule for each output and the "
          f"file's row, on the output and on nudged copies; mean lead of the own schedule (dB, +- standard error)")
    result = {"model": args.model, "outputs": len(found), "eps": [0.0, *args.eps], "budgets": []}
    for eps in args.eps:
        result.setdefault("nudged_output_psnr", {})[str(eps)] = round(output_distance(setup, pairs, eps), 2)
    for budget in budgets:
        k = next(b["computed_steps"] for b in found[0]["budgets"] if b["budget"] == budget)
        own = [next((frozenset(b["steps"]), b["forecast"]) for b in o["budgets"] if b["budget"] == budget) for o in found]
        line = {"budget": budget, "computed_steps": k, "by_eps": []}
        for eps in [0.0, *args.eps]:
            with nudged_noise(setup.model.pipe, eps) if eps else contextlib.nullcontext():
                psnr = np.vstack([schedule_psnrs(setup, [pair], [mine, shared[k]]) for pair, mine in zip(pairs, own)])
            mine, theirs = psnr[:, 0], psnr[:, 1]
            lead, se = paired_difference(mine, theirs)
            line["by_eps"].append({"eps": eps, "own": round(float(mine.mean()), 2), "shared": round(float(theirs.mean()), 2),
                                   "lead": round(lead, 2), "se": round(se, 2)})
        result["budgets"].append(line)
        cells = "  ".join(f"eps {e['eps']}: {e['own']:.2f} vs {e['shared']:.2f}, lead {e['lead']:+.2f} +- {e['se']:.2f}"
                          for e in line["by_eps"])
        print(f"  budget {budget} ({k} steps)  {cells}")
    print("  the nudged outputs' full compute against the outputs' own, mean PSNR (dB): "
          + ", ".join(f"eps {e}: {p}" for e, p in result["nudged_output_psnr"].items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
