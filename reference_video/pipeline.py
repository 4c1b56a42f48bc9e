"""Load the trained video reference model as a diffusers ``WanPipeline`` and build its prompt arguments.

Example::

    from reference_video.pipeline import RECIPE, load_video_pipeline, video_prompt_kwargs

    pipe, encoder = load_video_pipeline()
    clips = pipe(
        **video_prompt_kwargs(encoder, ["a big red circle moving right"], RECIPE["negative_prompt"]),
        **pipeline_recipe(),
        output_type="np",
    ).frames  # [1, 9, 32, 32, 3] in [0, 1]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import WanPipeline

from reference.pipeline import load_offline
from reference_video.prompt_encoder import ShapesPromptEncoder

DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

#: The sampling recipe the model was trained and checked for; ``negative_prompt`` goes to
#: :func:`video_prompt_kwargs` (it becomes ``negative_prompt_embeds``), the rest to the pipeline.
RECIPE: dict[str, Any] = {
    "height": 32,
    "width": 32,
    "num_frames": 9,
    "num_inference_steps": 20,
    "guidance_scale": 5.0,
    "negative_prompt": "",
}


def pipeline_recipe() -> dict[str, Any]:
    """:data:`RECIPE` without ``negative_prompt``: the keyword arguments ``WanPipeline.__call__`` takes as is."""
    return {k: v for k, v in RECIPE.items() if k != "negative_prompt"}


class VideoWeightsMissingError(FileNotFoundError):
    """The video reference model's weights are not on disk."""


def load_video_pipeline(
    path: str | Path | None = None, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[WanPipeline, ShapesPromptEncoder]:
    """Load the ``WanPipeline`` (no text encoder, no tokenizer) and its prompt encoder, offline.

    Raises:
        VideoWeightsMissingError: when the weights folder or one of its parts is missing.
    """
    path = Path(path) if path is not None else DEFAULT_WEIGHTS_DIR
    for part in ("model_index.json", "transformer", "vae", "scheduler", "prompt_encoder"):
        if not (path / part).exists():
            raise VideoWeightsMissingError(
                f"The video reference model's weights are missing at {path} (no {part}); produce them with "
                "`python -m reference_video.train --seed 0` (under an hour on a 2-core CPU)."
            )
    return load_offline(WanPipeline, ShapesPromptEncoder, path, device, dtype)


def video_prompt_kwargs(
    encoder: ShapesPromptEncoder,
    prompt: str | Sequence[str],
    negative_prompt: str | Sequence[str] | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """``prompt_embeds`` (and ``negative_prompt_embeds`` unless ``negative_prompt`` is None) for ``WanPipeline``.

    With ``guidance_scale > 1`` and a negative prompt the pipeline makes a "cond" and an "uncond" transformer call
    per step, as Wan does.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    kwargs = {"prompt_embeds": encoder.encode(prompts, device=device)}
    if negative_prompt is not None:
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"Got {len(negatives)} negative prompts for {len(prompts)} prompts; pass one or as many.")
        kwargs["negative_prompt_embeds"] = encoder.encode(negatives, device=device)
    return kwargs
