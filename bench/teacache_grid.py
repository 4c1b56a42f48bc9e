"""A picture of what TeaCache does to the reference model: full compute beside TeaCache at a few speedups.

    python bench/teacache_grid.py [--coefficients coefficients/reference.json] [--out reference/teacache_grid.png]

Rows: the digits 0-9 on held-out prompts and a seed the fit never saw. Columns: full compute, then
TeaCache at the thresholds the coefficients' table gives for 1.5x, 2x and 3x fewer steps; each column
title gives the threshold and the computed fraction measured in that run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reference.pipeline import REFERENCE_RECIPE, load_reference_pipeline, reference_prompt_kwargs  # noqa: E402
from runtime import TeaCache  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coefficients", default=str(ROOT / "coefficients" / "reference.json"))
    parser.add_argument("--out", type=Path, default=ROOT / "reference" / "teacache_grid.png")
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args()

    pipe, encoder = load_reference_pipeline()
    recipe = {k: v for k, v in REFERENCE_RECIPE.items() if k != "negative_prompt"}
    prompts = [f"an image of the digit {d}" for d in range(10)]

    def generate() -> np.ndarray:
        return pipe(
            **reference_prompt_kwargs(encoder, prompts, REFERENCE_RECIPE["negative_prompt"]),
            **recipe,
            generator=torch.Generator().manual_seed(args.seed),
            output_type="np",
        ).images

    columns = [("full compute", generate())]
    for speedup in (1.5, 2.0, 3.0):
        # the upstream rule, whichever rule is the file's default (the reference file's is searched_schedule)
        with TeaCache.from_coefficients(args.coefficients, rule="teacache", speedup=speedup).apply(pipe) as cache:
            images = generate()
        stats = cache.stats.values()
        fraction = sum(s.computed for s in stats) / sum(s.calls for s in stats)
        columns.append((f"TeaCache {cache.rel_l1_thresh:g}\n{fraction:.0%} computed", images))

    fig, axes = plt.subplots(10, len(columns), figsize=(1.3 * len(columns), 12.5), constrained_layout=True)
    for col, (title, images) in enumerate(columns):
        axes[0, col].set_title(title, fontsize=8)
        for row in range(10):
            axes[row, col].imshow(images[row])
            axes[row, col].set_axis_off()
    fig.savefig(args.out, dpi=100)
    print(args.out)


if __name__ == "__main__":
    main()
