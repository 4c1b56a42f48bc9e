"""Image quality against the full-compute output of the same prompt and seed: PSNR, SSIM, LPIPS, and a
perceptual score from the reference model's own judge.

Images are float arrays in [0, 1], ``[H, W, C]`` or ``[frames, H, W, C]`` (video: mean over frames).
PSNR and SSIM need no weights; LPIPS runs only when the ``lpips`` package and its backbone weights are
already on disk (nothing is downloaded), and is reported as skipped otherwise. :class:`Perceptual` needs
no download either: for the digits reference model it is the digit classifier of reference/classifier.py
(agreement of its predicted digit, and the distance in its kernel's feature space); for the video
reference model the procedural checker of reference_video/checker.py (agreement of its pass/fail).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import gaussian_filter


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB for a peak of 1; ``inf`` for identical images."""
    mse = float(np.mean((np.asarray(image, np.float64) - np.asarray(reference, np.float64)) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)


def psnr_of_mse(mse: float, cap: float = 100.0) -> float:
    """PSNR in dB (peak 1) of a mean squared error, at most ``cap``: an output identical to full compute counts as
    ``cap``, so that means over outputs stay finite. The sweep's schedule search and the benches score with it."""
    return cap if mse <= 0 else min(cap, 10.0 * math.log10(1.0 / mse))


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


class Perceptual:
    """The reference model's own judge, cached output against full compute; ``available`` False for other models.

    ``__call__(image, reference, prompt)`` returns ``(agrees, distance)``:

    - ``reference`` (digits): ``agrees`` is whether the digit classifier predicts the same digit for both;
      ``distance`` is their distance in the feature space of its RBF kernel, ``sqrt(2 - 2 k(a, b))`` with
      ``k(a, b) = exp(-gamma |f(a) - f(b)|^2)`` on its 8x8 features: 0 for identical inputs, sqrt(2) for
      unrelated ones;
    - ``reference_video`` (shapes): ``agrees`` is whether the checker passes or fails both clips against the
      prompt alike; ``distance`` is None (the checker has no embedding).
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.available = source in ("reference", "reference_video")
        self.description = {
            "reference": "digit classifier (reference/classifier.py): agreement = fraction of outputs whose predicted "
            "digit equals full compute's; feature_distance = mean distance in its RBF kernel's feature space, "
            "sqrt(2 - 2 k(a, b)): 0 identical, 1.414 unrelated",
            "reference_video": "clip checker (reference_video/checker.py): agreement = fraction of outputs it passes or "
            "fails alike with full compute; no feature distance",
        }.get(source, f"skipped: no judge for model source {source!r}")

    def __call__(self, image: np.ndarray, reference: np.ndarray, prompt: str) -> tuple[bool | None, float | None]:
        if self.source == "reference":
            from reference.classifier import get_classifier, to_features

            classifier = get_classifier().model
            features = to_features(np.stack([np.asarray(image, np.float32), np.asarray(reference, np.float32)]))
            labels = classifier.predict(features)
            squared = float(np.sum((features[0].astype(np.float64) - features[1]) ** 2))
            kernel = math.exp(-float(classifier._gamma) * squared)
            return bool(labels[0] == labels[1]), math.sqrt(max(0.0, 2.0 - 2.0 * kernel))
        if self.source == "reference_video":
            from reference_video.checker import check_clip

            return check_clip(image, prompt).passed == check_clip(reference, prompt).passed, None
        return None, None
