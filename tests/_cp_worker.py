"""One rank of tests/test_parallel.py: launched by ``torch.distributed.run --nproc_per_node=2`` on CPU (gloo).

Per family: the same tiny transformer (same seed on every rank), driven as a sampler would through N
calls per branch, single-process first (before ``enable_parallelism``), then Ulysses context-parallel
with TeaCache applied before or after ``enable_parallelism``. Each rank writes its decisions and
outputs to ``<out>/<family>.rank<r>.pt``.
"""

import argparse
import os

import torch
import torch.distributed as dist

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.accelerator.device_count = lambda: 1  # diffusers divides by it; CPU torch says 0 (a diffusers limitation)

from diffusers import ContextParallelConfig  # noqa: E402

from calibrate.recorder import TraceRecorder  # noqa: E402
from calibrate.tiny import TINY_RECIPES, build_tiny_pipeline, tiny_prompt_embeds  # noqa: E402
from runtime import Coefficients, DecisionDefaults, TeaCache  # noqa: E402

CLASSES = {"qwen_image": "QwenImageTransformer2DModel", "flux": "FluxTransformer2DModel", "wan": "WanTransformer3DModel"}
STEPS = 6


def coefficients(family, thresh, forecast="reuse"):
    return Coefficients(
        model=f"cp_{family}", transformer_class=CLASSES[family], signal="modulated_input", coefficients=(1.0, 0.0),
        x_range=None, defaults=DecisionDefaults(rel_l1_thresh=thresh, forecast=forecast),
        provenance={"kind": "published", "source": "tests"},
    )


def transformer_inputs(pipe, family):
    captured = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, k: captured.append(k) and None, with_kwargs=True)
    kwargs = {**TINY_RECIPES[family], **tiny_prompt_embeds(pipe, family, "a red fox", negative_prompt="")}
    kwargs["num_inference_steps"] = STEPS
    pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="latent")
    hook.remove()
    return captured  # the pipeline's own calls: cond, uncond per step


def sample(transformer, calls):
    outputs = []
    with torch.no_grad():
        for i, kwargs in enumerate(calls):
            with transformer.cache_context("cond" if i % 2 == 0 else "uncond"):
                outputs.append(transformer(**kwargs)[0])
    return outputs


def cached(transformer, calls, family, thresh, forecast="reuse"):
    with TeaCache.from_coefficients(coefficients(family, thresh, forecast)).apply(transformer, num_inference_steps=STEPS) as cache:
        outputs = sample(transformer, calls)
        decisions = {b: [(r.computed, r.x) for r in s.trace] for b, s in cache.stats.items()}
    return outputs, decisions


def recorded(pipe, family):
    kwargs = {**TINY_RECIPES[family], **tiny_prompt_embeds(pipe, family, "a red fox", negative_prompt="")}
    kwargs["num_inference_steps"] = STEPS
    with TraceRecorder(pipe.transformer) as recorder:
        return recorder.run(lambda: pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="latent"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--families", default="qwen_image,flux,wan")
    parser.add_argument("--thresh", type=float, default=0.3)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for family in args.families.split(","):
        pipe = build_tiny_pipeline(family)
        transformer = pipe.transformer
        calls = transformer_inputs(pipe, family)
        result = {"single_full": sample(transformer, calls)}
        result["single_cached"], result["single_decisions"] = cached(transformer, calls, family, args.thresh)
        result["single_output_linear"], _ = cached(transformer, calls, family, args.thresh, "output_linear")
        result["single_trace"] = recorded(pipe, family)
        # Applied before enable_parallelism, then removed; then enable_parallelism first and applied after.
        cache = TeaCache.from_coefficients(coefficients(family, args.thresh)).apply(transformer, num_inference_steps=STEPS)
        transformer.set_attention_backend("native")
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=dist.get_world_size()))
        result["cp_cached_before"] = sample(transformer, calls)
        result["cp_decisions_before"] = {b: [(r.computed, r.x) for r in s.trace] for b, s in cache.stats.items()}
        cache.remove()
        result["cp_full"] = sample(transformer, calls)
        result["cp_zero"], _ = cached(transformer, calls, family, 0.0)
        result["cp_cached"], result["cp_decisions"] = cached(transformer, calls, family, args.thresh)
        result["cp_output_linear"], _ = cached(transformer, calls, family, args.thresh, "output_linear")
        result["cp_trace"] = recorded(pipe, family)
        torch.save(result, os.path.join(args.out, f"{family}.rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
