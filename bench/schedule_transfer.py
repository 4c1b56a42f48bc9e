"""Does a schedule the per-output search found for one output serve another output, or the same prompt at
another seed? What decides how far a shared (or prompt-chosen) schedule can come to the per-output bound.

    python bench/schedule_transfer.py --model reference [--budget 0.5] [--outputs 10] [--prompts 4]
                                      [--seeds 1001 1002 1003] [--json PATH]

Reads ``sweep/<model>/sweep.json`` (run with ``schedule_search``) and takes the per-output search's schedules
at ``--budget`` for the first ``--outputs`` distinct held-out outputs (outputs whose phrasings give the same
generation count once). Each schedule runs with the forecast it was found with, through the runtime
(``bench._sweep_setup.schedule_psnrs``); PSNR against full compute, capped at 100 dB.

1. Across outputs: every output under every one of these schedules. Its own schedule (the bound), the mean
   over the others', the best single schedule for all, and the file's ``searched_schedule`` row with as many
   steps (searched on training pairs), each as a mean over the outputs.
2. Across seeds: the first ``--prompts`` of those outputs' prompts at the other ``--seeds``, under the same
   schedules: whether the schedule found for the prompt at the sweep's seed still wins there, and how far the
   best and worst of the schedules lie apart for one prompt and seed.
3. A choice a runtime could make after step 0: for each of those generations, the schedule (of another prompt)
   whose output's first transformer call is nearest in direction to the generation's own first call, against
   any other prompt's schedule and the prompt's own.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._sweep_setup import held_out_parser, held_out_setup, schedule_psnrs, searched_schedules  # noqa: E402


def first_outputs(setup, pairs: list[tuple[str, int]]) -> np.ndarray:
    """Per (prompt, seed), the transformer's first output of a full-compute generation (step 0, the first CFG
    branch), flattened and scaled to unit length."""
    from runtime.forecasts import sample_of

    captured: list = []

    def keep(module, args, kwargs, out) -> None:
        if not captured:
            captured.append(sample_of(out).detach().flatten().double())

    handle = setup.model.transformer.register_forward_hook(keep, with_kwargs=True)
    rows = []
    try:
        for prompt, seed in pairs:
            captured.clear()
            setup.model.generate(prompt, seed, setup.recipe, output_type="np")
            rows.append((captured[0] / captured[0].norm()).numpy())
    finally:
        handle.remove()
    return np.stack(rows)


def main() -> None:
    parser = held_out_parser(__doc__, outputs=10)
    parser.add_argument("--budget", type=float, default=0.5, help="one of the sweep's schedule_search budgets")
    parser.add_argument("--prompts", type=int, default=4, help="prompts also run at --seeds")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1001, 1002, 1003])
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    setup = held_out_setup(args.model)
    budgets = setup.sweep["schedule_search"]["settings"]["budgets"]
    if args.budget not in budgets:
        parser.error(f"--budget {args.budget} is not among the sweep's schedule_search budgets {budgets}; pass one of them.")
    found, seen = [], set()
    for entry in setup.sweep["schedule_search"]["per_output"]:
        row = next(b for b in entry["budgets"] if b["budget"] == args.budget)
        key = (tuple(row["steps"]), row["forecast"], row["psnr"])
        if key not in seen:  # another phrasing of an output already taken
            seen.add(key)
            found.append({"prompt": entry["prompt"], "seed": entry["seed"], "steps": frozenset(row["steps"]),
                          "forecast": row["forecast"], "psnr": row["psnr"]})
    found = found[: args.outputs]
    if len(found) < 2:
        parser.error(f"the sweep has {len(found)} distinct outputs at budget {args.budget}; at least 2 are needed.")
    k = len(found[0]["steps"])
    file_rows = [(steps, f) for steps, f in searched_schedules(ROOT / "coefficients" / f"{args.model}.json") or []
                 if len(steps) == k]

    schedules = [(o["steps"], o["forecast"]) for o in found]
    outputs = [(o["prompt"], o["seed"]) for o in found]
    across = schedule_psnrs(setup, outputs, schedules + file_rows)
    m, n = across[:, : len(found)], len(found)
    others = (m.sum(1) - np.diag(m)) / (n - 1)
    part1 = {
        "own_schedule": round(float(np.mean(np.diag(m))), 2),
        "own_schedule_recorded": round(float(np.mean([o["psnr"] for o in found])), 2),
        "other_outputs_schedules": round(float(np.mean(others)), 2),
        "best_single_schedule": round(float(m.mean(0).max()), 2),
        "searched_schedule_row": round(float(across[:, n].mean()), 2) if file_rows else None,
        "per_output": [{"prompt": o["prompt"], "seed": o["seed"], "own": round(float(m[i, i]), 2),
                        "others_mean": round(float(others[i]), 2), "others_min": round(float(np.delete(m[i], i).min()), 2),
                        "others_max": round(float(np.delete(m[i], i).max()), 2)} for i, o in enumerate(found)],
    }
    pairs = [(o["prompt"], s) for o in found[: args.prompts] for s in args.seeds]
    seeds = schedule_psnrs(setup, pairs, schedules)
    part2 = []
    for (prompt, seed), row in zip(pairs, seeds):
        own = next(j for j, o in enumerate(found) if o["prompt"] == prompt)
        part2.append({"prompt": prompt, "seed": seed, "own_prompt_schedule": round(float(row[own]), 2),
                      "rank_of_own_prompt_schedule": int((row > row[own]).sum()) + 1,
                      "best": round(float(row.max()), 2), "worst": round(float(row.min()), 2)})

    # 3. a choice the runtime could make: among the other prompts' schedules, the one whose output's first
    # transformer call (step 0, cond branch) is nearest (cosine) to this generation's first call
    first = first_outputs(setup, outputs + pairs)
    every = np.vstack([m, seeds])
    prompts = [p for p, _ in outputs + pairs]
    chosen, candidates, own_prompt = [], [], []
    for i, prompt in enumerate(prompts):
        others = [j for j, o in enumerate(found) if o["prompt"] != prompt]
        nearest = max(others, key=lambda j: float(first[i] @ first[j]))
        chosen.append(every[i, nearest])
        candidates.append(every[i, others].mean())
        own_prompt.append(every[i, next(j for j, o in enumerate(found) if o["prompt"] == prompt)])
    part3 = {"generations": len(prompts), "nearest_first_output": round(float(np.mean(chosen)), 2),
             "another_prompts_schedule": round(float(np.mean(candidates)), 2),
             "own_prompts_schedule": round(float(np.mean(own_prompt)), 2)}

    print(f"{args.model}, budget {args.budget} ({k} of {setup.recipe.num_inference_steps} steps), {n} outputs, "
          f"schedules of the per-output search; mean PSNR (dB) against full compute")
    print(f"  1. across outputs: own schedule {part1['own_schedule']:.2f} (the sweep recorded "
          f"{part1['own_schedule_recorded']:.2f}); another output's {part1['other_outputs_schedules']:.2f}; best single "
          f"schedule {part1['best_single_schedule']:.2f}"
          + (f"; searched_schedule row {part1['searched_schedule_row']:.2f}" if file_rows else ""))
    for r in part1["per_output"]:
        print(f"     {r['prompt'][:44]:<44} seed {r['seed']}: own {r['own']:6.2f}, others {r['others_min']:6.2f} .. "
              f"{r['others_max']:6.2f} (mean {r['others_mean']:6.2f})")
    print(f"  2. the same prompts at other seeds, under the {n} schedules:")
    for r in part2:
        print(f"     {r['prompt'][:44]:<44} seed {r['seed']}: its prompt's schedule {r['own_prompt_schedule']:6.2f} "
              f"(rank {r['rank_of_own_prompt_schedule']} of {n}); best {r['best']:6.2f}, worst {r['worst']:6.2f}")
    print(f"  3. over these {part3['generations']} generations, a schedule of another prompt chosen by the nearest first "
          f"transformer output: {part3['nearest_first_output']:.2f}; any other prompt's: {part3['another_prompts_schedule']:.2f}; "
          f"the prompt's own: {part3['own_prompts_schedule']:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "budget": args.budget, "computed_steps": k, "outputs": n,
                                         "across_outputs": part1, "across_seeds": part2, "nearest_first_output": part3},
                                        indent=1))


if __name__ == "__main__":
    main()
