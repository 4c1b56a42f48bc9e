"""What recording costs: the same pipeline calls with and without the trace recorder, side by side.

    python bench/recording_overhead.py [--model tiny_qwen_image] [--runs 8] [--repeats 5] [--device cpu]

Calls alternate between plain and recorded so that machine noise hits both alike; the figure is the
ratio of medians (target on GPU: at most 1.03). Recorded calls include the single device-to-host
read of the run's values.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from calibrate.models import load_model, resolve_device, resolve_dtype  # noqa: E402
from calibrate.recipe import Recipe  # noqa: E402
from calibrate.record import prompt_texts  # noqa: E402
from calibrate.recorder import TraceRecorder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny_qwen_image")
    parser.add_argument("--runs", type=int, default=8, help="pipeline calls per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("record", [f"model={args.model}"])
    device = resolve_device(args.device)
    model = load_model(cfg.model, device, resolve_dtype(cfg.dtype))
    recipe = Recipe.from_config(cfg)
    prompts = prompt_texts(cfg)[: args.runs]

    def plain() -> None:
        for i, prompt in enumerate(prompts):
            model.generate(prompt, i, recipe)

    def recorded() -> None:
        with TraceRecorder(model.transformer) as rec:
            for i, prompt in enumerate(prompts):
                rec.run(lambda: model.generate(prompt, i, recipe))

    def timed(fn) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    plain(), recorded()  # warm-up
    times = {"plain": [], "recorded": []}
    for _ in range(args.repeats):
        times["plain"].append(timed(plain))
        times["recorded"].append(timed(recorded))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model            {args.model} on {device}, {args.runs} pipeline calls x {args.repeats} repeats")
    print(f"plain            {med['plain'] / args.runs * 1e3:.1f} ms per call (median)")
    print(f"recorded         {med['recorded'] / args.runs * 1e3:.1f} ms per call (median)")
    print(f"ratio            {med['recorded'] / med['plain']:.4f}")


if __name__ == "__main__":
    main()
