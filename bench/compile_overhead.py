"""TeaCache under torch.compile, side by side in one run, on a QwenImageTransformer2DModel.

    python bench/compile_overhead.py                      # CPU, small config (inductor: minutes of compiling)
    python bench/compile_overhead.py --size full --device cuda --dtype bfloat16

For each way of compiling (none; ``compile_repeated_blocks`` with ``fullgraph=False`` and ``True``;
``torch.compile`` of the whole transformer) and each order (TeaCache applied before or after
compiling), on one freshly built model each:

- per-call time without any cache (the compiled baseline), with TeaCache computing (the computed
  calls of a forced schedule) and skipping (its skipped calls);
- realized / ideal speedup of the forced schedule (N calls, a cap of 2 consecutive skips) against
  that baseline;
- recompilations and graph breaks after warm-up (dynamo's counters), and whether compiling failed;
- diffusers' FirstBlockCache under the same compile, computed (threshold 0) and skipped calls.

Each time is the median over interleaved calls; ratios are taken within one model's run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import FirstBlockCacheConfig
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime import TeaCache  # noqa: E402
from runtime_overhead import SIZES, build, coefficients, sync  # noqa: E402

MODES = ("eager", "regional", "regional_fullgraph", "whole")


def compile_model(model, mode: str):
    if mode == "eager":
        return model
    if mode == "whole":
        return torch.compile(model)
    model.compile_repeated_blocks(fullgraph=mode == "regional_fullgraph")
    return model


def calls(runner, model, inputs, device: str, n: int, alternate: dict | None = None) -> list[float]:
    """Seconds per call; with ``alternate``, every other call gets those inputs (a cache sees a change)."""
    times = []
    with torch.no_grad(), model.cache_context("cond"):
        for i in range(n):
            sync(device)
            start = time.perf_counter()
            runner(**(alternate if alternate is not None and i % 2 else inputs))
            sync(device)
            times.append(time.perf_counter() - start)
    return times


def measure(mode: str, order: str, size: str, device: str, dtype: torch.dtype, steps: int, baseline_calls: int) -> dict:
    torch._dynamo.reset()
    model, inputs = build(size, device, dtype)
    row: dict = {"mode": mode, "order": order}
    schedule = coefficients(2)
    if order == "compile_then_apply":
        runner = compile_model(model, mode)
        calls(runner, model, inputs, device, 3)  # warm-up (compiles)
        base = calls(runner, model, inputs, device, baseline_calls)
        cache = TeaCache.from_coefficients(schedule).apply(model, num_inference_steps=steps)
    else:
        cache = TeaCache.from_coefficients(schedule).apply(model, num_inference_steps=steps)
        runner = compile_model(model, mode)
        base = None
    calls(runner, model, inputs, device, steps)  # warm-up: compiles the computed and the skipped path
    cache.reset()
    counters.clear()
    run = calls(runner, model, inputs, device, steps)
    decisions = [r.computed for r in cache.stats["cond"].trace]
    row["recompiles_after_warmup"] = sum(counters["recompiles"].values())
    row["graph_breaks_after_warmup"] = sum(counters["graph_break"].values())
    cache.remove()
    after = calls(runner, model, inputs, device, baseline_calls + 2)[2:]  # after remove (may recompile once)
    base_call = statistics.median((base or []) + after)
    computed = [t for t, c in zip(run, decisions) if c]
    skipped = [t for t, c in zip(run, decisions) if not c]
    ideal = steps / sum(decisions)
    realized = steps * base_call / sum(run)
    row.update(
        call_ms=1e3 * base_call,
        teacache_computed_pct=100 * statistics.median(computed[1:] or computed) / base_call,
        teacache_skipped_pct=100 * statistics.median(skipped) / base_call,
        schedule=f"{steps} calls, {sum(decisions)} computed",
        realized_over_ideal=realized / ideal,
    )
    try:  # diffusers' FirstBlockCache under the same compile (it may fail where ours does not)
        model.enable_cache(FirstBlockCacheConfig(threshold=0.0))
        changed = {**inputs, "hidden_states": inputs["hidden_states"].flip(1)}
        fbc_computed = calls(runner, model, inputs, device, baseline_calls + 2, alternate=changed)[2:]
        model.disable_cache()
        model._reset_stateful_cache()
        model.enable_cache(FirstBlockCacheConfig(threshold=1.0))
        fbc_skipped = calls(runner, model, inputs, device, baseline_calls + 3)[3:]  # same input: skips after call 0
        row["fbc_computed_pct"] = 100 * statistics.median(fbc_computed) / base_call
        row["fbc_skipped_pct"] = 100 * statistics.median(fbc_skipped) / base_call
    except Exception as exc:
        row["fbc_computed_pct"] = row["fbc_skipped_pct"] = f"fails: {type(exc).__name__}"
    finally:
        if getattr(model, "is_cache_enabled", False):
            model.disable_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--baseline-calls", type=int, default=5)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    rows = []
    for mode in args.modes.split(","):
        for order in ("apply_then_compile", "compile_then_apply") if mode != "eager" else ("apply_then_compile",):
            try:
                row = measure(mode, order, args.size, args.device, dtype, args.steps, args.baseline_calls)
            except Exception as exc:  # a compile failure is a result, not a crash of the bench
                row = {"mode": mode, "order": order, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {device}, size {args.size}, {args.dtype}")
    header = ("mode", "order", "call_ms", "teacache_computed_pct", "teacache_skipped_pct", "realized_over_ideal",
              "recompiles_after_warmup", "fbc_computed_pct", "fbc_skipped_pct")
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(f"{row[k]:.3g}" if isinstance(row.get(k), float) else str(row.get(k, row.get("error", "")))
                         for k in header))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": device, "size": args.size, "dtype": args.dtype, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
