"""The training images: scikit-learn's 8x8 handwritten digits, upsampled for the VAE."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

#: Side of the square images the reference model is trained on and generates.
IMAGE_SIZE = 32
#: Largest pixel value of scikit-learn's digits (they are 0..16 integers).
DIGITS_MAX_VALUE = 16.0


def upsample_digits(images_8x8: np.ndarray, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Upsample 8x8 digit images (values 0..16) to ``size`` x ``size`` with bicubic interpolation.

    Args:
        images_8x8: array [N, 8, 8] with values in 0..16 (scikit-learn's ``load_digits().images``).
        size: output side in pixels.

    Returns:
        float32 tensor [N, 1, size, size] with values in [0, 1] (white digit on a black background).
    """
    x = torch.as_tensor(np.asarray(images_8x8), dtype=torch.float32).unsqueeze(1) / DIGITS_MAX_VALUE
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return x.clamp(0.0, 1.0)


def load_digit_images(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits of ``sklearn.datasets.load_digits`` as training images.

    Returns:
        ``(images, labels)``: images float32 [N, 1, size, size] in [0, 1]; labels int64 [N] in 0..9.
    """
    digits = load_digits()
    images = upsample_digits(digits.images, size)
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    return images, labels
