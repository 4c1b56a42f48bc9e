"""Procedural training clips: coloured shapes moving on plain or two-tone backgrounds, with their prompts.

Everything is numpy and seeded; :func:`sample_scene` draws one scene's parameters from a ``numpy.random.Generator``,
:func:`render` rasterizes it and :func:`scene_prompt` writes the compositional prompt from the same parameters,
e.g. "a small red circle moving right and a big blue square staying still". The stream is infinite
(:func:`batches`); colour x shape pairs in :data:`HELDOUT_PAIRS` never appear in training scenes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

#: Frames per clip ((num_frames - 1) % 4 == 0, as Wan requires) and the side of a frame in pixels.
NUM_FRAMES = 9
SIZE = 32

#: Shape colours (RGB in [0, 1]); saturated, far from every background.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.12, 0.10),
    "green": (0.10, 0.85, 0.15),
    "blue": (0.15, 0.35, 1.00),
    "yellow": (0.98, 0.90, 0.10),
}
#: Background colours: unsaturated, from black to light, so a shape's colour is never confused with them (each is at
#: least 0.55 from every shape colour in RGB). Light and dark backgrounds make the latents' energy, and so the
#: trajectory's relative change per step, depend on the content, not only on the step.
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.0, 0.0, 0.0),
    "gray": (0.30, 0.30, 0.30),
    "slate": (0.12, 0.14, 0.22),
    "white": (0.85, 0.85, 0.85),
    "beige": (0.75, 0.68, 0.55),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Half-extent in pixels of each size word.
SIZES: dict[str, float] = {"small": 4.5, "big": 6.5}
#: Motion word -> velocity in pixels per frame (dx, dy); "growing" scales the shape instead.
MOTIONS: dict[str, tuple[float, float]] = {
    "moving left": (-1.5, 0.0),
    "moving right": (1.5, 0.0),
    "moving up": (0.0, -1.5),
    "moving down": (0.0, 1.5),
    "staying still": (0.0, 0.0),
    "growing": (0.0, 0.0),
}
#: Growth of the half-extent over the clip for "growing" (first frame -> last frame).
GROW_FROM, GROW_TO = 3.0, 7.5
#: Colour x shape pairs never drawn in training; the held-out prompt set uses them.
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset({("red", "triangle"), ("green", "circle"), ("blue", "square")})


@dataclass(frozen=True)
class Shape:
    """One object of a scene."""

    color: str
    shape: str
    size: str
    motion: str
    x0: float  # centre in the first frame (pixels)
    y0: float

    def track(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Centre x, centre y and half-extent in every frame, arrays [NUM_FRAMES]."""
        t = np.arange(NUM_FRAMES, dtype=np.float64)
        dx, dy = MOTIONS[self.motion]
        if self.motion == "growing":
            half = GROW_FROM + (GROW_TO - GROW_FROM) * t / (NUM_FRAMES - 1)
        else:
            half = np.full(NUM_FRAMES, SIZES[self.size])
        return self.x0 + dx * t, self.y0 + dy * t, half

    def phrase(self) -> str:
        size = "" if self.motion == "growing" else f"{self.size} "
        return f"a {size}{self.color} {self.shape} {self.motion}"


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: tuple[str, ...]  # one colour, or two for a two-tone background
    split: str = "none"  # "none", "vertical" (left/right) or "horizontal" (top/bottom)


def scene_prompt(scene: Scene) -> str:
    """The compositional prompt of a scene: its shapes' phrases joined by "and"."""
    return " and ".join(s.phrase() for s in scene.shapes)


def _start(rng: np.random.Generator, motion: str, half: float) -> tuple[float, float]:
    dx, dy = MOTIONS[motion]
    span = NUM_FRAMES - 1
    margin = half + 1.0
    lo_x, hi_x = margin - min(0.0, dx * span), SIZE - margin - max(0.0, dx * span)
    lo_y, hi_y = margin - min(0.0, dy * span), SIZE - margin - max(0.0, dy * span)
    return float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y))


def _separated(a: Shape, b: Shape) -> bool:
    ax, ay, ah = a.track()
    bx, by, bh = b.track()
    return bool(np.all(np.maximum(np.abs(ax - bx), np.abs(ay - by)) > ah + bh + 2.0))


def sample_shape(rng: np.random.Generator, heldout: bool = False, exclude_colors: tuple[str, ...] = ()) -> Shape:
    """One random object; its colour x shape pair is held out iff ``heldout``."""
    colors = [c for c in COLORS if c not in exclude_colors]
    while True:
        color, shape = colors[rng.integers(len(colors))], SHAPES[rng.integers(len(SHAPES))]
        if ((color, shape) in HELDOUT_PAIRS) == heldout:
            break
    size = list(SIZES)[rng.integers(len(SIZES))]
    motion = list(MOTIONS)[rng.integers(len(MOTIONS))]
    half = GROW_TO if motion == "growing" else SIZES[size]
    x0, y0 = _start(rng, motion, half)
    return Shape(color, shape, size, motion, x0, y0)


def sample_scene(rng: np.random.Generator, heldout: bool = False, max_shapes: int = 2) -> Scene:
    """A random scene of 1..max_shapes objects of distinct colours that never touch.

    With ``heldout`` the first object's colour x shape pair is a held-out one (the others are not).
    """
    n = int(rng.integers(1, max_shapes + 1))
    shapes = [sample_shape(rng, heldout=heldout)]
    for _ in range(n - 1):
        for _attempt in range(60):
            cand = sample_shape(rng, exclude_colors=tuple(s.color for s in shapes))
            if all(_separated(cand, s) for s in shapes):
                shapes.append(cand)
                break
    names = list(BACKGROUNDS)
    split = ("none", "vertical", "horizontal")[rng.integers(3)]
    if split == "none":
        background: tuple[str, ...] = (names[rng.integers(len(names))],)
    else:
        i, j = rng.choice(len(names), size=2, replace=False)
        background = (names[i], names[j])
    return Scene(tuple(shapes), background, split)


def _coverage(shape: str, px: np.ndarray, py: np.ndarray, cx: float, cy: float, half: float) -> np.ndarray:
    """Antialiased coverage in [0, 1] of a shape centred at (cx, cy) with half-extent ``half``."""
    dx, dy = px - cx, py - cy
    if shape == "circle":
        d = np.hypot(dx, dy) - half
    elif shape == "square":
        d = np.maximum(np.abs(dx), np.abs(dy)) - half
    elif shape == "triangle":  # apex up: (0, -h), (-h, h), (h, h)
        k = 1.0 / np.sqrt(5.0)  # unit normals of the slanted sides (2, -1)/sqrt5 and (-2, -1)/sqrt5
        d = np.maximum.reduce([dy - half, (2 * dx - dy - half) * k, (-2 * dx - dy - half) * k])
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.clip(0.5 - d, 0.0, 1.0)


_PY, _PX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) + 0.5


def render(scene: Scene, return_alpha: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """The clip of a scene: float32 [NUM_FRAMES, SIZE, SIZE, 3] in [0, 1] (and, with ``return_alpha``, the shapes'
    total coverage float32 [NUM_FRAMES, SIZE, SIZE])."""
    bg = np.empty((SIZE, SIZE, 3))
    bg[:] = BACKGROUNDS[scene.background[0]]
    if scene.split == "vertical":
        bg[:, SIZE // 2 :] = BACKGROUNDS[scene.background[1]]
    elif scene.split == "horizontal":
        bg[SIZE // 2 :] = BACKGROUNDS[scene.background[1]]
    video = np.repeat(bg[None], NUM_FRAMES, axis=0)
    alpha = np.zeros((NUM_FRAMES, SIZE, SIZE))
    for s in scene.shapes:
        xs, ys, hs = s.track()
        color = np.asarray(COLORS[s.color])
        for f in range(NUM_FRAMES):
            a = _coverage(s.shape, _PX, _PY, xs[f], ys[f], hs[f])[..., None]
            video[f] = (1 - a) * video[f] + a * color
            alpha[f] = np.maximum(alpha[f], a[..., 0])
    return (video.astype(np.float32), alpha.astype(np.float32)) if return_alpha else video.astype(np.float32)


def batches(seed: int, batch_size: int, heldout: bool = False) -> Iterator[tuple[np.ndarray, list[Scene]]]:
    """Infinite seeded stream of ``(clips [B, T, H, W, 3], scenes)``."""
    rng = np.random.default_rng(seed)
    while True:
        scenes = [sample_scene(rng, heldout=heldout) for _ in range(batch_size)]
        yield np.stack([render(s) for s in scenes]), scenes
