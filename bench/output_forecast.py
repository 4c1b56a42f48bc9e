"""A prototype, not in the runtime: forecasting a skipped step's whole transformer output, and correcting the
latent once the next computed step shows where the trajectory went (the correction: Euler samplers only).

    python bench/output_forecast.py [--model reference] [--outputs 10] [--json PATH]

The runtime's forecasts act on the block stack's residual (``reuse``, ``linear``). This bench hooks the
transformer itself (a diffusers ``ModelHook``) and, at a skipped call, returns without running anything:

- ``output_linear``: the line through the branch's last two computed *outputs* (the velocity), at this step;
- ``output_corrected``: the same, and at the next computed step k, after a run of skipped steps a+1..k-1
  since the computed step a, the skipped steps' outputs are re-estimated on the line from v_a to v_k
  (interpolation, now that v_k is known) and the latent is moved by what that changes,
  ``sum_j (sigma_{j+1} - sigma_j) (v~_j - v_j)``, added to step k's output divided by
  ``sigma_{k+1} - sigma_k`` (exact for an Euler step of each branch; CFG's combination and the pipeline's
  norm rescale make it approximate). Only with ``FlowMatchEulerDiscreteScheduler`` (the digits model); with
  another sampler (the video model's UniPC, whose multistep update reuses past outputs) only ``output_linear``
  runs.

Both run the file's ``searched_schedule`` rows (searched for the residual forecasts) and the sweep's
per-output schedules (the bound's), on the sweep's first ``--outputs`` held-out outputs, beside the rows run
by the runtime as the file says. Mean PSNR (dB) against full compute, each output capped at 100.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from diffusers.hooks import HookRegistry, ModelHook

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._sweep_setup import held_out_parser, held_out_setup, schedule_psnrs, searched_schedules  # noqa: E402

HOOK = "output_forecast_prototype"


class OutputForecast(ModelHook):
    """Compute the transformer at the schedule's steps; at the others return the forecast output."""

    def __init__(self, sigmas, branches: int, corrected: bool) -> None:
        super().__init__()
        self.sigmas, self.branches, self.corrected = sigmas, branches, corrected
        self.start(frozenset())

    def start(self, schedule: frozenset) -> None:
        self.schedule, self.call = schedule, 0
        self.computed = [[] for _ in range(self.branches)]  # per branch: (step, output as computed)
        self.used = [{} for _ in range(self.branches)]  # per branch: step -> the output a skipped call returned

    def new_forward(self, module, *args, **kwargs):
        step, branch = divmod(self.call, self.branches)
        self.call += 1
        computed, sigma = self.computed[branch], self.sigmas()
        if step in self.schedule or not computed:
            out = self.fn_ref.original_forward(*args, **kwargs)
            v = out[0] if isinstance(out, (tuple, list)) else out.sample
            previous = computed[-1] if computed else None
            computed.append((step, v.clone()))
            if self.corrected and previous is not None and previous[0] < step - 1:
                a, v_a = previous
                shift = sum((sigma[j + 1] - sigma[j]) * (v_a + (v - v_a) * (j - a) / (step - a) - self.used[branch][j])
                            for j in range(a + 1, step))
                v = v + shift / (sigma[step + 1] - sigma[step])
            return (v,) if isinstance(out, (tuple, list)) else type(out)(sample=v)
        if len(computed) >= 2:
            (b, v_b), (a, v_a) = computed[-2:]
            v = v_a + (v_a - v_b) * (step - a) / (a - b)
        else:
            v = computed[-1][1]
        self.used[branch][step] = v
        return (v,)


def main() -> None:
    from calibrate.metrics import psnr_of_mse
    from calibrate.models import output_array

    parser = held_out_parser(__doc__, outputs=10)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    setup = held_out_setup(args.model)
    pipe, work = setup.model.pipe, setup.outputs(args.outputs)
    # the correction is derived for an Euler step; other samplers (Wan's UniPC) get output_linear alone
    variants = (False, True) if type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" else (False,)
    branches = 2 if setup.recipe.guidance and setup.recipe.guidance > 1 else 1
    rows = searched_schedules(ROOT / "coefficients" / f"{args.model}.json")
    if rows is None:
        parser.error(f"coefficients/{args.model}.json has no searched_schedule rule; fit it with `python -m calibrate.fit search=8`.")
    per_output = {(p["prompt"], p["seed"]): p["budgets"] for p in setup.sweep["schedule_search"]["per_output"]}

    def psnr(image: np.ndarray, full: np.ndarray) -> float:
        return psnr_of_mse(float(np.mean((image - full) ** 2)))

    def generate(prompt: str, seed: int) -> np.ndarray:
        return output_array(setup.model.generate(prompt, seed, setup.recipe, output_type="np")).astype(np.float64)

    fulls = [generate(p, s) for p, s in work]
    runtime = {len(steps): float(p) for (steps, _), p in zip(rows, schedule_psnrs(setup, work, rows).mean(axis=0))}
    registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
    results = {"rows": [], "per_output": []}
    try:
        for corrected in variants:
            hook = OutputForecast(lambda: pipe.scheduler.sigmas, branches, corrected)
            registry.register_hook(hook, HOOK)
            name = "output_corrected" if corrected else "output_linear"

            def run(steps: frozenset, prompt: str, seed: int, full: np.ndarray) -> float:
                hook.start(steps)
                image = generate(prompt, seed)
                if hook.call != branches * setup.recipe.num_inference_steps:
                    raise RuntimeError(f"expected {branches} transformer calls per step, saw {hook.call} in all")
                return psnr(image, full)

            for i, (steps, _) in enumerate(rows):
                value = float(np.mean([run(steps, p, s, full) for (p, s), full in zip(work, fulls)]))
                if corrected:
                    results["rows"][i][name] = round(value, 2)
                else:
                    results["rows"].append({"computed_steps": len(steps), "runtime_forecast": rows[i][1],
                                            "runtime": round(runtime[len(steps)], 2), name: round(value, 2)})
            for b, budget in enumerate(per_output[work[0]]):
                own = [run(frozenset(per_output[(p, s)][b]["steps"]), p, s, full) for (p, s), full in zip(work, fulls)]
                bound = float(np.mean([per_output[(p, s)][b]["psnr"] for p, s in work]))
                if corrected:
                    results["per_output"][b][name] = round(float(np.mean(own)), 2)
                else:
                    results["per_output"].append({"budget": budget["budget"], "computed_steps": budget["computed_steps"],
                                                  "bound": round(bound, 2), name: round(float(np.mean(own)), 2)})
            registry.remove_hook(HOOK, recurse=False)
    finally:
        if registry.get_hook(HOOK) is not None:
            registry.remove_hook(HOOK, recurse=False)
    print(f"{args.model}, {len(work)} held-out outputs, mean PSNR (dB) against full compute")
    def corrected_column(r: dict) -> str:
        return f"{r['output_corrected']:>16.2f}" if "output_corrected" in r else f"{'(not Euler)':>16}"

    print("  the file's searched_schedule rows:   steps  runtime (its forecast)  output_linear  output_corrected")
    for r in results["rows"]:
        print(f"  {r['computed_steps']:>40}  {r['runtime']:>8.2f} ({r['runtime_forecast']:<6})  {r['output_linear']:>13.2f}"
              f"  {corrected_column(r)}")
    print("  the per-output search's schedules:   steps  bound (as searched)      output_linear  output_corrected")
    for r in results["per_output"]:
        print(f"  {r['computed_steps']:>40}  {r['bound']:>8.2f}{'':>10}  {r['output_linear']:>13.2f}  {corrected_column(r)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "outputs": len(work), **results}, indent=1))


if __name__ == "__main__":
    main()
