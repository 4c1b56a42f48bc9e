"""A procedural checker: does a clip show what its prompt says? No learned weights.

For each object a prompt names ("a small red circle moving right and ..."), the checker finds the pixels of that
colour (nearest colour of the fixed palette, shape colours and background colours together, within a distance),
keeps the largest connected blob in each frame and checks

- presence: the blob has at least ``MIN_AREA`` pixels in at least ``MIN_PRESENT`` of the frames;
- shape, from moments of the colour's soft membership map around the blob (median over frames): a triangle (apex
  up) has a negative vertical skewness (-0.7 for a drawn one; circle and square 0); a square has a larger fourth
  cumulant along its diagonals than along its axes (normalized difference 0.6; circle 0). A symmetric blur (a
  decoder's softness) keeps both signs and the size of the fourth cumulant, only shrinking the normalized values,
  so the thresholds sit just outside what drawn circles reach (|skew| <= 0.03, |difference| <= 0.06);
- motion: the least-squares slope of the blob's centroid over the clip (pixels over the whole clip) and the
  ratio of its area at the end to its area at the start (for "growing").

A clip passes when every object passes every check; sizes are not checked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from reference_video.data import BACKGROUNDS, COLORS

_PALETTE_NAMES = list(COLORS) + [f"bg:{n}" for n in BACKGROUNDS]
_PALETTE = np.array(list(COLORS.values()) + list(BACKGROUNDS.values()), dtype=np.float32)
_PHRASE_RE = re.compile(
    r"\b(?:(small|big)\s+)?(red|green|blue|yellow)\s+(circle|square|triangle)\s+"
    r"(moving left|moving right|moving up|moving down|staying still|growing)\b"
)
#: A pixel takes the palette colour nearest to it if the Euclidean RGB distance is below this.
COLOR_TOLERANCE = 0.35
MIN_AREA = 6
MIN_PRESENT = 7
#: Vertical skewness below which a blob is a triangle; diagonal-minus-axis kurtosis above which it is a square.
TRIANGLE_SKEW, SQUARE_KURTOSIS = -0.1, 0.12
#: Membership of a pixel in a colour: 1 - distance / MEMBERSHIP_SCALE (clipped), near the blob only.
MEMBERSHIP_SCALE = 0.6
#: Displacement (pixels over the clip) under which an object is "staying still"; real movers go 12 px.
STILL_MAX = 4.0
#: Area ratio end / start above which an object is "growing" (real: about 6).
GROWING_MIN = 2.0


@dataclass(frozen=True)
class ObjectSpec:
    color: str
    shape: str
    motion: str
    size: str | None = None


@dataclass
class ObjectResult:
    spec: ObjectSpec
    present: bool
    shape: str | None = None
    motion: str | None = None
    skewness: float = float("nan")
    kurtosis: float = float("nan")
    displacement: tuple[float, float] = (float("nan"), float("nan"))
    growth: float = float("nan")

    @property
    def passed(self) -> bool:
        return self.present and self.shape == self.spec.shape and self.motion == self.spec.motion


@dataclass
class CheckResult:
    prompt: str
    objects: list[ObjectResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.objects) and all(o.passed for o in self.objects)


def parse_prompt(prompt: str) -> list[ObjectSpec]:
    """The objects a prompt names, in order; a ValueError for a prompt that names none."""
    specs = [ObjectSpec(c, s, m, z) for z, c, s, m in _PHRASE_RE.findall(prompt.lower())]
    if not specs:
        raise ValueError(f"The prompt {prompt!r} names no object the checker knows; write e.g. 'a red circle moving left'.")
    return specs


def color_labels(clip: np.ndarray) -> np.ndarray:
    """Palette index of every pixel, or -1 where no palette colour is within ``COLOR_TOLERANCE``: int [T, H, W]."""
    d = np.linalg.norm(clip[..., None, :].astype(np.float32) - _PALETTE, axis=-1)
    labels = d.argmin(-1)
    labels[d.min(-1) > COLOR_TOLERANCE] = -1
    return labels


def _shape_of(skew: float, kurtosis: float) -> str:
    return "triangle" if skew < TRIANGLE_SKEW else "square" if kurtosis > SQUARE_KURTOSIS else "circle"


def _moments(weights: np.ndarray) -> tuple[float, float]:
    """Vertical skewness and (diagonal - axis) normalized fourth cumulant of a weight map [H, W]."""
    ys, xs = np.nonzero(weights > 0)
    w = weights[ys, xs] / weights[ys, xs].sum()
    dx, dy = xs - (w * xs).sum(), ys - (w * ys).sum()
    var = (w * (dx**2 + dy**2)).sum() / 2.0

    def cumulant4(p: np.ndarray) -> float:
        return float((w * p**4).sum() - 3.0 * (w * p**2).sum() ** 2)

    u, v = (dx + dy) / np.sqrt(2.0), (dx - dy) / np.sqrt(2.0)
    kurt = (cumulant4(u) + cumulant4(v) - cumulant4(dx) - cumulant4(dy)) / 2.0 / var**2
    return float((w * dy**3).sum() / var**1.5), kurt


def _motion_of(dx: float, dy: float, growth: float) -> str:
    if growth >= GROWING_MIN:
        return "growing"
    if max(abs(dx), abs(dy)) < STILL_MAX:
        return "staying still"
    if abs(dx) >= abs(dy):
        return "moving right" if dx > 0 else "moving left"
    return "moving down" if dy > 0 else "moving up"


def check_object(clip: np.ndarray, labels: np.ndarray, spec: ObjectSpec) -> ObjectResult:
    mask = labels == _PALETTE_NAMES.index(spec.color)
    distance = np.linalg.norm(clip - np.asarray(COLORS[spec.color], dtype=np.float32), axis=-1)
    membership = np.clip(1.0 - distance / MEMBERSHIP_SCALE, 0.0, 1.0)
    frames, areas, skews, kurts, cx, cy = [], [], [], [], [], []
    for f, m in enumerate(mask):
        blobs, n = ndimage.label(m)
        if n == 0:
            continue
        sizes = ndimage.sum_labels(m, blobs, index=np.arange(1, n + 1))
        blob = blobs == (1 + int(np.argmax(sizes)))
        area = int(blob.sum())
        if area < MIN_AREA:
            continue
        ys, xs = np.nonzero(blob)
        frames.append(f)
        areas.append(area)
        skew, kurt = _moments(membership[f] * ndimage.binary_dilation(blob, iterations=2))
        skews.append(skew)
        kurts.append(kurt)
        cx.append(xs.mean())
        cy.append(ys.mean())
    if len(frames) < MIN_PRESENT:
        return ObjectResult(spec, present=False)
    t = np.asarray(frames, dtype=np.float64)
    span = len(mask) - 1
    dx = float(np.polyfit(t, cx, 1)[0] * span)
    dy = float(np.polyfit(t, cy, 1)[0] * span)
    growth = float(np.mean(areas[-3:]) / np.mean(areas[:3]))
    skew, kurt = float(np.median(skews)), float(np.median(kurts))
    return ObjectResult(spec, True, _shape_of(skew, kurt), _motion_of(dx, dy, growth), skew, kurt, (dx, dy), growth)


def check_clip(clip: np.ndarray, prompt: str) -> CheckResult:
    """Score one clip [T, H, W, 3] in [0, 1] against its prompt."""
    clip = np.asarray(clip, dtype=np.float32)
    if clip.ndim != 4 or clip.shape[-1] != 3:
        raise ValueError(f"A clip must be [frames, height, width, 3]; got shape {clip.shape}.")
    labels = color_labels(clip)
    return CheckResult(prompt, [check_object(clip, labels, spec) for spec in parse_prompt(prompt)])


def accuracy(clips: np.ndarray, prompts: list[str]) -> float:
    """Fraction of clips that pass against their prompts."""
    return float(np.mean([check_clip(c, p).passed for c, p in zip(clips, prompts)]))
