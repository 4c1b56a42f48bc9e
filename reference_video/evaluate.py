"""Prompt adherence of the video reference model, by the procedural checker; writes samples.png / samples.gif.

``python -m reference_video.evaluate [--seeds 1000 1001] [--weights DIR] [--device cuda] [--no-figures]`` prints and writes to
``reference_video/eval.json``:

- the checker's accuracy on real clips (rendered by ``reference_video.data``; training and held-out pairs);
- the share of generated clips (full compute, the model's recipe) that pass on the held-out prompts
  (``conf/prompts/shapes_heldout.yaml``, every seed) and on the recorded prompts (``conf/prompts/shapes.yaml``,
  the first seed);
- the shuffled-prompt control: the same generated held-out clips scored against another prompt of the set.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from reference_video.checker import accuracy, check_clip
from reference_video.data import batches, scene_prompt
from reference_video.pipeline import RECIPE, load_video_pipeline, pipeline_recipe, video_prompt_kwargs

PACKAGE_DIR = Path(__file__).resolve().parent


def prompt_set(name: str) -> list[str]:
    """The texts of ``conf/prompts/<name>.yaml`` (the checkout's conf/, or the installed wheel's copy)."""
    from omegaconf import OmegaConf

    from calibrate.cli import CONF_DIR

    return list(OmegaConf.load(Path(CONF_DIR) / "prompts" / f"{name}.yaml").texts)


@torch.no_grad()
def generate(pipe, encoder, prompts: list[str], seed: int, batch: int = 20, **overrides) -> np.ndarray:
    """Clips [N, T, H, W, 3] in [0, 1], full compute; batch b of the prompts uses seed ``seed + b``."""
    recipe = {**pipeline_recipe(), **overrides}
    out = []
    for b, start in enumerate(range(0, len(prompts), batch)):
        chunk = prompts[start : start + batch]
        frames = pipe(**video_prompt_kwargs(encoder, chunk, RECIPE["negative_prompt"]), **recipe,
                      generator=torch.Generator().manual_seed(seed * 1000 + b), output_type="np").frames
        out.append(np.asarray(frames))
    return np.concatenate(out)


def attribute_rates(clips: np.ndarray, prompts: list[str]) -> dict[str, float]:
    """Per named object: share present (colour found), with the right shape, with the right motion; and whole clips."""
    objects = [o for c, p in zip(clips, prompts) for o in check_clip(c, p).objects]
    return {
        "clips_passing": accuracy(clips, prompts),
        "objects_present": float(np.mean([o.present for o in objects])),
        "objects_right_shape": float(np.mean([o.shape == o.spec.shape for o in objects])),
        "objects_right_motion": float(np.mean([o.motion == o.spec.motion for o in objects])),
    }


def shuffled(prompts: list[str], seed: int = 0) -> list[str]:
    """A derangement of the prompts (each clip gets another clip's prompt)."""
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(len(prompts))
        if all(prompts[i] != prompts[j] for i, j in enumerate(perm)):
            return [prompts[j] for j in perm]


def write_figures(clips: np.ndarray, prompts: list[str], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    n, t = clips.shape[:2]
    cols = list(range(0, t, 2))
    fig, axes = plt.subplots(n, len(cols), figsize=(1.3 * len(cols) + 3.6, 1.3 * n))
    for i in range(n):
        for j, f in enumerate(cols):
            ax = axes[i, j]
            ax.imshow(clips[i, f], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"frame {f}", fontsize=8)
        passed = "pass" if check_clip(clips[i], prompts[i]).passed else "FAIL"
        text = prompts[i].replace(" and ", " and\n")
        axes[i, -1].text(1.08, 0.5, f"{text}\n[checker: {passed}]",
                         transform=axes[i, -1].transAxes, fontsize=7, va="center")
    fig.suptitle("reference_video: held-out prompts, full compute (frames 0, 2, ..., 8)", fontsize=9)
    fig.tight_layout()
    fig.savefig(folder / "samples.png", dpi=90)
    plt.close(fig)
    scale, pad = 4, 4
    side = clips.shape[2] * scale
    frames = []
    for f in range(t):
        canvas = np.full((side, n * (side + pad) - pad, 3), 255, dtype=np.uint8)
        for i in range(n):
            tile = (clips[i, f] * 255).round().astype(np.uint8).repeat(scale, 0).repeat(scale, 1)
            canvas[:, i * (side + pad) : i * (side + pad) + side] = tile
        frames.append(Image.fromarray(canvas))
    frames[0].save(folder / "samples.gif", save_all=True, append_images=frames[1:], duration=150, loop=0)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1000, 1001])
    parser.add_argument("--real", type=int, default=500, help="real clips per split for the checker's sanity check")
    parser.add_argument("--no-figures", action="store_true")
    parser.add_argument("--figures", type=Path, default=PACKAGE_DIR, help="folder for samples.png and samples.gif")
    parser.add_argument("--device", default="cpu", help='"cpu" (default) or "cuda"')
    parser.add_argument("--out", type=Path, default=PACKAGE_DIR / "eval.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result: dict = {}
    pipe, encoder = load_video_pipeline(args.weights, args.device)
    for name, held in (("real_training_pairs", False), ("real_heldout_pairs", True)):
        clips, scenes = next(batches(777 + held, args.real, heldout=held))
        prompts = [scene_prompt(s) for s in scenes]
        result[name] = accuracy(clips, prompts)
        result[name + "_shuffled"] = accuracy(clips, shuffled(prompts))
        if held:  # the same clips through the VAE (encode, decode): what the decoder lets the checker see
            with torch.no_grad():
                x = torch.from_numpy(clips[:200]).permute(0, 4, 1, 2, 3) * 2 - 1
                rec = torch.cat([pipe.vae.decode(pipe.vae.encode(c.to(args.device)).latent_dist.mode()).sample.cpu()
                                 for c in x.split(50)])
            rec = ((rec.permute(0, 2, 3, 4, 1) + 1) / 2).clamp(0, 1).numpy()
            result["vae_reconstruction_heldout_pairs"] = attribute_rates(rec, prompts[:200])
    heldout, train = prompt_set("shapes_heldout"), prompt_set("shapes")
    t0 = time.perf_counter()
    gen_h = np.concatenate([generate(pipe, encoder, heldout, s) for s in args.seeds])
    seconds = time.perf_counter() - t0
    p_h = heldout * len(args.seeds)
    gen_t = generate(pipe, encoder, train, args.seeds[0])
    p_t = list(train)
    result.update({
        "seeds": args.seeds,
        "generated_heldout": attribute_rates(gen_h, p_h),
        "generated_heldout_n": len(p_h),
        "generated_heldout_shuffled": attribute_rates(gen_h, shuffled(p_h)),
        "generated_recorded_prompts": attribute_rates(gen_t, p_t),
        "generated_recorded_prompts_n": len(p_t),
        "seconds_per_clip": seconds / len(p_h),
    })
    for k, v in result.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    args.out.write_text(json.dumps(result, indent=1))
    if not args.no_figures:
        pick = [0, 1, 2, 5, 9, 14, 20, 27]
        write_figures(gen_h[pick], [p_h[i] for i in pick], args.figures)
    return result


if __name__ == "__main__":
    main()
