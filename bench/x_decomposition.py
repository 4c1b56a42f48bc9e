"""What x is made of: the content's change against the timestep modulation's change, per step.

    python bench/x_decomposition.py [--models reference reference_video] [--prompts 20] [--seeds 0 1 2]
                                    [--json bench/results/x_decomposition.json]

x is the rel-L1 change of the first block's modulated input m = norm(h) * (1 + scale) + shift between
consecutive calls of a branch (h: the block's input tokens; scale and shift: the timestep's modulation).
Its change has two sources: the tokens (the content) and the modulation (the step, the same for every
output). This splits them on full-compute runs of each reference model (its own recipe; prompts of its
calibration set x seeds), for the cond branch:

- ``x``: the signal itself, as the runtime measures it (recomputed here from the captured inputs);
- ``x_content``: rel-L1 of ``norm(h_t) * (1 + scale_t) + shift_t`` against ``norm(h_{t-1}) * (1 + scale_t) + shift_t``
  (the modulation held at step t: only the tokens change);
- ``x_modulation``: rel-L1 of ``norm(h_{t-1}) * (1 + scale_t) + shift_t`` against ``m_{t-1}`` (the tokens held:
  only the modulation changes);
- ``x_normed``: rel-L1 of the normalized tokens ``norm(h)`` (no modulation at all: a signal one tensor per call
  could carry);
- ``x_tokens``: rel-L1 of the block's input tokens h themselves (before the norm).

For each, the mean over runs and the coefficient of variation across runs per step, both as the median over
steps (first and last excluded), as bench/content_dependence.py reports x.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KEYS = ("x", "x_content", "x_modulation", "x_normed", "x_tokens")


def _rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean() / b.abs().mean())


def _parts(block: torch.nn.Module, kwargs: dict) -> tuple[torch.Tensor, object]:
    """(normed tokens, modulation) of the first block's call; :func:`_modulate` combines them."""
    if hasattr(block, "scale_shift_table"):  # Wan
        temb = kwargs["temb"]
        shift, scale = (block.scale_shift_table + temb.float()).chunk(6, dim=1)[:2]
        return block.norm1(kwargs["hidden_states"].float()), (shift, scale)
    mod = block.img_mod(kwargs["temb"]).chunk(2, dim=-1)[0]  # QwenImage
    return block.img_norm1(kwargs["hidden_states"]), (mod, kwargs.get("modulate_index"), block)


def _modulate(normed: torch.Tensor, modulation: object) -> torch.Tensor:
    if len(modulation) == 2:
        shift, scale = modulation
        return normed * (1 + scale) + shift
    mod, index, block = modulation
    return block._modulate(normed, mod, index)[0]


def decompose(model_name: str, prompts: int, seeds: list[int]) -> dict[str, object]:
    from hydra import compose, initialize_config_dir

    from calibrate.models import load_model
    from calibrate.recipe import Recipe
    from calibrate.record import prompt_texts
    from runtime.adapters import adapter_for

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("record", [f"model={model_name}", "device=cpu"])
    model = load_model(cfg.model, "cpu", torch.float32)
    recipe = Recipe.from_config(cfg)
    block = adapter_for(model.transformer).blocks(model.transformer)[0][1]
    calls: list[dict] = []
    signature = inspect.signature(block.forward)

    def capture(module, args, kwargs):
        named = signature.bind(*args, **kwargs).arguments
        calls.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in named.items()})

    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    series: dict[str, list[list[float]]] = {k: [] for k in KEYS}
    try:
        with torch.no_grad():
            for prompt in prompt_texts(cfg)[:prompts]:
                for seed in seeds:
                    calls.clear()
                    model.generate(prompt, seed, recipe)
                    cond = calls[0::2]  # the pipelines call cond, then uncond, at every step
                    parts = [_parts(block, c) for c in cond]
                    rows = {k: [float("nan")] for k in series}
                    for t in range(1, len(parts)):
                        (n0, m0), (n1, m1) = parts[t - 1], parts[t]
                        before, now = _modulate(n0, m0), _modulate(n1, m1)
                        held_tokens = _modulate(n0, m1)
                        rows["x"].append(_rel_l1(now, before))
                        rows["x_content"].append(_rel_l1(now, held_tokens))
                        rows["x_modulation"].append(_rel_l1(held_tokens, before))
                        rows["x_normed"].append(_rel_l1(n1, n0))
                        rows["x_tokens"].append(_rel_l1(cond[t]["hidden_states"], cond[t - 1]["hidden_states"]))
                    for k in series:
                        series[k].append(rows[k])
    finally:
        handle.remove()
    out: dict[str, object] = {"runs": len(series["x"]), "steps": len(series["x"][0]), "prompts": prompts, "seeds": seeds}
    for k, rows in series.items():
        inner = np.asarray(rows, dtype=np.float64)[:, 1:-1]
        out[k] = {"mean": round(float(np.median(inner.mean(axis=0))), 5),
                  "cv": round(float(np.median(inner.std(axis=0) / inner.mean(axis=0))), 4)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["reference", "reference_video"])
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    results = {m: decompose(m, args.prompts, args.seeds) for m in args.models}
    print(f"{'model':<18}{'runs':>6}" + "".join(f"{k + ' mean':>18}{k + ' cv':>16}" for k in KEYS))
    for name, r in results.items():
        print(f"{name:<18}{r['runs']:>6}" + "".join(f"{r[k]['mean']:>18.4f}{r[k]['cv']:>16.4f}" for k in KEYS))
    print("cond branch; median over steps (first and last excluded) of the mean over runs and of the CV across runs")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
