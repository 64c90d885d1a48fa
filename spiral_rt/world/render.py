"""Pixels of the bundled world: object states -> antialiased RGB frames, and whole step videos.

Boundaries: deterministic numpy rendering on the host; no randomness except in ``degrade`` (which
takes an explicit generator), no text parsing, no judging. Each object is drawn from its signed
distance field with one pixel of antialiasing, composited in drawing order over the flat
background. Every pixel is therefore a blend of the background and at most a couple of palette
colours, which is what keeps the critic's colour segmentation reliable.

Shapes: a frame is (H, W, 3) uint8, a video (F, H, W, 3) uint8.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .scene import (BACKGROUND, PALETTE, Action, ObjectState, Scene, WorldConfig, animation_states,
                    shape_extents, _SQUARE_HALF, _TRIANGLE_BASE, _TRIANGLE_HEIGHT)

logger = logging.getLogger(__name__)


@dataclass
class RenderedVideo:
    """A rendered video with its ground truth."""

    frames: np.ndarray
    """(F, H, W, 3) uint8 frames."""
    states: list[tuple[ObjectState, ...]]
    """Per frame, the state of every object (same order as the scene's objects)."""
    step_index: np.ndarray
    """(F,) int32: the step each frame belongs to (-1 for the intro chunk showing the still scene)."""
    prompts: list[str]
    """Per step, the prompt it was rendered for (the caller's text; empty strings if none given)."""
    scenes: list[Scene]
    """The scene before the first step and after each step (len(steps) + 1)."""


def sdf_px(shape: str, cx: float, cy: float, s: float, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) from points (px, py) to the outline of ``shape`` with its
    centroid at (cx, cy) and scale ``s``, all in pixels. Coverage of a pixel is clip(0.5 - sdf, 0, 1)."""
    dx, dy = px - cx, py - cy
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - s
    if shape == "square":
        h = _SQUARE_HALF * s
        qx, qy = np.abs(dx) - h, np.abs(dy) - h
        outside = np.sqrt(np.maximum(qx, 0.0) ** 2 + np.maximum(qy, 0.0) ** 2)
        return outside + np.minimum(np.maximum(qx, qy), 0.0)
    # Upright triangle with its centroid at (cx, cy): the max of the three edge half-plane distances.
    b, hgt = _TRIANGLE_BASE * s, _TRIANGLE_HEIGHT * s
    apex = np.array([cx, cy - 2.0 * hgt / 3.0])
    left = np.array([cx - b / 2.0, cy + hgt / 3.0])
    right = np.array([cx + b / 2.0, cy + hgt / 3.0])
    dist = None
    for p, q in ((apex, right), (right, left), (left, apex)):
        ex, ey = q - p
        nx, ny = ey, -ex  # outward normal for a clockwise (in image coordinates) outline
        norm = np.hypot(nx, ny)
        d = ((px - p[0]) * nx + (py - p[1]) * ny) / norm
        dist = d if dist is None else np.maximum(dist, d)
    return dist


def render_frame(states, config: WorldConfig) -> np.ndarray:
    """One (H, W, 3) uint8 frame of ``states`` (a Scene or a sequence of ObjectState)."""
    objects = states.objects if isinstance(states, Scene) else tuple(states)
    h, w = config.height, config.width
    py, px = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    img = np.empty((h, w, 3), dtype=np.float64)
    img[:] = BACKGROUND
    for obj in objects:
        left, right, up, down = shape_extents(obj.shape, obj.scale)
        x0 = max(int(np.floor((obj.center[0] - left) * w - 2)), 0)
        x1 = min(int(np.ceil((obj.center[0] + right) * w + 2)), w)
        y0 = max(int(np.floor((obj.center[1] - up) * h - 2)), 0)
        y1 = min(int(np.ceil((obj.center[1] + down) * h + 2)), h)
        if x0 >= x1 or y0 >= y1:
            continue
        sub_x, sub_y = px[y0:y1, x0:x1], py[y0:y1, x0:x1]
        sdf = sdf_px(obj.shape, obj.center[0] * w, obj.center[1] * h, obj.scale * w, sub_x, sub_y)
        alpha = np.clip(0.5 - sdf, 0.0, 1.0)[..., None]
        colour = np.broadcast_to(np.asarray(PALETTE[obj.colour], dtype=np.float64), alpha.shape[:2] + (3,))
        if obj.next_colour is not None and obj.wipe > 0.0:
            # The new colour covers the top ``wipe`` fraction of the bounding box, with a soft edge.
            top = (obj.center[1] - up) * h
            line = top + obj.wipe * (up + down) * h
            beta = np.clip(line - sub_y + 0.5, 0.0, 1.0)[..., None]
            colour = (1.0 - beta) * colour + beta * np.asarray(PALETTE[obj.next_colour], dtype=np.float64)
        img[y0:y1, x0:x1] = (1.0 - alpha) * img[y0:y1, x0:x1] + alpha * colour
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_states(frames_states, config: WorldConfig) -> np.ndarray:
    """(F, H, W, 3) uint8 video of a list of per-frame object states."""
    return np.stack([render_frame(s, config) for s in frames_states]) if frames_states else \
        np.zeros((0, config.height, config.width, 3), dtype=np.uint8)


def render_step(scene: Scene, action: Action, config: WorldConfig) -> tuple[np.ndarray, list[tuple[ObjectState, ...]], Scene]:
    """(frames (F, H, W, 3) uint8, per-frame states, end scene) of one action's animation."""
    end, states = animation_states(scene, action, config)
    return render_states(states, config), states, end


def render_video(scene: Scene, actions: list[Action], config: WorldConfig, *, prompts: list[str] | None = None,
                 intro_chunks: int = 1) -> RenderedVideo:
    """Render a whole goal: ``intro_chunks`` chunks of the still scene, then each action in turn."""
    if isinstance(intro_chunks, bool) or not isinstance(intro_chunks, int) or intro_chunks < 0:
        raise ValueError(f"render_video: argument 'intro_chunks' must be an int >= 0, got {intro_chunks!r}")
    if prompts is not None and len(prompts) != len(actions):
        raise ValueError(f"render_video: argument 'prompts' must have one entry per action ({len(actions)}), got {len(prompts)}")
    states: list[tuple[ObjectState, ...]] = [scene.objects] * (intro_chunks * config.frames_per_chunk)
    step_index = [-1] * len(states)
    scenes = [scene]
    for k, action in enumerate(actions):
        end, step_states = animation_states(scenes[-1], action, config)
        states.extend(step_states)
        step_index.extend([k] * len(step_states))
        scenes.append(end)
    still = render_frame(scene, config)
    frames = np.empty((len(states), config.height, config.width, 3), dtype=np.uint8)
    for i, s in enumerate(states):
        frames[i] = still if step_index[i] == -1 else render_frame(s, config)
    return RenderedVideo(frames=frames, states=states, step_index=np.asarray(step_index, dtype=np.int32),
                         prompts=list(prompts) if prompts is not None else [""] * len(actions), scenes=scenes)


def gaussian_blur(frames: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over H and W of (..., H, W, C) frames; returns float64."""
    x = np.asarray(frames, dtype=np.float64)
    if sigma <= 0:
        return x
    radius = max(1, int(np.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    for axis in (-3, -2):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (radius, radius)
        xp = np.pad(x, pad, mode="edge")
        n = x.shape[axis]
        out = np.zeros_like(x)
        for j, kj in enumerate(k):
            out += kj * np.take(xp, np.arange(j, j + n), axis=axis)
        x = out
    return x


def degrade(frames: np.ndarray, *, noise_std: float = 0.0, blur_sigma: float = 0.0,
            rng: np.random.Generator | None = None) -> np.ndarray:
    """Imitate an imperfect generator: Gaussian blur (pixels) then Gaussian noise (0-255 units).

    ``frames`` (..., H, W, 3) uint8 -> same shape uint8. ``rng`` is required when ``noise_std`` > 0.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim < 3 or frames.shape[-1] != 3:
        raise ValueError(f"degrade: argument 'frames' must be (..., H, W, 3) uint8, got {frames.dtype} {frames.shape}")
    if noise_std < 0 or blur_sigma < 0:
        raise ValueError(f"degrade: arguments 'noise_std'/'blur_sigma' must be >= 0, got {noise_std}, {blur_sigma}")
    x = gaussian_blur(frames, blur_sigma)
    if noise_std > 0:
        if rng is None:
            raise ValueError("degrade: argument 'rng' is required when noise_std > 0")
        x = x + rng.normal(0.0, noise_std, size=x.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)
