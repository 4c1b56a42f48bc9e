"""Train the reference model from a seed: ``python -m reference.train [--seed 0] [--out reference/weights]``.

Two stages, both on scikit-learn's 1,797 handwritten digits upsampled to 32x32 and scaled to [-1, 1]:

1. ``AutoencoderKLQwenImage`` (tiny channels, 4x spatial compression, 4 latent channels) trained as an
   autoencoder with a small KL term. Its ``latents_mean`` / ``latents_std`` config is then set from the encoded
   data so that normalized latents are about N(0, 1), the convention ``QwenImagePipeline`` decodes with.
2. ``QwenImageTransformer2DModel`` (and the prompt encoder, jointly) trained with rectified flow matching exactly
   as ``QwenImagePipeline`` + ``FlowMatchEulerDiscreteScheduler`` sample:

   - latents are normalized ``(z - latents_mean) / latents_std`` and packed 2x2 with the pipeline's own
     ``_pack_latents`` (8x8x4 latents -> 16 tokens of 16 channels);
   - ``x_sigma = (1 - sigma) * x_0 + sigma * noise`` and the target is the velocity ``noise - x_0``: the scheduler
     steps ``x += (sigma_next - sigma) * v``;
   - the transformer receives ``timestep = sigma`` in [0, 1] (the pipeline passes ``t / 1000`` where the
     scheduler's ``t = 1000 * sigma``);
   - sigma is drawn as ``time_shift(mu, 1, u)`` with ``u ~ U(0, 1)`` and ``mu`` computed by the pipeline's own
     ``calculate_shift`` from the image sequence length and the scheduler config (Qwen-Image's: exponential
     dynamic shifting), so training sees sigmas with the density the sampler visits;
   - labels are dropped to the empty prompt with probability ``label_dropout`` so true CFG works.

The EMA weights are saved with ``QwenImagePipeline.save_pretrained`` (``text_encoder`` and ``tokenizer`` None)
plus the prompt encoder in ``prompt_encoder/``. Per-step losses go to ``loss.json`` and ``loss.png``.
Everything runs on one CPU thread; the run is bitwise reproducible for a seed on the same machine and build.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from diffusers.models.autoencoders import autoencoder_kl_qwenimage
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
from torch import nn
from tqdm import tqdm

from reference.data import IMAGE_SIZE, load_digit_images
from reference.prompt_encoder import DigitPromptTokenizer, PromptEncoder

REFERENCE_DIR = Path(__file__).resolve().parent
DEFAULT_WEIGHTS_DIR = REFERENCE_DIR / "weights"

#: Qwen-Image's own scheduler configuration (Qwen/Qwen-Image, scheduler/scheduler_config.json).
QWEN_IMAGE_SCHEDULER_CONFIG: dict[str, object] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


@dataclass
class TrainConfig:
    """Sizes and hyperparameters of the reference model and its training run."""

    seed: int = 0
    image_size: int = IMAGE_SIZE
    # VAE (AutoencoderKLQwenImage)
    vae_base_dim: int = 16
    vae_z_dim: int = 4
    vae_dim_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    vae_num_res_blocks: int = 1
    vae_steps: int = 400
    vae_batch_size: int = 64
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-4
    # Transformer (QwenImageTransformer2DModel) and prompt encoder
    num_layers: int = 4
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    axes_dims_rope: list[int] = field(default_factory=lambda: [8, 12, 12])
    text_dim: int = 64
    steps: int = 3000
    batch_size: int = 128
    lr: float = 5e-4
    warmup_steps: int = 100
    weight_decay: float = 0.0
    label_dropout: float = 0.15
    ema_decay: float = 0.999

    @property
    def vae_scale_factor(self) -> int:
        """Spatial compression of the VAE: ``2 ** len(temperal_downsample)`` as ``QwenImagePipeline`` computes it."""
        return 2 ** (len(self.vae_dim_mult) - 1)

    @property
    def latent_size(self) -> int:
        """Side of the latent grid before 2x2 packing."""
        return self.image_size // self.vae_scale_factor


# ----------------------------------------------------------------------------------------------------------------
# Helpers


@contextlib.contextmanager
def single_frame_conv2d() -> Iterator[None]:
    """Run ``QwenImageCausalConv3d`` on single-frame, uncached inputs as the equivalent 2D convolution.

    A causal 3D convolution with temporal kernel 3 pads two zero frames in front of a one-frame input, so only the
    weight's last temporal slice ever meets data: ``conv3d(pad(x)) == conv2d(x, weight[:, :, -1])``. This halves
    the VAE's training time on CPU and changes no result (checked to float32 rounding). The patch is undone on exit.
    """
    conv_cls = autoencoder_kl_qwenimage.QwenImageCausalConv3d
    original = conv_cls.forward

    def forward(self: nn.Conv3d, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        if cache_x is not None or x.shape[2] != 1:
            return original(self, x, cache_x)
        pad_w, pad_h = self._padding[0], self._padding[2]  # F.pad order: (w, w, h, h, t, 0)
        y = F.conv2d(x[:, :, 0], self.weight[:, :, -1], self.bias, self.stride[1:], (pad_h, pad_w))
        return y.unsqueeze(2)

    conv_cls.forward = forward
    try:
        yield
    finally:
        conv_cls.forward = original


def lr_at(step: int, total: int, base_lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of ``base_lr`` (the video reference model trains with it too)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _to_vae_input(images: torch.Tensor) -> torch.Tensor:
    """[N, 1, H, W] in [0, 1] -> [N, 3, 1, H, W] in [-1, 1], the VAE's (video) layout."""
    return (images * 2.0 - 1.0).repeat(1, 3, 1, 1).unsqueeze(2)


def _count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Stage 1: VAE


def build_vae(cfg: TrainConfig) -> AutoencoderKLQwenImage:
    """A tiny ``AutoencoderKLQwenImage``; ``temperal_downsample`` only sets the number of 2x downsamplings here."""
    n_down = len(cfg.vae_dim_mult) - 1
    return AutoencoderKLQwenImage(
        base_dim=cfg.vae_base_dim,
        z_dim=cfg.vae_z_dim,
        dim_mult=list(cfg.vae_dim_mult),
        num_res_blocks=cfg.vae_num_res_blocks,
        attn_scales=[],
        temperal_downsample=[False] * n_down,
        latents_mean=[0.0] * cfg.vae_z_dim,
        latents_std=[1.0] * cfg.vae_z_dim,
    )


def _vae_moments(vae: AutoencoderKLQwenImage, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and log-variance [B, z, 1, h, w] (the computation of ``vae.encode``, minus its cache)."""
    h = vae.quant_conv(vae.encoder(x))
    mean, logvar = h.chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


def _vae_decode_unclamped(vae: AutoencoderKLQwenImage, z: torch.Tensor) -> torch.Tensor:
    """``vae.decode`` without its final clamp to [-1, 1] (which would zero the gradient of overshooting pixels)."""
    return vae.decoder(vae.post_quant_conv(z))


def train_vae(cfg: TrainConfig, images: torch.Tensor) -> tuple[AutoencoderKLQwenImage, list[float]]:
    """Train the VAE as an autoencoder: MSE reconstruction + ``vae_kl_weight`` * KL to N(0, 1)."""
    vae = build_vae(cfg)
    vae.train()
    x_all = _to_vae_input(images)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    losses: list[float] = []
    with single_frame_conv2d(), tqdm(range(cfg.vae_steps), desc="VAE", unit="step") as bar:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg.vae_steps, cfg.vae_lr, warmup=20)
            idx = torch.randint(0, x_all.shape[0], (cfg.vae_batch_size,), generator=gen)
            x = x_all[idx]
            mean, logvar = _vae_moments(vae, x)
            z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen)
            recon = _vae_decode_unclamped(vae, z)
            rec_loss = F.mse_loss(recon, x)
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
            loss = rec_loss + cfg.vae_kl_weight * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(rec_loss.item())
            if step % 10 == 0:
                bar.set_postfix(mse=f"{rec_loss.item():.4f}", kl=f"{kl.item():.2f}")
    vae.eval()
    return vae, losses


@torch.no_grad()
def set_latent_normalization(vae: AutoencoderKLQwenImage, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode the data, set ``latents_mean`` / ``latents_std`` in the VAE config, return the posterior moments.

    The statistics are per channel over posterior samples (mean of ``mean``; ``sqrt(var(mean) + E[var])``), so
    ``(z - latents_mean) / latents_std`` is about zero-mean, unit-variance: the scale the transformer is trained
    on and the one ``QwenImagePipeline`` undoes (``z = x * latents_std + latents_mean``) before decoding.
    """
    with single_frame_conv2d():
        mean, logvar = _vae_moments(vae, _to_vae_input(images))
    dims = (0, 2, 3, 4)
    mu = mean.mean(dim=dims)
    std = (mean.var(dim=dims) + logvar.exp().mean(dim=dims)).sqrt()
    vae.register_to_config(
        latents_mean=[round(v, 6) for v in mu.tolist()],
        latents_std=[round(v, 6) for v in std.tolist()],
    )
    return mean, logvar


@torch.no_grad()
def vae_reconstruction_mse(vae: AutoencoderKLQwenImage, images: torch.Tensor) -> float:
    """Reconstruction MSE in [-1, 1] through the public ``encode`` / ``decode`` API (posterior mode)."""
    x = _to_vae_input(images)
    errors = []
    for chunk in x.split(256):
        z = vae.encode(chunk).latent_dist.mode()
        errors.append(F.mse_loss(vae.decode(z).sample, chunk, reduction="sum"))
    return (torch.stack(errors).sum() / x.numel()).item()


# ----------------------------------------------------------------------------------------------------------------
# Stage 2: transformer


def build_transformer(cfg: TrainConfig) -> QwenImageTransformer2DModel:
    """A small ``QwenImageTransformer2DModel`` with adaLN-Zero style initialization.

    The modulation layers, ``norm_out``'s modulation and ``proj_out`` start at zero, so every block starts as the
    identity and the model output as zero: the usual DiT initialization for training from scratch.
    """
    if sum(cfg.axes_dims_rope) != cfg.attention_head_dim:
        raise ValueError(
            f"axes_dims_rope {cfg.axes_dims_rope} must sum to attention_head_dim {cfg.attention_head_dim}."
        )
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * cfg.vae_z_dim,
        out_channels=cfg.vae_z_dim,
        num_layers=cfg.num_layers,
        attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads,
        joint_attention_dim=cfg.text_dim,
        guidance_embeds=False,
        axes_dims_rope=tuple(cfg.axes_dims_rope),
    )
    zero_init = [transformer.norm_out.linear, transformer.proj_out]
    for block in transformer.transformer_blocks:
        zero_init += [block.img_mod[1], block.txt_mod[1]]
    for layer in zero_init:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return transformer


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, 1, h, w] normalized latents -> [B, (h/2)(w/2), 4C] tokens, with the pipeline's own packing."""
    b, c, _, h, w = latents.shape
    return QwenImagePipeline._pack_latents(latents[:, :, 0], b, c, h, w)


def train_transformer(
    cfg: TrainConfig,
    latents_mean: torch.Tensor,
    latents_logvar: torch.Tensor,
    labels: torch.Tensor,
    vae: AutoencoderKLQwenImage,
    scheduler: FlowMatchEulerDiscreteScheduler,
) -> tuple[QwenImageTransformer2DModel, PromptEncoder, list[float]]:
    """Rectified-flow training of transformer + prompt encoder; returns the EMA copies and per-step losses."""
    transformer = build_transformer(cfg)
    encoder = PromptEncoder(embed_dim=cfg.text_dim)
    tokenizer = DigitPromptTokenizer()
    models = nn.ModuleDict({"transformer": transformer, "encoder": encoder})
    ema = copy.deepcopy(models).requires_grad_(False)
    models.train()

    shift_mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    shift_std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    posterior_std = torch.exp(0.5 * latents_logvar)
    grid = cfg.latent_size // 2
    image_seq_len = grid * grid
    mu = calculate_shift(
        image_seq_len,
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.15),
    )
    print(f"image tokens {image_seq_len}, dynamic-shift mu {mu:.4f} (shift factor exp(mu) = {math.exp(mu):.3f})")

    gen = torch.Generator().manual_seed(cfg.seed + 2)
    decay_params = [p for n, p in models.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    other_params = [p for n, p in models.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay_params, "weight_decay": cfg.weight_decay}, {"params": other_params, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.99),
    )
    img_shapes = [[(1, grid, grid)]] * cfg.batch_size
    losses: list[float] = []
    with tqdm(range(cfg.steps), desc="transformer", unit="step") as bar:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps)
            idx = torch.randint(0, labels.shape[0], (cfg.batch_size,), generator=gen)
            z = latents_mean[idx] + posterior_std[idx] * torch.randn(latents_mean[idx].shape, generator=gen)
            x0 = pack_latents((z - shift_mean) / shift_std)
            noise = torch.randn(x0.shape, generator=gen)
            u = torch.rand(cfg.batch_size, generator=gen).clamp(1e-4, 1.0)
            sigma = scheduler.time_shift(mu, 1.0, u)
            x_sigma = (1.0 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
            drop = torch.rand(cfg.batch_size, generator=gen) < cfg.label_dropout
            input_ids, mask = tokenizer.from_labels(labels[idx], drop)
            prompt_embeds = encoder(input_ids, mask)
            v_pred = transformer(
                hidden_states=x_sigma,
                encoder_hidden_states=prompt_embeds,
                encoder_hidden_states_mask=mask,
                timestep=sigma,
                img_shapes=img_shapes,
                return_dict=False,
            )[0]
            loss = F.mse_loss(v_pred, noise - x0)
            flow_matching_step(loss, optimizer, models, ema, step, cfg.ema_decay)
            losses.append(loss.item())
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.eval()
    return ema["transformer"], ema["encoder"], losses


# ----------------------------------------------------------------------------------------------------------------
# Outputs


def ema_update(ema: nn.Module, model: nn.Module, step: int, max_decay: float) -> None:
    """One step of the exponential moving average of ``model``'s weights, warmed up over the first steps."""
    decay = min(max_decay, (1.0 + step) / (10.0 + step))
    with torch.no_grad():
        for p_ema, p in zip(ema.parameters(), model.parameters()):
            p_ema.lerp_(p, 1.0 - decay)


def flow_matching_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, models: nn.Module, ema: nn.Module,
                       step: int, ema_decay: float) -> None:
    """One update of the transformer and prompt encoder (``models``): backward, gradients clipped at norm 1, the
    optimizer's step, then the EMA (both reference models train their transformers with it)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(models.parameters(), 1.0)
    optimizer.step()
    ema_update(ema, models, step, ema_decay)


def _moving_average(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def loss_figure(panels: list[tuple[list[float], str]], title: str, path: Path, dpi: int) -> None:
    """One log-scale panel per loss curve (per step and its moving average over 50), saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels) + 3, 4))
    for ax, (values, name) in zip(axes, panels):
        ax.plot(values, color="tab:blue", alpha=0.3, linewidth=0.7, label="per step")
        ax.plot(_moving_average(values, 50), color="tab:blue", linewidth=1.5, label="moving average (50)")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def write_loss_logs(vae_losses: list[float], losses: list[float], log_dir: Path, meta: dict[str, object]) -> None:
    """Write ``loss.json`` (per-step losses + run metadata) and ``loss.png`` (both curves, log scale)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "vae_reconstruction_mse": vae_losses, "transformer_flow_matching_mse": losses}
    (log_dir / "loss.json").write_text(json.dumps(payload, indent=1))
    loss_figure(
        [(vae_losses, "VAE reconstruction MSE"), (losses, "transformer flow-matching MSE (velocity)")],
        f"reference model training (seed {meta['seed']}, {meta['total_seconds']:.0f} s on 1 CPU thread)",
        log_dir / "loss.png",
        dpi=110,
    )


def train(cfg: TrainConfig, out: Path, log_dir: Path) -> dict[str, object]:
    """Run both stages, save the pipeline and the prompt encoder to ``out``, the loss logs to ``log_dir``."""
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()
    images, labels = load_digit_images(cfg.image_size)
    print(f"data: {images.shape[0]} digits at {cfg.image_size}x{cfg.image_size}")

    vae, vae_losses = train_vae(cfg, images)
    latents_mean, latents_logvar = set_latent_normalization(vae, images)
    recon_mse = vae_reconstruction_mse(vae, images)
    t_vae = time.perf_counter() - t_start
    print(
        f"VAE done: {_count_params(vae) / 1e6:.2f}M params, {t_vae:.0f} s, reconstruction MSE {recon_mse:.5f}, "
        f"latents_mean {vae.config.latents_mean}, latents_std {vae.config.latents_std}"
    )

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(QWEN_IMAGE_SCHEDULER_CONFIG)
    transformer, encoder, losses = train_transformer(cfg, latents_mean, latents_logvar, labels, vae, scheduler)
    total = time.perf_counter() - t_start
    print(
        f"transformer done: {_count_params(transformer) / 1e6:.2f}M params, {total - t_vae:.0f} s; "
        f"final loss (mean of last 100) {sum(losses[-100:]) / len(losses[-100:]):.4f}"
    )

    out.mkdir(parents=True, exist_ok=True)
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=transformer)
    pipe.save_pretrained(out, safe_serialization=True)
    encoder.save_pretrained(out / "prompt_encoder", safe_serialization=True)
    meta: dict[str, object] = {
        "seed": cfg.seed,
        "config": dataclasses.asdict(cfg),
        "vae_seconds": round(t_vae, 1),
        "transformer_seconds": round(total - t_vae, 1),
        "total_seconds": round(total, 1),
        "vae_reconstruction_mse": recon_mse,
        "torch": torch.__version__,
    }
    (out / "train_config.json").write_text(json.dumps(meta, indent=1))
    write_loss_logs(vae_losses, losses, log_dir, meta)
    size_mb = sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 1e6
    print(f"saved to {out} ({size_mb:.2f} MB of safetensors); total training time {total:.0f} s ({total / 60:.1f} min)")
    return meta


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m reference.train [--seed 0] [--out reference/weights]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS_DIR, help="where the weights are saved")
    parser.add_argument("--log-dir", type=Path, default=REFERENCE_DIR, help="where loss.json and loss.png go")
    parser.add_argument("--vae-steps", type=int, default=None, help="override (for quick trials)")
    parser.add_argument("--steps", type=int, default=None, help="override transformer steps (for quick trials)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = TrainConfig(seed=args.seed)
    if args.vae_steps is not None:
        cfg.vae_steps = args.vae_steps
    if args.steps is not None:
        cfg.steps = args.steps
    train(cfg, args.out, args.log_dir)


if __name__ == "__main__":
    main()
