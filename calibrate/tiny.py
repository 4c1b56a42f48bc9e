"""Tiny random-init versions of real diffusers pipelines, for tests and calibration dry runs.

Each pipeline is the genuine diffusers class with a 2-layer transformer and a one-stage VAE, so
the denoising loop, the CFG branches and the ``cache_context("cond"/"uncond")`` calls are exactly
the library's own. There is no text encoder: prompts are turned into embeddings by
:func:`tiny_prompt_embeds`, seeded from the prompt text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    WanPipeline,
    WanTransformer3DModel,
)

TINY_FAMILIES: tuple[str, ...] = ("qwen_image", "flux", "wan")

# Shared sizes. Attention is 2 heads x 16 dims; the RoPE axes below sum to the head dim.
_HEADS = 2
_HEAD_DIM = 16
_ROPE_AXES = (4, 6, 6)
_LATENT_CHANNELS = 4
_TEXT_DIM = 16  # width of the prompt embeddings
_POOLED_DIM = 8  # Flux pooled (CLIP-like) embedding width
_TEXT_TOKENS = 8  # fixed prompt length, so positive and negative embeddings have equal shapes

# Default pipe(...) kwargs. The guidance kwargs make the pipeline run a "cond" and an "uncond"
# transformer call per step when negative embeddings are given. Token counts (VAE factor 2, 2x2
# patches): qwen_image and flux 32x32 px -> 8x8 = 64 tokens; wan 16x16 px, 5 frames -> 3 latent
# frames x 4x4 = 48 tokens.
TINY_RECIPES: dict[str, dict[str, Any]] = {
    "qwen_image": {"height": 32, "width": 32, "num_inference_steps": 8, "true_cfg_scale": 4.0},
    "flux": {
        "height": 32,
        "width": 32,
        "num_inference_steps": 8,
        "true_cfg_scale": 2.0,
        "guidance_scale": 3.5,
    },
    "wan": {"height": 16, "width": 16, "num_frames": 5, "num_inference_steps": 8, "guidance_scale": 5.0},
}


def _check_family(family: str) -> None:
    if family not in TINY_FAMILIES:
        raise ValueError(f"Unknown tiny family {family!r}; supported: {', '.join(TINY_FAMILIES)}.")


def _seeded(seed: int, make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a module under a fixed seed without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().eval()


def _latent_stats(channels: int) -> dict[str, list[float]]:
    return {"latents_mean": [0.0] * channels, "latents_std": [1.0] * channels}


def _build_qwen_image(seed: int) -> QwenImagePipeline:
    transformer = _seeded(
        seed,
        lambda: QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=4 * _LATENT_CHANNELS,
            out_channels=_LATENT_CHANNELS,
            num_layers=2,
            attention_head_dim=_HEAD_DIM,
            num_attention_heads=_HEADS,
            joint_attention_dim=_TEXT_DIM,
            axes_dims_rope=_ROPE_AXES,
        ),
    )
    vae = _seeded(
        seed + 1,
        lambda: AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=_LATENT_CHANNELS,
            dim_mult=[1, 1],
            num_res_blocks=1,
            temperal_downsample=[False],  # one stage: spatial factor 2
            **_latent_stats(_LATENT_CHANNELS),
        ),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    return QwenImagePipeline(
        transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=None, tokenizer=None
    )


def _build_flux(seed: int) -> FluxPipeline:
    transformer = _seeded(
        seed,
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * _LATENT_CHANNELS,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=_HEAD_DIM,
            num_attention_heads=_HEADS,
            joint_attention_dim=_TEXT_DIM,
            pooled_projection_dim=_POOLED_DIM,
            guidance_embeds=True,  # like FLUX.1-dev, so guidance_scale is used
            axes_dims_rope=_ROPE_AXES,
        ),
    )
    vae = _seeded(
        seed + 1,
        lambda: AutoencoderKL(
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 8),  # two blocks: spatial factor 2
            latent_channels=_LATENT_CHANNELS,
            norm_num_groups=4,
            sample_size=32,
            scaling_factor=1.0,
            shift_factor=0.0,  # FluxPipeline adds it unconditionally, so it must not be None
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    return FluxPipeline(
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
    )


def _build_wan(seed: int) -> WanPipeline:
    transformer = _seeded(
        seed,
        lambda: WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=_HEADS,
            attention_head_dim=_HEAD_DIM,  # Wan splits RoPE itself: t=8, h=4, w=4
            in_channels=_LATENT_CHANNELS,
            out_channels=_LATENT_CHANNELS,
            text_dim=_TEXT_DIM,
            freq_dim=16,
            ffn_dim=64,
            num_layers=2,
            rope_max_seq_len=32,
        ),
    )
    vae = _seeded(
        seed + 1,
        lambda: AutoencoderKLWan(
            base_dim=8,
            z_dim=_LATENT_CHANNELS,
            dim_mult=[1, 1],
            num_res_blocks=1,
            temperal_downsample=[True],  # one stage: spatial and temporal factor 2
            scale_factor_spatial=2,
            scale_factor_temporal=2,
            **_latent_stats(_LATENT_CHANNELS),
        ),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return WanPipeline(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=None, tokenizer=None)


_BUILDERS: dict[str, Callable[[int], DiffusionPipeline]] = {
    "qwen_image": _build_qwen_image,
    "flux": _build_flux,
    "wan": _build_wan,
}


def build_tiny_pipeline(family: str, seed: int = 0) -> DiffusionPipeline:
    """Real diffusers pipeline with a tiny random-init transformer and VAE, seeded, no text encoder.

    The same ``(family, seed)`` always gives bit-identical weights; the global torch RNG is left
    untouched. The pipeline is on CPU in float32 with its progress bar disabled.
    """
    _check_family(family)
    pipe = _BUILDERS[family](seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _text_generator(text: str) -> torch.Generator:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _embed(text: str, pooled: bool) -> dict[str, torch.Tensor]:
    """Deterministic pseudo text-encoder output for one prompt (CPU float32, batch of 1)."""
    gen = _text_generator(text)
    out = {"embeds": torch.randn(1, _TEXT_TOKENS, _TEXT_DIM, generator=gen)}
    if pooled:
        out["pooled"] = torch.randn(1, _POOLED_DIM, generator=gen)
    return out


def tiny_prompt_embeds(pipe: DiffusionPipeline, family: str, prompt: str, negative_prompt: str | None = None) -> dict:
    """Keyword arguments for ``pipe(...)`` carrying prompt embeddings derived from the prompt text.

    Embeddings are drawn from a ``torch.Generator`` seeded with the sha256 of the text, so equal
    texts give bit-identical tensors and different texts different ones. Negative embeddings are
    added when ``negative_prompt`` is not None (an empty string is a valid negative prompt).
    Tensors are on ``pipe.transformer``'s device and dtype (masks are int64).

    Per family: qwen_image -> ``prompt_embeds``, ``prompt_embeds_mask`` (+ ``negative_*``);
    flux -> ``prompt_embeds``, ``pooled_prompt_embeds`` (+ ``negative_*``);
    wan -> ``prompt_embeds`` (+ ``negative_prompt_embeds``).
    """
    _check_family(family)
    device, dtype = pipe.transformer.device, pipe.transformer.dtype
    texts = {"": prompt} if negative_prompt is None else {"": prompt, "negative_": negative_prompt}
    kwargs: dict[str, torch.Tensor] = {}
    for prefix, text in texts.items():
        emb = _embed(text, pooled=family == "flux")
        kwargs[f"{prefix}prompt_embeds"] = emb["embeds"].to(device, dtype)
        if family == "qwen_image":
            kwargs[f"{prefix}prompt_embeds_mask"] = torch.ones(1, _TEXT_TOKENS, dtype=torch.long, device=device)
        if family == "flux":
            kwargs[f"{prefix}pooled_prompt_embeds"] = emb["pooled"].to(device, dtype)
    return kwargs
