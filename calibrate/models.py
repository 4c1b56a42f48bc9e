"""Load the pipeline a ``conf/model/<name>.yaml`` describes, and call it for one prompt and seed.

Three sources:
- ``hub``: a real checkpoint, ``from_pretrained(model.path)`` (a hub id or a local folder); prompts go
  through the pipeline's own text encoder;
- ``tiny``: a tiny random-init pipeline of a real diffusers class (calibrate.tiny); prompts map to
  embeddings seeded by their text;
- ``reference``: the trained reference model shipped in this repository (reference/);
- ``reference_video``: the trained video reference model shipped in this repository (reference_video/).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from diffusers import DiffusionPipeline

from runtime.errors import TeaCacheError

from .recipe import Recipe


def output_array(output: Any) -> np.ndarray:
    """The first image (or video) of a pipeline output made with ``output_type="np"``, float32."""
    array = output.frames if hasattr(output, "frames") else output.images
    return np.asarray(array[0], dtype=np.float32)


class ModelLoadError(TeaCacheError):
    """The model's weights or pipeline class cannot be loaded."""


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ModelLoadError(f"dtype={name!r} is not one of {', '.join(_DTYPES)}; pass one of those.")
    return _DTYPES[name]


def resolve_device(name: str) -> str:
    """``auto`` (cuda when torch sees one, else cpu) or a torch device that exists on this machine."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(name, str):
        raise ModelLoadError(f"device={name!r} is not a device name; pass device=auto, cpu, cuda or cuda:<index>.")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ModelLoadError(
            f"device={name} is not a device torch knows; pass device=auto, cpu, cuda or cuda:<index>."
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device={name} was asked for but torch sees no CUDA device; pass device=cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"device={name} was asked for but torch sees {torch.cuda.device_count()} CUDA device(s); pass "
                f"device=cuda:0 up to cuda:{torch.cuda.device_count() - 1}, or device=cpu."
            )
    elif device.type != "cpu":
        backend = getattr(torch, device.type, None)
        available = getattr(backend, "is_available", None)
        if not callable(available) or not available():
            raise ModelLoadError(
                f"device={name} was asked for but torch has no usable {device.type} backend here; pass "
                "device=auto, cpu or cuda."
            )
    return name


@dataclass
class LoadedModel:
    """A pipeline plus how to turn a prompt into its keyword arguments."""

    name: str
    pipe: DiffusionPipeline
    prompt_kwargs: Callable[[str, str | None], dict[str, Any]]
    guidance_kwarg: str
    call_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipe.transformer

    def generate(self, prompt: str, seed: int, recipe: Recipe, output_type: str = "latent") -> Any:
        """One pipeline call with the recipe's settings; the seed drives a CPU generator (device independent)."""
        kwargs = {
            **self.call_kwargs,
            **self.prompt_kwargs(prompt, recipe.negative_prompt),
            "num_inference_steps": recipe.num_inference_steps,
            "height": recipe.height,
            "width": recipe.width,
        }
        if recipe.guidance is not None:
            kwargs[self.guidance_kwarg] = recipe.guidance
        if recipe.num_frames is not None:
            kwargs["num_frames"] = recipe.num_frames
        generator = torch.Generator().manual_seed(int(seed))
        return self.pipe(**kwargs, generator=generator, output_type=output_type)


def load_model(model_cfg: Any, device: str, dtype: torch.dtype) -> LoadedModel:
    """Build the pipeline a model config describes, on ``device`` in ``dtype``."""
    source = model_cfg.source
    edit_images = _edit_images(model_cfg)
    if source == "tiny":
        from .tiny import build_tiny_pipeline, tiny_prompt_embeds

        pipe = _to(build_tiny_pipeline(model_cfg.family, seed=int(model_cfg.get("seed", 0))), device, dtype)
        family = model_cfg.family

        def prompt_kwargs(prompt: str, negative: str | None) -> dict[str, Any]:
            return tiny_prompt_embeds(pipe, family, prompt, negative)

    elif source == "tiny_loop":
        from .tiny import TinyTransformerLoop

        pipe = TinyTransformerLoop(model_cfg.family, seed=int(model_cfg.get("seed", 0))).to(device, dtype)

        def prompt_kwargs(prompt: str, negative: str | None) -> dict[str, Any]:
            return {"prompt": prompt, "negative_prompt": negative}

    elif source in ("reference", "reference_video"):
        pipe, prompt_kwargs = _trained_model(source, model_cfg.get("path"), device, dtype)

    elif source == "hub":
        pipe = _from_pretrained(model_cfg, dtype).to(device)

        def prompt_kwargs(prompt: str, negative: str | None) -> dict[str, Any]:
            return {"prompt": prompt} if negative is None else {"prompt": prompt, "negative_prompt": negative}

    else:
        raise ModelLoadError(
            f"model.source={source!r} in model config {model_cfg.name!r} is not one of hub, tiny, tiny_loop, reference, reference_video."
        )
    if edit_images is not None:
        prompt_kwargs = _with_edit_images(prompt_kwargs, edit_images)
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(
        name=model_cfg.name,
        pipe=pipe,
        prompt_kwargs=prompt_kwargs,
        guidance_kwarg=model_cfg.guidance_kwarg,
        call_kwargs=dict(model_cfg.get("call_kwargs") or {}),
    )


def _trained_model(source: str, path: Any, device: str, dtype: torch.dtype) -> tuple[Any, Callable[[str, str | None], dict[str, Any]]]:
    """A trained model shipped in this repository (``reference``: digits, ``reference_video``: shapes clips):
    its pipeline, and how its own prompt encoder turns a prompt into the pipeline's embeddings."""
    if source == "reference":
        from reference.pipeline import load_reference_pipeline as load
        from reference.pipeline import reference_prompt_kwargs as embeddings
    else:
        from reference_video.pipeline import load_video_pipeline as load
        from reference_video.pipeline import video_prompt_kwargs as embeddings
    try:
        pipe, encoder = load(path, device=device, dtype=dtype)
    except FileNotFoundError as exc:
        raise ModelLoadError(str(exc)) from None

    def prompt_kwargs(prompt: str, negative: str | None) -> dict[str, Any]:
        return embeddings(encoder, prompt, negative, device=device)

    return pipe, prompt_kwargs


def _edit_images(model_cfg: Any) -> list[Path] | None:
    """The input images of an image-editing hub pipeline (checked before anything loads), else None."""
    folder = model_cfg.get("edit_images")
    if folder is None and not str(model_cfg.get("pipeline") or "").endswith("EditPipeline"):
        return None
    if folder is None:
        raise ModelLoadError(
            f"model={model_cfg.name} is an image-editing pipeline and needs an input image per prompt; pass "
            "model.edit_images=/folder/of/images (png, jpg or webp)."
        )
    files = sorted(p for p in Path(folder).glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not files:
        raise ModelLoadError(f"model.edit_images={folder} holds no png, jpg or webp images; point it at a folder of input images.")
    return files


def _with_edit_images(prompt_kwargs: Callable[[str, str | None], dict[str, Any]], files: list[Path]) -> Callable[[str, str | None], dict[str, Any]]:
    """An edit pipeline's prompts each need an input image: ``files`` handed out by the prompt's stable hash
    (the same prompt always edits the same image)."""

    def with_image(prompt: str, negative: str | None) -> dict[str, Any]:
        from PIL import Image

        index = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "little") % len(files)
        return {**prompt_kwargs(prompt, negative), "image": Image.open(files[index]).convert("RGB")}

    return with_image


def _to(pipe: DiffusionPipeline, device: str, dtype: torch.dtype) -> DiffusionPipeline:
    """Move a float32 pipeline; cast only when asked for another dtype (diffusers warns on a no-op cast)."""
    pipe = pipe.to(device)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def _from_pretrained(model_cfg: Any, dtype: torch.dtype) -> DiffusionPipeline:
    from hydra.utils import get_class

    pipeline_cls = get_class(model_cfg.pipeline)
    try:
        return pipeline_cls.from_pretrained(model_cfg.path, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"the weights of model={model_cfg.name} could not be loaded from {model_cfg.path!r} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); download them and pass "
            "model.path=/local/dir, or check the path."
        ) from None
