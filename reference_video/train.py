"""Train the video reference model from a seed: ``python -m reference_video.train [--seed 0] [--out DIR]``.

Three stages on the procedural clips of :mod:`reference_video.data` (9 frames of 32x32 RGB, scaled to [-1, 1]),
and an optional fourth:

1. ``AutoencoderKLWan`` (tiny channels, one down stage: 2x temporal and 2x spatial compression as
   ``scale_factor_temporal`` / ``scale_factor_spatial`` say, 8 latent channels: 9x32x32x3 -> 5x16x16x8) trained as
   an autoencoder through its own chunked, causal ``_encode`` and the decoder loop of ``_decode`` (without the final
   clamp) with a small KL; the MSE weighs the pixels a shape covers ``1 + vae_foreground_weight`` times (else
   colours wash out). (A 4x/4x VAE of this size rounds 9-pixel squares into circles: the checker then fails a fifth
   of real clips passed through it; at 2x it fails about one in ten after a third of the steps.)
2. A pool of clips from the infinite stream is encoded once; ``latents_mean`` / ``latents_std`` are set from it so
   normalized latents are about N(0, 1), the convention ``WanPipeline`` decodes with.
3. ``WanTransformer3DModel`` (patch (1, 4, 4): 5 x 4 x 4 = 80 tokens) and the prompt encoder, trained jointly with
   rectified flow matching as ``WanPipeline`` + Wan2.1's ``UniPCMultistepScheduler`` (flow_prediction,
   flow_shift 3) sample: ``x_sigma = (1 - sigma) x_0 + sigma noise``, target ``noise - x_0``,
   ``timestep = 1000 sigma``, sigma drawn with the same shift ``3 u / (1 + 2 u)``; prompts are dropped to "" with
   probability ``prompt_dropout`` for CFG.
4. Only with ``decoder_steps > 0`` (off by default): the VAE decoder alone trained further with the encoder frozen
   (the latent space the transformer learned does not move).

The EMA weights are saved with ``WanPipeline.save_pretrained`` (no text encoder, no tokenizer) and the prompt
encoder in ``prompt_encoder/``; losses go to ``loss.json`` / ``loss.png``. ``threads`` CPU threads (2, the CI
machine's cores); reproducible per seed and thread count.

``--device cuda`` trains on a GPU with the same random draws (all made by CPU generators); ``--minutes M``
chooses the transformer's step count from the rate measured over its steps 10-40 so that stage fills M minutes
(the count is written to ``train_config.json``). ``reference_video/device_train.sh`` runs both as one call of a
lent GPU.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from torch import nn

from reference.train import flow_matching_step, loss_figure, lr_at
from reference_video.data import NUM_FRAMES, batches, render, scene_prompt
from reference_video.prompt_encoder import ShapesPromptEncoder, ShapesTokenizer

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_WEIGHTS_DIR = PACKAGE_DIR / "weights"

#: Wan2.1-T2V-1.3B's scheduler configuration (Wan-AI/Wan2.1-T2V-1.3B-Diffusers, scheduler/scheduler_config.json).
WAN_SCHEDULER_CONFIG: dict[str, object] = {
    "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001, "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995, "final_sigmas_type": "zero", "flow_shift": 3.0, "lower_order_final": True,
    "num_train_timesteps": 1000, "predict_x0": True, "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False, "sample_max_value": 1.0, "solver_order": 2, "solver_p": None,
    "solver_type": "bh2", "steps_offset": 0, "thresholding": False, "timestep_spacing": "linspace",
    "trained_betas": None, "use_beta_sigmas": False, "use_exponential_sigmas": False, "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}


@dataclass
class TrainConfig:
    seed: int = 0
    # VAE
    vae_base_dim: int = 12
    vae_z_dim: int = 8  # x 4 x 4 patch = 128 outputs per token: as many as the transformer's width, not twice as many
    vae_dim_mult: list[int] = field(default_factory=lambda: [1, 2])  # one stage: 2x spatial and 2x temporal
    vae_steps: int = 1000
    vae_batch_size: int = 12
    vae_lr: float = 3e-3
    vae_foreground_weight: float = 9.0  # extra MSE weight on pixels a shape covers (colours and edges)
    vae_kl_weight: float = 1e-5
    pool_size: int = 12000
    decoder_steps: int = 0  # stage 4: the decoder alone, encoder frozen (the latent space does not move)
    decoder_lr: float = 2e-3
    # transformer + prompt encoder
    patch_size: list[int] = field(default_factory=lambda: [1, 4, 4])  # 5 x 16 x 16 latents -> 80 tokens
    num_layers: int = 6
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    ffn_dim: int = 512
    freq_dim: int = 64
    text_dim: int = 64
    steps: int = 4500  # length of the learning-rate schedule (warm-up, cosine decay to 10%)
    stop_at: int | None = None  # stop early (quick trials); None runs the whole schedule
    batch_size: int = 64
    lr: float = 8e-4
    warmup_steps: int = 100
    prompt_dropout: float = 0.1
    ema_decay: float = 0.999
    flow_shift: float = 3.0
    checkpoint_every: int = 1000
    threads: int = 2  # torch's CPU threads (this project's CI machine has 2 cores)
    device: str = "cpu"  # or "cuda"; every random draw comes from CPU generators, so the draws match on any device
    minutes: float | None = None  # if set, `steps` is chosen so the transformer stage fits this many minutes


def to_vae_input(clips: np.ndarray) -> torch.Tensor:
    """[B, T, H, W, 3] in [0, 1] -> [B, 3, T, H, W] in [-1, 1]."""
    return torch.from_numpy(clips).permute(0, 4, 1, 2, 3).mul(2.0).sub(1.0).contiguous()


def build_vae(cfg: TrainConfig) -> AutoencoderKLWan:
    n_down = len(cfg.vae_dim_mult) - 1
    return AutoencoderKLWan(
        base_dim=cfg.vae_base_dim, z_dim=cfg.vae_z_dim, dim_mult=list(cfg.vae_dim_mult), num_res_blocks=1,
        attn_scales=[], temperal_downsample=[True] * n_down, scale_factor_spatial=2**n_down,
        scale_factor_temporal=2**n_down, latents_mean=[0.0] * cfg.vae_z_dim, latents_std=[1.0] * cfg.vae_z_dim,
    )


def vae_moments(vae: AutoencoderKLWan, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, logvar = vae._encode(x).chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


def vae_decode_unclamped(vae: AutoencoderKLWan, z: torch.Tensor) -> torch.Tensor:
    """The frame loop of ``AutoencoderKLWan._decode`` without its final clamp (which would stop gradients)."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    outs = []
    for i in range(z.shape[2]):
        vae._conv_idx = [0]
        outs.append(vae.decoder(x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                first_chunk=(i == 0)))
    vae.clear_cache()
    return torch.cat(outs, 2)


def _weighted_batch(cfg: TrainConfig, stream) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of clips [B, 3, T, H, W] in [-1, 1] and per-pixel loss weights [B, 1, T, H, W]."""
    clips, alpha = zip(*(render(s, return_alpha=True) for s in next(stream)[1]))
    weight = 1.0 + cfg.vae_foreground_weight * torch.from_numpy(np.stack(alpha))[:, None]
    return to_vae_input(np.stack(clips)).to(cfg.device), weight.to(cfg.device)


def finetune_decoder(cfg: TrainConfig, vae: AutoencoderKLWan) -> list[float]:
    """Train the decoder (and ``post_quant_conv``) further with the encoder frozen: sharper shapes, same latents."""
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    stream = batches(cfg.seed * 1000 + 3, cfg.vae_batch_size)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.decoder_lr, weight_decay=0.0)
    vae.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(cfg.decoder_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.decoder_steps, cfg.decoder_lr, 20)
        x, weight = _weighted_batch(cfg, stream)
        with torch.no_grad():
            mean, logvar = vae_moments(vae, x)
            z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen).to(cfg.device)
        err = (vae_decode_unclamped(vae, z) - x).pow(2)
        opt.zero_grad(set_to_none=True)
        (err * weight).mean().backward()
        opt.step()
        losses.append(err.mean().item())
        if step % 50 == 0:
            print(f"decoder step {step} mse {np.mean(losses[-50:]):.5f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    vae.eval()
    return losses


def train_vae(cfg: TrainConfig) -> tuple[AutoencoderKLWan, list[float]]:
    vae = build_vae(cfg).to(cfg.device).train()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    stream = batches(cfg.seed * 1000 + 1, cfg.vae_batch_size)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(cfg.vae_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.vae_steps, cfg.vae_lr, 20)
        x, weight = _weighted_batch(cfg, stream)
        mean, logvar = vae_moments(vae, x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen).to(cfg.device)
        err = (vae_decode_unclamped(vae, z) - x).pow(2)
        rec = err.mean()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        opt.zero_grad(set_to_none=True)
        ((err * weight).mean() + cfg.vae_kl_weight * kl).backward()
        opt.step()
        losses.append(rec.item())
        if step % 25 == 0:
            print(f"vae step {step} mse {rec.item():.5f} kl {kl.item():.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return vae.eval(), losses


@torch.no_grad()
def encode_pool(cfg: TrainConfig, vae: AutoencoderKLWan) -> tuple[torch.Tensor, torch.Tensor, list[str], float]:
    """Encode ``pool_size`` clips of the stream; set the latent normalization; return moments, prompts, recon MSE."""
    stream = batches(cfg.seed * 1000 + 2, 50)
    means, stds, prompts, err = [], [], [], []
    while len(prompts) < cfg.pool_size:
        clips, scenes = next(stream)
        x = to_vae_input(clips).to(cfg.device)
        mean, logvar = vae_moments(vae, x)
        if len(err) < 4:
            err.append(F.mse_loss(vae._decode(mean).sample, x).item())
        means.append(mean)
        stds.append(torch.exp(0.5 * logvar))
        prompts += [scene_prompt(s) for s in scenes]
    mean, std = torch.cat(means), torch.cat(stds)
    dims = (0, 2, 3, 4)
    mu = mean.mean(dim=dims)
    sd = (mean.var(dim=dims) + std.pow(2).mean(dim=dims)).sqrt()
    vae.register_to_config(latents_mean=[round(v, 6) for v in mu.tolist()],
                           latents_std=[round(v, 6) for v in sd.tolist()])
    return mean, std, prompts, float(np.mean(err))


def build_transformer(cfg: TrainConfig) -> WanTransformer3DModel:
    tr = WanTransformer3DModel(
        patch_size=tuple(cfg.patch_size), num_attention_heads=cfg.num_attention_heads, attention_head_dim=cfg.attention_head_dim,
        in_channels=cfg.vae_z_dim, out_channels=cfg.vae_z_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, rope_max_seq_len=32,
    )
    nn.init.zeros_(tr.proj_out.weight)
    nn.init.zeros_(tr.proj_out.bias)
    return tr


def save(out: Path, transformer, vae, encoder, meta: dict | None = None) -> None:
    """The pipeline (CPU copies of the models, whatever device they train on) and the prompt encoder in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    transformer, vae, encoder = (copy.deepcopy(m).to("cpu") for m in (transformer, vae, encoder))
    scheduler = UniPCMultistepScheduler.from_config(WAN_SCHEDULER_CONFIG)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=vae, scheduler=scheduler)
    pipe.save_pretrained(out, safe_serialization=True)
    encoder.save_pretrained(out / "prompt_encoder", safe_serialization=True)
    if meta is not None:
        (out / "train_config.json").write_text(json.dumps(meta, indent=1))


def train_transformer(cfg, vae, mean, std, prompts, out: Path):
    device = cfg.device
    transformer = build_transformer(cfg).to(device)
    encoder = ShapesPromptEncoder(embed_dim=cfg.text_dim).to(device)
    tokenizer = ShapesTokenizer()
    models = nn.ModuleDict({"transformer": transformer, "encoder": encoder})
    ema = copy.deepcopy(models).requires_grad_(False).eval()
    models.train()
    lat_mean = torch.tensor(vae.config.latents_mean, device=device).view(1, -1, 1, 1, 1)
    lat_std = torch.tensor(vae.config.latents_std, device=device).view(1, -1, 1, 1, 1)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    opt = torch.optim.AdamW(models.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    losses: list[float] = []
    t0 = time.perf_counter()
    # with a time budget, run the rate probe first; the step count (and so the schedule) is fixed after it
    run = PROBE_STEPS[1] + 1 if cfg.minutes is not None else min(cfg.steps, cfg.stop_at or cfg.steps)
    step, probe_start = 0, 0.0
    while step < run:
        if cfg.minutes is not None and step == PROBE_STEPS[1]:
            cfg.steps = steps_for_minutes(cfg.minutes, probe_start, PROBE_STEPS, cfg.warmup_steps)
            run = min(cfg.steps, cfg.stop_at or cfg.steps)
            print(f"{cfg.minutes} minutes at the measured rate: {cfg.steps} transformer steps", flush=True)
        if step == PROBE_STEPS[0]:
            probe_start = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps)
        idx = torch.randint(0, mean.shape[0], (cfg.batch_size,), generator=gen)
        shape = (cfg.batch_size, *mean.shape[1:])
        on = idx.to(device)
        z = mean[on] + std[on] * torch.randn(shape, generator=gen).to(device)
        x0 = (z - lat_mean) / lat_std
        noise = torch.randn(shape, generator=gen).to(device)
        u = torch.rand(cfg.batch_size, generator=gen)
        sigma = (cfg.flow_shift * u / (1 + (cfg.flow_shift - 1) * u)).to(device)
        s = sigma.view(-1, 1, 1, 1, 1)
        x_sigma = (1 - s) * x0 + s * noise
        drop = (torch.rand(cfg.batch_size, generator=gen) < cfg.prompt_dropout).tolist()
        ids, mask = tokenizer([prompts[i] for i in idx.tolist()], drop=drop)
        v = transformer(hidden_states=x_sigma, timestep=sigma * 1000,
                        encoder_hidden_states=encoder(ids.to(device), mask.to(device)), return_dict=False)[0]
        loss = F.mse_loss(v, noise - x0)
        flow_matching_step(loss, opt, models, ema, step, cfg.ema_decay)
        losses.append(loss.item())
        if step % 50 == 0:
            print(f"step {step} loss {np.mean(losses[-50:]):.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < run:
            save(out, ema["transformer"], vae, ema["encoder"])
            print(f"checkpoint at step {step + 1}", flush=True)
        step += 1
    return ema["transformer"], ema["encoder"], losses


#: With ``minutes`` set, the rate is measured over these transformer steps (the first ones warm up kernels and caches).
PROBE_STEPS = (10, 40)


def steps_for_minutes(minutes: float, probe_start: float, probe: tuple[int, int], warmup: int) -> int:
    """Transformer steps that fill ``minutes`` at the rate measured since ``probe_start`` over the ``probe`` steps
    (at least the probe and the warm-up); the cosine schedule is fixed from then on."""
    rate = (time.perf_counter() - probe_start) / (probe[1] - probe[0])
    return max(probe[1], warmup + 1, int(minutes * 60 / rate))


def where(config: dict) -> str:
    """Where a run trained, for its figure and log: "2 CPU threads" or the CUDA device's name."""
    device = config.get("device", "cpu")
    if device == "cpu":
        return f"{config['threads']} CPU threads"
    return torch.cuda.get_device_name(device) if torch.cuda.is_available() else device


def write_loss_logs(vae_losses: list[float], losses: list[float], decoder_losses: list[float], log_dir: Path,
                    meta: dict) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "loss.json").write_text(json.dumps(
        {"meta": meta, "vae_reconstruction_mse": vae_losses, "transformer_flow_matching_mse": losses,
         "decoder_finetune_mse": decoder_losses}))
    panels = [(vae_losses, "1. VAE reconstruction MSE"), (losses, "3. transformer flow-matching MSE (velocity)")]
    if decoder_losses:
        panels.append((decoder_losses, "4. decoder fine-tune MSE (encoder frozen)"))
    loss_figure(
        panels,
        f"video reference model training (seed {meta['seed']}, {meta['total_seconds']:.0f} s, {where(meta['config'])})",
        log_dir / "loss.png",
        dpi=100,
    )


def train(cfg: TrainConfig, out: Path, log_dir: Path) -> dict:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    vae, vae_losses = train_vae(cfg)
    t_vae = time.perf_counter() - t0
    vae.save_pretrained(out / "vae", safe_serialization=True)  # early, for inspection; overwritten at the end
    mean, std, prompts, recon = encode_pool(cfg, vae)
    t_pool = time.perf_counter() - t0
    print(f"VAE {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M params, {t_vae:.0f} s; pool of "
          f"{len(prompts)} clips encoded by {t_pool:.0f} s; recon MSE {recon:.5f}; "
          f"latents_mean {vae.config.latents_mean} latents_std {vae.config.latents_std}", flush=True)
    transformer, encoder, losses = train_transformer(cfg, vae, mean, std, prompts, out)
    t_transformer = time.perf_counter() - t0
    decoder_losses = finetune_decoder(cfg, vae) if cfg.decoder_steps else []
    total = time.perf_counter() - t0
    meta = {"seed": cfg.seed, "config": dataclasses.asdict(cfg), "num_frames": NUM_FRAMES,
            "vae_seconds": round(t_vae, 1), "pool_seconds": round(t_pool - t_vae, 1),
            "transformer_seconds": round(t_transformer - t_pool, 1),
            "decoder_seconds": round(total - t_transformer, 1), "total_seconds": round(total, 1),
            "vae_reconstruction_mse": recon,
            "transformer_params": sum(p.numel() for p in transformer.parameters()),
            "vae_params": sum(p.numel() for p in vae.parameters()),
            "encoder_params": sum(p.numel() for p in encoder.parameters()), "torch": torch.__version__,
            "trained_on": where(dataclasses.asdict(cfg))}
    save(out, transformer, vae, encoder, meta)
    write_loss_logs(vae_losses, losses, decoder_losses, log_dir, meta)
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 1e6
    print(f"saved to {out} ({size:.2f} MB of safetensors); total {total:.0f} s ({total / 60:.1f} min)", flush=True)
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS_DIR)
    parser.add_argument("--log-dir", type=Path, default=PACKAGE_DIR)
    parser.add_argument("--vae-steps", type=int, default=None, help="override (quick trials)")
    parser.add_argument("--steps", type=int, default=None, help="override transformer steps (quick trials)")
    parser.add_argument("--pool-size", type=int, default=None, help="override (quick trials)")
    parser.add_argument("--decoder-steps", type=int, default=None, help="override (quick trials)")
    parser.add_argument("--batch-size", type=int, default=None, help="override the transformer's batch")
    parser.add_argument("--lr", type=float, default=None, help="override the transformer's peak learning rate")
    parser.add_argument("--device", default=None, help='"cpu" (default) or "cuda"')
    parser.add_argument("--minutes", type=float, default=None,
                        help="choose the transformer steps to fill this many minutes, at the rate measured over its "
                             "first steps (instead of --steps; the chosen count is in train_config.json)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = TrainConfig(seed=args.seed)
    if args.device is not None and args.device != "cpu" and not torch.cuda.is_available():
        parser.error(f"--device {args.device} asks for a GPU and torch sees none here; leave --device out to train "
                     "on the CPU.")
    if args.minutes is not None and (args.minutes <= 0 or args.steps is not None):
        parser.error("--minutes takes a positive number of minutes and replaces --steps; pass one of them.")
    for name in ("vae_steps", "steps", "pool_size", "decoder_steps", "batch_size", "lr", "device", "minutes"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    train(cfg, args.out, args.log_dir)


if __name__ == "__main__":
    main()
