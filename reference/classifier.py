"""A digit classifier to check what the reference model draws.

An RBF support-vector machine on 8x8 images, trained in about a second on scikit-learn's digits the first time
:func:`classify` is called (nothing is stored on disk). Images of any size are converted to gray and area-averaged
down to 8x8; the training images go through the same path (upsampled to 32x32 like the reference model's
training data, then back down), so real and generated digits are compared on equal terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.svm import SVC

from reference.data import IMAGE_SIZE, upsample_digits

#: Fraction of the digits held out to measure the classifier's accuracy.
HELD_OUT_FRACTION = 0.25


@dataclass(frozen=True)
class DigitClassifier:
    """A fitted classifier and its accuracy on held-out real digits."""

    model: SVC
    held_out_accuracy: float
    n_train: int
    n_held_out: int


def to_features(images: np.ndarray) -> np.ndarray:
    """Images [N, H, W], [N, H, W, 1] or [N, H, W, 3] in [0, 1] -> features [N, 64] (gray 8x8, area-averaged)."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 4:
        x = x.mean(axis=-1)
    if x.ndim != 3:
        raise ValueError(f"Expected images [N, H, W] or [N, H, W, C], got shape {np.asarray(images).shape}.")
    t = torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(1)
    t = F.interpolate(t, size=(8, 8), mode="area")
    return t.reshape(t.shape[0], 64).numpy()


@lru_cache(maxsize=1)
def get_classifier(seed: int = 0) -> DigitClassifier:
    """Fit the classifier on 75% of the digits (stratified split from ``seed``); cached per process."""
    digits = load_digits()
    images = upsample_digits(digits.images, IMAGE_SIZE)[:, 0].numpy()
    features = to_features(images)
    x_train, x_test, y_train, y_test = train_test_split(
        features, digits.target, test_size=HELD_OUT_FRACTION, random_state=seed, stratify=digits.target
    )
    model = SVC(C=10.0, gamma="scale")
    model.fit(x_train, y_train)
    accuracy = float((model.predict(x_test) == y_test).mean())
    return DigitClassifier(model=model, held_out_accuracy=accuracy, n_train=len(y_train), n_held_out=len(y_test))


def classify(images: np.ndarray) -> np.ndarray:
    """Digit labels [N] (int64) of images [N, H, W, 3 or 1] (or [N, H, W]) with values in [0, 1]."""
    return get_classifier().model.predict(to_features(images)).astype(np.int64)
