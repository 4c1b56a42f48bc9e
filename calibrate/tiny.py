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
    ChromaPipeline,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    StableDiffusion3Pipeline,
    WanPipeline,
    WanTransformer3DModel,
    ZImagePipeline,
)

TINY_FAMILIES: tuple[str, ...] = ("qwen_image", "flux", "wan")
# Further tiny pipelines (conf/model/tiny_<family>.yaml). SD3 and Z-Image batch CFG into one
# transformer call without a cache context (one "default" branch); Chroma runs without CFG, as its
# pipeline makes the uncond call outside any cache context too.
TINY_EXTRA_PIPELINES: tuple[str, ...] = ("sd3", "chroma", "z_image", "wan22", "qwen_image_edit")
TINY_PIPELINES: tuple[str, ...] = TINY_FAMILIES + TINY_EXTRA_PIPELINES

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
    # Wan2.2 A14B's layout: a high-noise expert (transformer) above boundary_ratio, a low-noise one below.
    "wan22": {"height": 16, "width": 16, "num_frames": 5, "num_inference_steps": 8, "guidance_scale": 5.0},
    # Qwen-Image-Edit: the input image (resized by the pipeline to about 1024x1024 px; a 16x VAE -> 1024
    # condition tokens) is concatenated to the 16 tokens being generated (64x64 px).
    "qwen_image_edit": {"height": 64, "width": 64, "num_inference_steps": 8, "true_cfg_scale": 4.0},
    "sd3": {"height": 32, "width": 32, "num_inference_steps": 8, "guidance_scale": 4.0},
    "chroma": {"height": 32, "width": 32, "num_inference_steps": 8, "guidance_scale": 1.0},  # no CFG: see tiny_chroma.yaml
    "z_image": {"height": 32, "width": 32, "num_inference_steps": 8, "guidance_scale": 4.0},
}


def _check_family(family: str) -> None:
    if family not in TINY_PIPELINES:
        raise ValueError(f"Unknown tiny family {family!r}; supported: {', '.join(TINY_PIPELINES)}.")


def _seeded(seed: int, make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a module under a fixed seed without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().eval()


def _latent_stats(channels: int) -> dict[str, list[float]]:
    return {"latents_mean": [0.0] * channels, "latents_std": [1.0] * channels}


def _build_qwen_image_edit(seed: int) -> DiffusionPipeline:
    from diffusers import QwenImageEditPipeline

    base = _build_qwen_image(seed)
    vae = _seeded(
        seed + 1,
        lambda: AutoencoderKLQwenImage(
            base_dim=4,
            z_dim=_LATENT_CHANNELS,
            dim_mult=[1, 1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, False, False, False],  # four stages: spatial factor 16 (CPU-cheap)
            **_latent_stats(_LATENT_CHANNELS),
        ),
    )
    return QwenImageEditPipeline(
        transformer=base.transformer, vae=vae, scheduler=base.scheduler, text_encoder=None, tokenizer=None, processor=None
    )


def tiny_edit_image(prompt: str, size: int = 64) -> Any:
    """A deterministic input image for an edit pipeline: coloured rectangles seeded by the prompt text."""
    from PIL import Image

    gen = _text_generator(prompt)
    pixels = torch.rand(3, 1, 1, generator=gen).expand(3, size, size).clone()
    for _ in range(3):
        x0, y0 = (int(v) for v in torch.randint(0, size // 2, (2,), generator=gen))
        w, h = (int(v) for v in torch.randint(size // 8, size // 2, (2,), generator=gen))
        pixels[:, y0 : y0 + h, x0 : x0 + w] = torch.rand(3, 1, 1, generator=gen)
    array = (pixels.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(array, "RGB")


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


def _wan_transformer(seed: int) -> WanTransformer3DModel:
    return _seeded(
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


def _build_wan(seed: int, two_experts: bool = False) -> WanPipeline:
    transformer = _wan_transformer(seed)
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
    if two_experts:  # Wan2.2: a second, low-noise expert below the boundary (0.875 as Wan2.2 T2V A14B ships)
        return WanPipeline(
            transformer=transformer, transformer_2=_wan_transformer(seed + 2), vae=vae, scheduler=scheduler,
            text_encoder=None, tokenizer=None, boundary_ratio=0.875,
        )
    return WanPipeline(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=None, tokenizer=None)


def _image_vae(seed: int) -> AutoencoderKL:
    """A one-stage AutoencoderKL (spatial factor 2) with _LATENT_CHANNELS channels, no shift or scale."""
    return _seeded(
        seed,
        lambda: AutoencoderKL(
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 8),
            latent_channels=_LATENT_CHANNELS,
            norm_num_groups=4,
            sample_size=32,
            scaling_factor=1.0,
            shift_factor=0.0,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
    )


def _build_sd3(seed: int) -> StableDiffusion3Pipeline:
    return StableDiffusion3Pipeline(
        transformer=build_tiny_transformer("sd3", seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_image_vae(seed + 1),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def _build_chroma(seed: int) -> ChromaPipeline:
    return ChromaPipeline(
        transformer=build_tiny_transformer("chroma", seed),
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=_image_vae(seed + 1),
        text_encoder=None,
        tokenizer=None,
    )


def _build_z_image(seed: int) -> ZImagePipeline:
    return ZImagePipeline(
        transformer=build_tiny_transformer("z_image", seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_image_vae(seed + 1),
        text_encoder=None,
        tokenizer=None,
    )


_BUILDERS: dict[str, Callable[[int], DiffusionPipeline]] = {
    "qwen_image": _build_qwen_image,
    "flux": _build_flux,
    "wan": _build_wan,
    "wan22": lambda seed: _build_wan(seed, two_experts=True),
    "qwen_image_edit": _build_qwen_image_edit,
    "sd3": _build_sd3,
    "chroma": _build_chroma,
    "z_image": _build_z_image,
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
    wan -> ``prompt_embeds`` (+ ``negative_prompt_embeds``); sd3 -> ``prompt_embeds``,
    ``pooled_prompt_embeds`` (+ ``negative_*``); chroma -> ``prompt_embeds``, ``prompt_attention_mask``
    (+ ``negative_*``); z_image -> ``prompt_embeds`` as a list of per-prompt ``[tokens, dim]`` tensors.
    """
    _check_family(family)
    device, dtype = pipe.transformer.device, pipe.transformer.dtype
    texts = {"": prompt} if negative_prompt is None else {"": prompt, "negative_": negative_prompt}
    kwargs: dict[str, torch.Tensor] = {}
    for prefix, text in texts.items():
        emb = _embed(text, pooled=family in ("flux", "sd3"))
        kwargs[f"{prefix}prompt_embeds"] = emb["embeds"].to(device, dtype)
        if family in ("qwen_image", "qwen_image_edit"):
            kwargs[f"{prefix}prompt_embeds_mask"] = torch.ones(1, _TEXT_TOKENS, dtype=torch.long, device=device)
        if family in ("flux", "sd3"):
            kwargs[f"{prefix}pooled_prompt_embeds"] = emb["pooled"].to(device, dtype)
        if family == "chroma":
            kwargs[f"{prefix}prompt_attention_mask"] = torch.ones(1, _TEXT_TOKENS, dtype=dtype, device=device)
        if family == "z_image":
            kwargs[f"{prefix}prompt_embeds"] = list(kwargs[f"{prefix}prompt_embeds"].unbind(0))
    if family == "qwen_image_edit":
        kwargs["image"] = tiny_edit_image(prompt)
    return kwargs


# ------------------------------------------------------------------ bare tiny transformers
#
# Tiny random-init configs of every transformer class TeaCache has an adapter for, and the forward
# kwargs each needs, so a test (or a dry run) can drive the real class step by step as a sampler
# would. Attention is 2 heads x 16 dims wherever the class lets us choose; RoPE axes sum to 16.
# ``sigma`` runs from 1 (noise) to 0; each family's timestep follows its pipeline's convention
# (sigma for the Flux-like ones, 1000*sigma for most, 1 - sigma for Z-Image and Lumina2,
# 1000*(1 - sigma) for Mochi, an integer for CogVideoX).


def _tiny_config(family: str) -> tuple[str, dict[str, Any]]:
    h, d = _HEADS, _HEAD_DIM
    configs: dict[str, tuple[str, dict[str, Any]]] = {
        "hunyuan_video": (
            "HunyuanVideoTransformer3DModel",
            dict(in_channels=4, out_channels=4, num_attention_heads=h, attention_head_dim=d, num_layers=2,
                 num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
                 text_embed_dim=_TEXT_DIM, pooled_projection_dim=_POOLED_DIM, rope_axes_dim=_ROPE_AXES),
        ),
        "hunyuan_image": (
            "HunyuanImageTransformer2DModel",
            dict(in_channels=4, out_channels=4, num_attention_heads=h, attention_head_dim=d, num_layers=2,
                 num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=(1, 1),
                 text_embed_dim=_TEXT_DIM, rope_axes_dim=(8, 8)),
        ),
        "sd3": (
            "SD3Transformer2DModel",
            dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=d,
                 num_attention_heads=h, joint_attention_dim=_TEXT_DIM, caption_projection_dim=h * d,
                 pooled_projection_dim=_POOLED_DIM, pos_embed_max_size=16),
        ),
        "ltx_video": (
            "LTXVideoTransformer3DModel",
            dict(in_channels=8, out_channels=8, num_attention_heads=h, attention_head_dim=d, cross_attention_dim=h * d,
                 num_layers=3, caption_channels=_TEXT_DIM),
        ),
        "cogvideox": (
            "CogVideoXTransformer3DModel",
            dict(num_attention_heads=h, attention_head_dim=d, in_channels=4, out_channels=4, time_embed_dim=32,
                 text_embed_dim=_TEXT_DIM, num_layers=3, sample_width=8, sample_height=8, sample_frames=5,
                 patch_size=2, max_text_seq_length=_TEXT_TOKENS),
        ),
        "mochi": (
            "MochiTransformer3DModel",
            dict(patch_size=2, num_attention_heads=h, attention_head_dim=d, num_layers=3, pooled_projection_dim=h * d,
                 in_channels=4, text_embed_dim=_TEXT_DIM, time_embed_dim=32, max_sequence_length=_TEXT_TOKENS),
        ),
        "flux2": (
            "Flux2Transformer2DModel",
            dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=d,
                 num_attention_heads=h, joint_attention_dim=_TEXT_DIM, timestep_guidance_channels=16,
                 axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True),
        ),
        "z_image": (
            "ZImageTransformer2DModel",
            dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=h * d, n_layers=3,
                 n_refiner_layers=1, n_heads=h, n_kv_heads=h, cap_feat_dim=_TEXT_DIM, axes_dims=list(_ROPE_AXES),
                 axes_lens=[64, 32, 32]),
        ),
        "lumina2": (
            "Lumina2Transformer2DModel",
            dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=h * d, num_layers=3, num_refiner_layers=1,
                 num_attention_heads=h, num_kv_heads=h, multiple_of=16, axes_dim_rope=_ROPE_AXES,
                 axes_lens=(64, 32, 32), cap_feat_dim=_TEXT_DIM),
        ),
        "chroma": (
            "ChromaTransformer2DModel",
            dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=d,
                 num_attention_heads=h, joint_attention_dim=_TEXT_DIM, axes_dims_rope=_ROPE_AXES,
                 approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=1),
        ),
        "hidream": (
            "HiDreamImageTransformer2DModel",
            dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=d,
                 num_attention_heads=h, caption_channels=[_TEXT_DIM, _TEXT_DIM], text_emb_dim=_POOLED_DIM,
                 num_routed_experts=2, num_activated_experts=1, axes_dims_rope=_ROPE_AXES, max_resolution=(32, 32),
                 llama_layers=[0, 1, 2, 3]),
        ),
        "sana": (
            "SanaTransformer2DModel",
            dict(in_channels=4, out_channels=4, num_attention_heads=h, attention_head_dim=d, num_layers=3,
                 num_cross_attention_heads=h, cross_attention_head_dim=d, cross_attention_dim=h * d,
                 caption_channels=_TEXT_DIM, mlp_ratio=2.0, sample_size=8, patch_size=1),
        ),
        "cogview4": (
            "CogView4Transformer2DModel",
            dict(patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=d, num_attention_heads=h,
                 text_embed_dim=_TEXT_DIM, time_embed_dim=32, condition_dim=8, pos_embed_max_size=16, sample_size=16,
                 rope_axes_dim=(16, 16)),
        ),
        "cosmos": (
            "CosmosTransformer3DModel",
            dict(in_channels=4, out_channels=4, num_attention_heads=h, attention_head_dim=d, num_layers=3, mlp_ratio=2.0,
                 text_embed_dim=_TEXT_DIM, adaln_lora_dim=8, max_size=(4, 16, 16), patch_size=(1, 2, 2),
                 concat_padding_mask=False),  # the padding mask's resize needs torchvision
        ),
        "skyreels_v2": (
            "SkyReelsV2Transformer3DModel",
            dict(patch_size=(1, 2, 2), num_attention_heads=h, attention_head_dim=d, in_channels=4, out_channels=4,
                 text_dim=_TEXT_DIM, freq_dim=16, ffn_dim=64, num_layers=3, rope_max_seq_len=32),
        ),
        "hunyuan_video15": (
            "HunyuanVideo15Transformer3DModel",
            dict(in_channels=4, out_channels=4, num_attention_heads=h, attention_head_dim=d, num_layers=3,
                 num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=_TEXT_DIM, text_embed_2_dim=_TEXT_DIM,
                 image_embed_dim=_TEXT_DIM, rope_axes_dim=_ROPE_AXES, task_type="t2v"),
        ),
    }
    if family not in configs:
        raise ValueError(f"Unknown tiny transformer family {family!r}; supported: {', '.join(TINY_TRANSFORMERS)}.")
    return configs[family]


TINY_TRANSFORMERS: tuple[str, ...] = (
    "hunyuan_video", "hunyuan_image", "sd3", "ltx_video", "cogvideox", "mochi", "flux2", "z_image", "lumina2",
    "chroma", "hidream", "sana", "cogview4", "cosmos", "skyreels_v2", "hunyuan_video15",
)


def tiny_transformer_class(family: str) -> str:
    return _tiny_config(family)[0]


def build_tiny_transformer(family: str, seed: int = 0) -> torch.nn.Module:
    """The real diffusers transformer class of ``family`` with a tiny random-init config (CPU, float32)."""
    import diffusers

    class_name, config = _tiny_config(family)
    return _seeded(seed, lambda: getattr(diffusers, class_name)(**config))


# Latent shapes fed to each tiny transformer (batch 1), as its pipeline would hand them over.
_LATENT_SHAPES: dict[str, tuple[int, ...]] = {
    "hunyuan_video": (1, 4, 3, 8, 8),  # B, C, F, H, W -> 3 x 4 x 4 = 48 tokens
    "hunyuan_image": (1, 4, 8, 8),  # 64 tokens
    "sd3": (1, 4, 16, 16),  # 64 tokens
    "ltx_video": (1, 32, 8),  # packed B, tokens (2 frames x 4 x 4), C
    "cogvideox": (1, 2, 4, 8, 8),  # B, F, C, H, W -> 32 tokens
    "mochi": (1, 4, 2, 8, 8),  # 32 tokens
    "flux2": (1, 64, 16),  # packed tokens of an 8x8 grid
    "z_image": (1, 4, 1, 8, 8),  # per sample C, F, H, W (the model takes a list)
    "lumina2": (1, 4, 8, 8),
    "chroma": (1, 64, 16),
    "hidream": (1, 4, 16, 16),
    "sana": (1, 4, 8, 8),
    "cogview4": (1, 4, 16, 16),
    "cosmos": (1, 4, 2, 8, 8),
    "skyreels_v2": (1, 4, 3, 8, 8),
    "hunyuan_video15": (1, 4, 3, 4, 4),
}


def tiny_latents(family: str, seed: int = 0) -> torch.Tensor:
    tiny_transformer_class(family)
    return torch.randn(_LATENT_SHAPES[family], generator=torch.Generator().manual_seed(seed))


def _grid_ids(height: int, width: int, axes: int) -> torch.Tensor:
    ids = torch.zeros(height, width, axes)
    ids[..., axes - 2] = torch.arange(height)[:, None]
    ids[..., axes - 1] = torch.arange(width)[None, :]
    return ids.reshape(height * width, axes)


def tiny_transformer_kwargs(family: str, latents: torch.Tensor, sigma: float, text: str = "a red fox") -> dict[str, Any]:
    """Forward kwargs of ``family``'s tiny transformer at noise level ``sigma`` (1 -> 0) for ``latents``."""
    tiny_transformer_class(family)
    gen = _text_generator(f"{family}:{text}")
    text_emb = torch.randn(1, _TEXT_TOKENS, _TEXT_DIM, generator=gen)
    pooled = torch.randn(1, _POOLED_DIM, generator=gen)
    mask = torch.ones(1, _TEXT_TOKENS, dtype=torch.long)
    t1000 = torch.tensor([1000.0 * sigma])
    if family == "hunyuan_video":
        return dict(hidden_states=latents, timestep=t1000, encoder_hidden_states=text_emb, encoder_attention_mask=mask,
                    pooled_projections=pooled, guidance=torch.tensor([6000.0]), return_dict=False)
    if family == "hunyuan_image":
        return dict(hidden_states=latents, timestep=t1000, encoder_hidden_states=text_emb, encoder_attention_mask=mask,
                    return_dict=False)
    if family == "sd3":
        return dict(hidden_states=latents, encoder_hidden_states=text_emb, pooled_projections=pooled, timestep=t1000,
                    return_dict=False)
    if family == "ltx_video":
        return dict(hidden_states=latents, encoder_hidden_states=text_emb, timestep=t1000, encoder_attention_mask=mask,
                    num_frames=2, height=4, width=4, rope_interpolation_scale=(1.0, 1.0, 1.0), return_dict=False)
    if family == "cogvideox":
        return dict(hidden_states=latents, encoder_hidden_states=text_emb,
                    timestep=torch.tensor([int(999 * sigma)], dtype=torch.long), return_dict=False)
    if family == "mochi":
        return dict(hidden_states=latents, encoder_hidden_states=text_emb, timestep=1000.0 - t1000,
                    encoder_attention_mask=mask.bool(), return_dict=False)
    if family == "flux2":
        return dict(hidden_states=latents, encoder_hidden_states=text_emb, timestep=torch.tensor([sigma]),
                    img_ids=torch.cat([torch.zeros(64, 1), _grid_ids(8, 8, 3)], dim=1),
                    txt_ids=torch.zeros(_TEXT_TOKENS, 4), guidance=torch.tensor([3.5]), return_dict=False)
    if family == "z_image":
        return dict(x=list(latents.unbind(0)), t=torch.tensor([1.0 - sigma]), cap_feats=list(text_emb.unbind(0)),
                    return_dict=False)
    if family == "lumina2":
        return dict(hidden_states=latents, timestep=torch.tensor([1.0 - sigma]), encoder_hidden_states=text_emb,
                    encoder_attention_mask=mask.bool(), return_dict=False)
    if family == "chroma":
        return dict(hidden_states=latents, encoder_hidden_states=text_emb, timestep=torch.tensor([sigma]),
                    img_ids=_grid_ids(8, 8, 3), txt_ids=torch.zeros(_TEXT_TOKENS, 3), return_dict=False)
    if family == "hidream":
        llama = torch.randn(4, 1, _TEXT_TOKENS, _TEXT_DIM, generator=gen)
        return dict(hidden_states=latents, timesteps=t1000, encoder_hidden_states_t5=text_emb,
                    encoder_hidden_states_llama3=llama, pooled_embeds=pooled, return_dict=False)
    if family == "sana":
        return dict(hidden_states=latents, encoder_hidden_states=text_emb, timestep=t1000, encoder_attention_mask=mask,
                    return_dict=False)
    if family == "cogview4":
        size = torch.tensor([[128.0, 128.0]])
        return dict(hidden_states=latents, encoder_hidden_states=text_emb, timestep=t1000, original_size=size,
                    target_size=size, crop_coords=torch.zeros(1, 2), return_dict=False)
    if family == "cosmos":
        return dict(hidden_states=latents, timestep=torch.tensor([sigma]), encoder_hidden_states=text_emb,
                    return_dict=False)
    if family == "skyreels_v2":
        return dict(hidden_states=latents, timestep=t1000, encoder_hidden_states=text_emb, return_dict=False)
    if family == "hunyuan_video15":
        return dict(hidden_states=latents, timestep=t1000, encoder_hidden_states=text_emb, encoder_attention_mask=mask,
                    encoder_hidden_states_2=text_emb.flip(1), encoder_attention_mask_2=mask,
                    image_embeds=torch.zeros(1, 4, _TEXT_DIM), return_dict=False)
    raise AssertionError(family)


class TinyTransformerLoop:
    """A sampling loop around a bare tiny transformer, for the families whose diffusers pipeline cannot be
    built offline (text encoders, guiders, guardrails): what ``calibrate.record`` and the runtime need of a
    pipeline, and nothing else.

    ``transformer`` is the real diffusers class (:func:`build_tiny_transformer`); ``scheduler`` is diffusers'
    ``FlowMatchEulerDiscreteScheduler``. A call runs ``num_inference_steps`` Euler steps from seeded noise:
    with guidance > 1 and a class that has ``CacheMixin``, a "cond" and an "uncond" call per step, each in
    its cache context, as diffusers pipelines do; otherwise one call per step without a context. At the
    end the transformer's stateful hooks are reset, as a pipeline's ``maybe_free_model_hooks`` does.
    """

    def __init__(self, family: str, seed: int = 0) -> None:
        self.family = family
        self.seed = seed
        self.transformer = build_tiny_transformer(family, seed)
        self.scheduler = FlowMatchEulerDiscreteScheduler()

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        pass

    def to(self, device: Any = None, dtype: Any = None) -> "TinyTransformerLoop":
        self.transformer.to(device=device, dtype=dtype)
        return self

    def _call(self, latents: torch.Tensor, sigma: float, text: str, branch: str | None) -> torch.Tensor:
        kwargs = tiny_transformer_kwargs(self.family, latents, sigma, text)
        device, dtype = self.transformer.device, self.transformer.dtype
        kwargs = {k: v.to(device, dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
        if branch is None:
            out = self.transformer(**kwargs)
        else:
            with self.transformer.cache_context(branch):
                out = self.transformer(**kwargs)
        out = out[0] if isinstance(out, tuple) else out
        out = torch.stack(list(out)) if isinstance(out, list) else out
        if out.numel() != latents.numel():
            raise ValueError(f"tiny {self.family} returned {tuple(out.shape)} for latents {tuple(latents.shape)}")
        return out.reshape(latents.shape)

    @torch.no_grad()
    def __call__(self, prompt: str, negative_prompt: str | None = None, num_inference_steps: int = 8,
                 guidance_scale: float = 1.0, generator: torch.Generator | None = None, output_type: str = "latent",
                 **ignored: Any) -> tuple[torch.Tensor]:
        latents = torch.randn(_LATENT_SHAPES[self.family], generator=generator).to(self.transformer.device, self.transformer.dtype)
        self.scheduler.set_timesteps(num_inference_steps)
        cfg = guidance_scale > 1 and negative_prompt is not None and hasattr(self.transformer, "cache_context")
        for i, t in enumerate(self.scheduler.timesteps):
            sigma = float(self.scheduler.sigmas[i])
            if cfg:
                cond = self._call(latents, sigma, prompt, "cond")
                uncond = self._call(latents, sigma, negative_prompt, "uncond")
                velocity = uncond + guidance_scale * (cond - uncond)
            else:
                velocity = self._call(latents, sigma, prompt, None)
            latents = self.scheduler.step(velocity, t, latents).prev_sample
        if hasattr(self.transformer, "_reset_stateful_cache"):
            self.transformer._reset_stateful_cache()
        elif hasattr(self.transformer, "_diffusers_hook"):
            self.transformer._diffusers_hook.reset_stateful_hooks()
        return (latents,)


# Families with a tiny conf/model/tiny_<family>.yaml driven by TinyTransformerLoop.
TINY_LOOP_FAMILIES: tuple[str, ...] = (
    "hunyuan_video", "hunyuan_image", "ltx_video", "cogvideox", "mochi", "flux2", "lumina2", "hidream", "sana",
    "cogview4", "cosmos", "skyreels_v2", "hunyuan_video15",
)
