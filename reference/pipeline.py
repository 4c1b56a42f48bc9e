"""Load the trained reference model as a diffusers ``QwenImagePipeline`` and build its prompt arguments.

Example::

    from reference.pipeline import REFERENCE_RECIPE, load_reference_pipeline, reference_prompt_kwargs

    pipe, encoder = load_reference_pipeline()
    recipe = {k: v for k, v in REFERENCE_RECIPE.items() if k != "negative_prompt"}
    images = pipe(
        **reference_prompt_kwargs(encoder, ["the digit 3", "seven"], REFERENCE_RECIPE["negative_prompt"]),
        **recipe,
        output_type="np",
    ).images  # [2, 32, 32, 3] in [0, 1]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import QwenImagePipeline

from reference.prompt_encoder import PromptEncoder

DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

#: The sampling recipe the reference model was trained and checked for. ``negative_prompt`` is not a pipeline
#: argument here: pass it to :func:`reference_prompt_kwargs`, which turns it into ``negative_prompt_embeds``.
REFERENCE_RECIPE: dict[str, Any] = {
    "height": 32,
    "width": 32,
    "num_inference_steps": 25,
    "true_cfg_scale": 4.0,
    "negative_prompt": "",
}


class ReferenceWeightsMissingError(FileNotFoundError):
    """The reference model's weights are not on disk."""


def _check_weights(path: Path) -> None:
    needed = [path / "model_index.json", path / "transformer", path / "vae", path / "prompt_encoder"]
    missing = [p for p in needed if not p.exists()]
    if missing:
        raise ReferenceWeightsMissingError(
            f"The reference model's weights are missing at {path} (no {missing[0].name}); "
            "produce them with `python -m reference.train` (about 20 minutes on one CPU thread)."
        )


def load_offline(pipeline_cls: type, encoder_cls: type, path: Path, device: torch.device | str, dtype: torch.dtype):
    """A trained reference pipeline without text encoder and tokenizer, and its prompt encoder (in
    ``path / "prompt_encoder"``), from local files only, on ``device``; the progress bar off, the encoder in eval
    mode. Both reference models load through it."""
    pipe = pipeline_cls.from_pretrained(path, text_encoder=None, tokenizer=None, dtype=dtype, local_files_only=True)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    encoder = encoder_cls.from_pretrained(path / "prompt_encoder", dtype=dtype, local_files_only=True)
    encoder.to(device).eval()
    return pipe, encoder


def load_reference_pipeline(
    path: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[QwenImagePipeline, PromptEncoder]:
    """Load the reference ``QwenImagePipeline`` (no text encoder, no tokenizer) and its prompt encoder, offline.

    Args:
        path: the weights folder (``reference/weights/`` by default), as written by ``python -m reference.train``.
        device: where to put the models.
        dtype: dtype of the transformer, VAE and prompt encoder.

    Raises:
        ReferenceWeightsMissingError: when the weights folder or one of its parts is missing.
    """
    path = Path(path) if path is not None else DEFAULT_WEIGHTS_DIR
    _check_weights(path)
    return load_offline(QwenImagePipeline, PromptEncoder, path, device, dtype)


def reference_prompt_kwargs(
    encoder: PromptEncoder,
    prompt: str | Sequence[str],
    negative_prompt: str | Sequence[str] | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """The ``QwenImagePipeline.__call__`` keyword arguments that carry the prompts as embeddings.

    Args:
        encoder: the reference prompt encoder.
        prompt: one prompt or a batch.
        negative_prompt: None for no classifier-free guidance; otherwise one negative prompt (used for every
            prompt of the batch) or one per prompt. With ``true_cfg_scale > 1`` the pipeline then makes a "cond"
            and an "uncond" transformer call per step.
        device: where the tensors go (the encoder's device by default).

    Returns:
        ``prompt_embeds`` and ``prompt_embeds_mask``, plus ``negative_prompt_embeds`` and
        ``negative_prompt_embeds_mask`` when ``negative_prompt`` is not None.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    embeds, mask = encoder.encode(prompts, device=device)
    kwargs: dict[str, torch.Tensor] = {"prompt_embeds": embeds, "prompt_embeds_mask": mask}
    if negative_prompt is not None:
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"Got {len(negatives)} negative prompts for {len(prompts)} prompts; pass one or as many.")
        neg_embeds, neg_mask = encoder.encode(negatives, device=device)
        kwargs["negative_prompt_embeds"] = neg_embeds
        kwargs["negative_prompt_embeds_mask"] = neg_mask
    return kwargs
