"""Image quality against the full-compute output of the same prompt and seed: PSNR, SSIM, LPIPS.

Images are float arrays in [0, 1], ``[H, W, C]`` or ``[frames, H, W, C]`` (video: mean over frames).
PSNR and SSIM need no weights; LPIPS runs only when the ``lpips`` package and its backbone weights are
already on disk (nothing is downloaded), and is reported as skipped otherwise.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import gaussian_filter


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB for a peak of 1; ``inf`` for identical images."""
    mse = float(np.mean((np.asarray(image, np.float64) - np.asarray(reference, np.float64)) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)


def ssim(image: np.ndarray, reference: np.ndarray, sigma: float = 1.5) -> float:
    """Structural similarity (Wang et al. 2004): Gaussian window sigma 1.5, K1 0.01, K2 0.03, peak 1.

    Computed per channel on each frame and averaged.
    """
    a = np.asarray(image, np.float64)
    b = np.asarray(reference, np.float64)
    if a.ndim == 3:
        a, b = a[None], b[None]
    c1, c2 = 0.01**2, 0.03**2
    scores = []
    for frame_a, frame_b in zip(a, b):
        for ch in range(frame_a.shape[-1]):
            x, y = frame_a[..., ch], frame_b[..., ch]
            blur = lambda v: gaussian_filter(v, sigma, mode="reflect", truncate=3.5)  # noqa: E731
            mx, my = blur(x), blur(y)
            vx, vy, cov = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
            num = (2 * mx * my + c1) * (2 * cov + c2)
            den = (mx * mx + my * my + c1) * (vx + vy + c2)
            scores.append(float(np.mean(num / den)))
    return float(np.mean(scores))


class Lpips:
    """LPIPS (AlexNet) when the ``lpips`` package and its weights are on disk; else ``available`` is False."""

    def __init__(self) -> None:
        self.available, self.reason, self._model = False, "", None
        try:
            import lpips  # noqa: F401
            import torch

            hub = torch.hub.get_dir()
            import glob

            if not glob.glob(f"{hub}/checkpoints/alexnet-*.pth"):
                self.reason = f"AlexNet weights not in {hub}/checkpoints (nothing is downloaded)"
                return
            self._model = lpips.LPIPS(net="alex", verbose=False)
            self.available = True
        except ImportError:
            self.reason = "the lpips package is not installed"

    def __call__(self, image: np.ndarray, reference: np.ndarray) -> float | None:
        if not self.available:
            return None
        import torch

        def to_tensor(v: np.ndarray) -> torch.Tensor:
            v = np.asarray(v, np.float32)
            v = v if v.ndim == 4 else v[None]
            return torch.from_numpy(v).permute(0, 3, 1, 2) * 2 - 1

        with torch.no_grad():
            return float(self._model(to_tensor(image), to_tensor(reference)).mean())
