"""What the TeaCache runtime costs, side by side in one run, on a QwenImageTransformer2DModel.

    python bench/runtime_overhead.py                       # CPU, small config (always)
    python bench/runtime_overhead.py --size full --device cuda --dtype bfloat16   # Qwen-Image size, 1024x1024

Measured, each as the median of interleaved repeats (these machines are noisy):
- a full transformer call without any cache;
- a computed call with TeaCache applied (rel_l1_thresh 0: the decision runs, the stack runs);
- a skipped call with TeaCache applied, and diffusers' FirstBlockCache skipped call on the same model;
- the realized speedup of an N-step run with a forced schedule (a cap on consecutive skips) against
  the ideal N / N_computed.
On CUDA it also counts host synchronizations per call, without and with TeaCache (the model itself may
synchronize), and checks memory does not grow across steps.
Random weights: the cost of a call does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from diffusers import FirstBlockCacheConfig, QwenImageTransformer2DModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from runtime import Coefficients, DecisionDefaults, TeaCache  # noqa: E402
from runtime.intercept import intercept, release  # noqa: E402

SIZES = {
    # Qwen-Image: 60 layers, 24 heads x 128 = 3072 wide, text width 3584; 1024x1024 -> 64x64 tokens.
    "full": dict(layers=60, heads=24, head_dim=128, rope=(16, 56, 56), text_dim=3584, grid=64, text_tokens=256),
    "small": dict(layers=8, heads=4, head_dim=64, rope=(16, 24, 24), text_dim=256, grid=16, text_tokens=32),
}


def build(size: str, device: str, dtype: torch.dtype) -> tuple[QwenImageTransformer2DModel, dict]:
    s = SIZES[size]
    with torch.device(device):
        torch.manual_seed(0)
        model = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=64,
            out_channels=16,
            num_layers=s["layers"],
            attention_head_dim=s["head_dim"],
            num_attention_heads=s["heads"],
            joint_attention_dim=s["text_dim"],
            axes_dims_rope=s["rope"],
        )
        model = (model if dtype == torch.float32 else model.to(dtype)).eval()
        grid, tokens = s["grid"], s["text_tokens"]
        inputs = dict(
            hidden_states=torch.randn(1, grid * grid, 64, dtype=dtype),
            encoder_hidden_states=torch.randn(1, tokens, s["text_dim"], dtype=dtype),
            encoder_hidden_states_mask=torch.ones(1, tokens, dtype=torch.long),
            timestep=torch.full((1,), 0.5, dtype=dtype),
            img_shapes=[[(1, grid, grid)]],
            return_dict=False,
        )
    return model, inputs


def coefficients(max_consecutive_skips: int | None = None) -> Coefficients:
    """p(x) = 0: every call the schedule does not force is skipped, whatever the inputs."""
    return Coefficients(
        model="bench",
        transformer_class="QwenImageTransformer2DModel",
        signal="modulated_input",
        coefficients=(0.0,),
        x_range=None,
        defaults=DecisionDefaults(rel_l1_thresh=1.0, final_steps=1, max_consecutive_skips=max_consecutive_skips),
        provenance={"kind": "published", "source": "bench/runtime_overhead.py (a forced schedule)"},
    )


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_calls(model, inputs, device: str, calls: int) -> list[float]:
    """Seconds per call of ``calls`` consecutive calls in one "cond" context."""
    times = []
    with torch.no_grad(), model.cache_context("cond"):
        for _ in range(calls):
            sync(device)
            start = time.perf_counter()
            model(**inputs)
            sync(device)
            times.append(time.perf_counter() - start)
    return times


def measure_once(model, inputs, device: str, steps: int, cap: int) -> dict[str, float]:
    out: dict[str, float] = {}
    out["full"] = statistics.median(timed_calls(model, inputs, device, 3))

    with TeaCache.from_coefficients(coefficients(), rel_l1_thresh=0.0).apply(model, num_inference_steps=10**6):
        out["computed"] = statistics.median(timed_calls(model, inputs, device, 3))

    with TeaCache.from_coefficients(coefficients()).apply(model, num_inference_steps=10**6):
        out["skipped"] = statistics.median(timed_calls(model, inputs, device, 6)[1:])  # call 0 computes

    model.enable_cache(FirstBlockCacheConfig(threshold=0.05))
    try:
        out["fbc_skipped"] = statistics.median(timed_calls(model, inputs, device, 6)[1:])  # same input: skip
    finally:
        model.disable_cache()
        model._reset_stateful_cache()

    out["run_full"] = sum(timed_calls(model, inputs, device, steps))
    with TeaCache.from_coefficients(coefficients(cap)).apply(model, num_inference_steps=steps) as cache:
        out["run_cached"] = sum(timed_calls(model, inputs, device, steps))
        out["run_computed"] = cache.stats["cond"].computed
    return out


def head_hook_self_time(model, inputs, device: str, calls: int = 10) -> float:
    """Seconds per call spent in the head's interceptors themselves: block 0's whole call (signal read,
    decision, residual bookkeeping) minus the block's own ``_call_impl``.

    A decomposition inside one call, so it does not suffer the run-to-run drift of an A/B timing.
    """
    block, spent = model.transformer_blocks[0], {"inner": 0.0, "outer": 0.0, "start": 0.0}

    def outermost(module, call_next, args, kwargs):
        sync(device)
        start = time.perf_counter()
        out = call_next(*args, **kwargs)
        sync(device)
        spent["outer"] += time.perf_counter() - start
        return out

    def before(module, args):
        sync(device)
        spent["start"] = time.perf_counter()

    def after(module, args, output):
        sync(device)
        spent["inner"] += time.perf_counter() - spent["start"]

    with TeaCache.from_coefficients(coefficients(), rel_l1_thresh=0.0).apply(model, num_inference_steps=10**6):
        intercept(block, "bench_timer", outermost)  # registered last: runs outside the head's interceptors
        handles = [block.register_forward_pre_hook(before), block.register_forward_hook(after)]
        try:
            timed_calls(model, inputs, device, 1)
            spent["inner"] = spent["outer"] = 0.0
            timed_calls(model, inputs, device, calls)
        finally:
            release(block, "bench_timer")
            for handle in handles:
                handle.remove()
    return (spent["outer"] - spent["inner"]) / calls


def _syncs_per_call(model, inputs, steps: int) -> tuple[list[int], list[int]]:
    counts, memory = [], []
    with torch.no_grad(), model.cache_context("cond"):
        for _ in range(steps):
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model(**inputs)
            torch.cuda.set_sync_debug_mode("default")
            counts.append(sum("synchronizing" in str(w.message) for w in caught))
            torch.cuda.synchronize()
            memory.append(torch.cuda.memory_allocated())
    return counts, memory


def cuda_checks(model, inputs, steps: int, cap: int) -> dict[str, float]:
    """Host syncs per call (torch's sync debug mode) without and with TeaCache, and memory growth."""
    baseline, _ = _syncs_per_call(model, inputs, 3)  # the model's own (e.g. a mask-derived length)
    with TeaCache.from_coefficients(coefficients(cap)).apply(model, num_inference_steps=steps):
        counts, memory = _syncs_per_call(model, inputs, steps)
    return {
        "model_syncs_per_call": max(baseline),
        "max_syncs_per_call": max(counts),
        "syncs_added_by_teacache_per_call": max(counts) - max(baseline),
        "memory_growth_bytes_after_step_2": max(memory[2:]) - memory[2],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cap", type=int, default=2, help="max consecutive skips of the forced schedule")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    model, inputs = build(args.size, args.device, dtype)
    timed_calls(model, inputs, args.device, 2)  # warm-up
    runs = [measure_once(model, inputs, args.device, args.steps, args.cap) for _ in range(args.repeats)]
    med = {key: statistics.median(run[key] for run in runs) for key in runs[0]}

    ideal = args.steps / med["run_computed"]
    realized = med["run_full"] / med["run_cached"]
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "size": args.size,
        "dtype": args.dtype,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "full_call_ms": 1e3 * med["full"],
        "computed_call_overhead_pct": 100 * (med["computed"] / med["full"] - 1),
        "head_hook_self_pct_of_full": 100 * head_hook_self_time(model, inputs, args.device) / med["full"],
        "skipped_call_pct_of_full": 100 * med["skipped"] / med["full"],
        "fbc_skipped_call_pct_of_full": 100 * med["fbc_skipped"] / med["full"],
        "schedule": f"{args.steps} steps, {int(med['run_computed'])} computed (cap {args.cap})",
        "ideal_speedup": ideal,
        "realized_speedup": realized,
        "realized_over_ideal": realized / ideal,
        "repeats": args.repeats,
    }
    if args.device == "cuda":
        result.update(cuda_checks(model, inputs, args.steps, args.cap))

    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
