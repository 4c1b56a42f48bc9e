"""A sampling recipe: the settings a coefficients file is tied to (steps, size, guidance, negative prompt)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from runtime.errors import ConfigError


@dataclass(frozen=True)
class Recipe:
    num_inference_steps: int
    height: int
    width: int
    num_frames: int | None = None
    guidance: float | None = None
    negative_prompt: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.num_inference_steps, int) or self.num_inference_steps < 2:
            raise ConfigError(f"num_inference_steps must be an integer >= 2, got {self.num_inference_steps!r}.")
        for name in ("height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer (pixels), got {value!r}.")
        if self.num_frames is not None and (not isinstance(self.num_frames, int) or self.num_frames <= 0):
            raise ConfigError(f"num_frames must be a positive integer or null, got {self.num_frames!r}.")
        if self.guidance is not None and (not isinstance(self.guidance, (int, float)) or self.guidance < 0):
            raise ConfigError(f"guidance must be a number >= 0 or null, got {self.guidance!r}.")

    @classmethod
    def from_config(cls, cfg: Any) -> "Recipe":
        """From the record config's top-level keys (which default to the model's recipe)."""
        guidance = cfg.guidance
        return cls(
            num_inference_steps=cfg.num_inference_steps,
            height=cfg.height,
            width=cfg.width,
            num_frames=cfg.num_frames,
            guidance=float(guidance) if isinstance(guidance, (int, float)) else guidance,
            negative_prompt=cfg.negative_prompt,
        )

    def to_attrs(self) -> dict[str, Any]:
        """HDF5 attributes: a missing number is stored as NaN, a missing negative prompt is left out."""
        attrs = {k: (math.nan if v is None else v) for k, v in asdict(self).items() if k != "negative_prompt"}
        if self.negative_prompt is not None:
            attrs["negative_prompt"] = self.negative_prompt
        return attrs

    @classmethod
    def from_attrs(cls, attrs: Any) -> "Recipe":
        def number(name: str, kind: type) -> Any:
            value = attrs.get(name)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                return None
            return kind(value)

        negative = attrs.get("negative_prompt")
        return cls(
            num_inference_steps=number("num_inference_steps", int),
            height=number("height", int),
            width=number("width", int),
            num_frames=number("num_frames", int),
            guidance=number("guidance", float),
            negative_prompt=None if negative is None else str(negative),
        )

    def for_coefficients(self) -> dict[str, Any]:
        """The ``recipe`` object of a coefficients file."""
        return {k: v for k, v in asdict(self).items() if k != "negative_prompt"}
