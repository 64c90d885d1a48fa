"""Object states from pixels: colour segmentation against the palette, connected components, features.

Boundaries: reads (F, H, W, 3) / (H, W, 3) uint8 frames and returns ``DetectedObject`` records; it
knows the palette, the background and the shapes' geometry (``scene``) but nothing about steps,
goals or verdicts (``agents`` does the judging). Pure numpy, vectorised over frames.

How a pixel is labelled: every pixel p is explained as a blend of the background b and one palette
colour c, p ~ b + a (c - b). For each colour the best blend weight a_c and the residual
|p - b - a_c (c - b)| are computed; the colour with the smallest residual wins, and the pixel belongs
to it when a_c >= ``min_alpha`` (it is mostly that colour) and the residual is small. Antialiased and
blurred edges thus keep their own colour instead of drifting to a neighbouring palette entry, and
Gaussian noise has to be several sigma strong to flip a pixel. Pixels of one colour are then split
into 8-connected components (min-label hooking with pointer jumping); components smaller than
``min_area_fraction`` of the smallest object are discarded as noise.

Measurements use the soft coverage (the blend weight a of the component's colour, unclipped below
so that noise averages out) over the component dilated by two pixels: blur moves coverage around but
keeps its sum, so the area and the centroid stay unbiased. The shape is the template (circle, square
or triangle of the measured area, placed at the measured centroid, drawn exactly as the renderer
draws it) that best fits the soft coverage in the least-squares sense; the corners, where a square
and a circle of equal area differ most, decide between them.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import numpy as np

from .render import sdf_px as _sdf_px
from .scene import BACKGROUND, PALETTE, SIZE_ORDER, SIZES, ObjectState, WorldConfig, shape_area

logger = logging.getLogger(__name__)

COLOUR_NAMES = tuple(PALETTE)
"""Palette names in label order (label k <-> COLOUR_NAMES[k])."""
_PALETTE_VECTORS = np.asarray([PALETTE[c] for c in COLOUR_NAMES], dtype=np.float32) - np.asarray(BACKGROUND, dtype=np.float32)


@dataclass(frozen=True)
class PerceptionConfig:
    """Thresholds of the segmentation."""

    min_alpha: float = 0.5
    """A pixel belongs to a colour when it is at least this much that colour (blend weight)."""
    max_residual: float = 60.0
    """Largest distance (0-255 units) of a pixel from its best background-colour blend line."""
    min_area_fraction: float = 0.2
    """Components smaller than this fraction of the smallest object's area are noise."""

    def __post_init__(self) -> None:
        if not 0.0 < self.min_alpha < 1.0:
            raise ValueError(f"PerceptionConfig: argument 'min_alpha' must be in (0, 1), got {self.min_alpha!r}")
        if not self.max_residual > 0:
            raise ValueError(f"PerceptionConfig: argument 'max_residual' must be > 0, got {self.max_residual!r}")
        if not 0.0 <= self.min_area_fraction < 1.0:
            raise ValueError(f"PerceptionConfig: argument 'min_area_fraction' must be in [0, 1), got {self.min_area_fraction!r}")


@dataclass(frozen=True)
class DetectedObject:
    """One connected component of one palette colour in one frame."""

    colour: str
    """Palette name of the component's colour."""
    shape: str
    """Classified shape ("circle", "square", "triangle")."""
    size: str
    """Nearest nominal size for that shape ("small", "medium", "large")."""
    center: tuple[float, float]
    """(x, y) centroid of the component's pixels, normalised to [0, 1]."""
    area: float
    """Area, normalised (pixels / (W * H))."""
    num_pixels: int
    """Pixels in the component."""
    bbox: tuple[float, float, float, float]
    """(x0, y0, x1, y1) bounding box of the pixels, normalised (pixel edges)."""
    fill: float
    """Area / bounding-box area."""

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    def center_px(self, config: WorldConfig) -> tuple[float, float]:
        """Centroid in pixel coordinates of a frame rendered with ``config``."""
        return (self.center[0] * config.width, self.center[1] * config.height)

    def as_state(self) -> ObjectState:
        """The detection as a static ObjectState (nominal scale of its size)."""
        return ObjectState(self.shape, self.colour, self.size, self.center)


_LUT_SHIFT = 2
"""Labels are looked up on a 64^3 grid of RGB bins (4 levels each, below the noise of any input)."""


def _classify_rgb(rgb: np.ndarray, min_alpha: float, max_residual: float) -> np.ndarray:
    """(N, 3) float RGB -> (N,) int8 labels by the blend rule of the module docstring."""
    d = rgb.astype(np.float32) - np.asarray(BACKGROUND, dtype=np.float32)  # (N, 3)
    v = _PALETTE_VECTORS  # (C, 3)
    vv = (v * v).sum(axis=1)  # (C,)
    dv = d @ v.T  # (N, C)
    alpha = np.maximum(dv / vv, 0.0)
    # Squared distance to each background->colour line: |d|^2 - 2 a d.v + a^2 |v|^2 (a clipped at 0).
    res2 = (d * d).sum(axis=1, keepdims=True) - alpha * (2.0 * dv - alpha * vv)
    best = np.argmin(res2, axis=1)
    best_alpha = np.take_along_axis(alpha, best[:, None], axis=1)[:, 0]
    best_res = np.sqrt(np.maximum(np.take_along_axis(res2, best[:, None], axis=1)[:, 0], 0.0))
    keep = (best_alpha >= min_alpha) & (best_res <= max_residual)
    return np.where(keep, best, -1).astype(np.int8)


@functools.lru_cache(maxsize=4)
def _label_table(min_alpha: float, max_residual: float) -> np.ndarray:
    levels = np.arange(0, 256, 1 << _LUT_SHIFT, dtype=np.float32) + ((1 << _LUT_SHIFT) - 1) / 2.0
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 3)
    n = len(levels)
    return _classify_rgb(grid, min_alpha, max_residual).reshape(n, n, n)


def label_colours(frames: np.ndarray, config: PerceptionConfig | None = None) -> np.ndarray:
    """(..., H, W, 3) uint8 -> (..., H, W) int8 palette label per pixel (-1: background / unclear)."""
    config = config or PerceptionConfig()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim < 3 or frames.shape[-1] != 3:
        raise ValueError(f"label_colours: argument 'frames' must be (..., H, W, 3) uint8, got {frames.dtype} {frames.shape}")
    table = _label_table(float(config.min_alpha), float(config.max_residual))
    q = frames >> _LUT_SHIFT
    return table[q[..., 0], q[..., 1], q[..., 2]]


def connected_components(labels: np.ndarray) -> np.ndarray:
    """8-connected components of equal non-negative labels, per frame.

    ``labels`` (..., H, W) int; returns (..., H, W) int64 component ids, -1 where labels < 0. Ids are
    unique over the whole batch (the flat index of the component's first pixel). Works on the list of
    foreground pixels only: edges between equal-labelled neighbours, then min-label hooking with
    pointer jumping until nothing changes (a few rounds: logarithmic in the component's size).
    """
    labels = np.asarray(labels)
    shape = labels.shape
    lab = labels.reshape((-1,) + shape[-2:])
    f, h, w = lab.shape
    flat = lab.reshape(-1)
    fg = np.flatnonzero(flat >= 0)
    out = np.full(flat.shape, -1, dtype=np.int64)
    if fg.size == 0:
        return out.reshape(shape)
    index_of = np.full(flat.shape, -1, dtype=np.int64)
    index_of[fg] = np.arange(fg.size)
    ys, xs = (fg % (h * w)) // w, fg % w
    src, dst = [], []
    for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1)):  # half of the 8 neighbours covers every edge once
        ok = (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w)
        a = fg[ok]
        b = a + dy * w + dx
        same = flat[b] == flat[a]
        src.append(index_of[a[same]])
        dst.append(index_of[b[same]])
    src_idx, dst_idx = np.concatenate(src), np.concatenate(dst)
    ids = np.arange(fg.size, dtype=np.int64)
    while True:
        low = np.minimum(ids[src_idx], ids[dst_idx])
        new = ids.copy()
        np.minimum.at(new, ids[src_idx], low)  # hook the roots of both ends onto the smaller id
        np.minimum.at(new, ids[dst_idx], low)
        new = np.minimum(new, new[ids])
        while True:  # pointer jumping to the roots
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, ids):
            break
        ids = new
    out[fg] = fg[ids]
    return out.reshape(shape)


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """8-neighbour binary dilation of a 2-D mask, ``steps`` times."""
    out = mask
    for _ in range(steps):
        p = np.pad(out, 1)
        out = p[1:-1, 1:-1].copy()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                out |= p[1 + dy:p.shape[0] - 1 + dy, 1 + dx:p.shape[1] - 1 + dx]
    return out


def _soft_alpha(region: np.ndarray, colour_idx: int) -> np.ndarray:
    """Blend weight of palette colour ``colour_idx`` per pixel of an (h, w, 3) uint8 region (unclipped
    below so that noise averages out; clipped at 1.5 above)."""
    v = _PALETTE_VECTORS[colour_idx]
    d = region.astype(np.float32) - np.asarray(BACKGROUND, dtype=np.float32)
    return np.clip((d @ v) / float(v @ v), -0.5, 1.5)


def _template(shape: str, cx: float, cy: float, scale_px: float, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    return np.clip(0.5 - _sdf_px(shape, cx, cy, scale_px, xs, ys), 0.0, 1.0)


def _describe(obs: np.ndarray, xa: int, ya: int, w: int, h: int, colour: str, num_pixels: int, box) -> "DetectedObject":
    """Measure one component from its soft coverage ``obs`` (region at (xa, ya) of a w x h frame)."""
    ys, xs = np.mgrid[0:obs.shape[0], 0:obs.shape[1]].astype(np.float64)
    ys += ya + 0.5
    xs += xa + 0.5
    total = float(obs.sum())
    if total <= 0.0:
        total = float(num_pixels)
        obs = np.ones_like(obs)
    cx, cy = float((obs * xs).sum() / total), float((obs * ys).sum() / total)
    best, best_err = "circle", math.inf
    for shape in ("circle", "square", "triangle"):
        scale_px = math.sqrt(total / shape_area(shape, 1.0))
        err = float(((obs - _template(shape, cx, cy, scale_px, ys, xs)) ** 2).sum())
        if err < best_err:
            best, best_err = shape, err
    x0, y0, x1, y1 = (int(v) for v in box)
    area = total / float(w * h)
    return DetectedObject(colour=colour, shape=best, size=_nearest_size(best, area), center=(cx / w, cy / h),
                          area=area, num_pixels=num_pixels, bbox=(x0 / w, y0 / h, (x1 + 1) / w, (y1 + 1) / h),
                          fill=num_pixels / float((x1 - x0 + 1) * (y1 - y0 + 1)))


def _nearest_size(shape: str, area: float) -> str:
    return min(SIZE_ORDER, key=lambda s: abs(math.log(area / shape_area(shape, SIZES[s]))))


def extract_objects(frames: np.ndarray, config: PerceptionConfig | None = None) -> list:
    """Detected objects per frame.

    ``frames`` (F, H, W, 3) uint8 -> list (length F) of lists of DetectedObject, largest first;
    a single (H, W, 3) frame -> one list of DetectedObject. Any square or non-square resolution: sizes
    are normalised by the frames' own H and W.
    """
    config = config or PerceptionConfig()
    frames = np.asarray(frames)
    single = frames.ndim == 3
    if single:
        frames = frames[None]
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"extract_objects: argument 'frames' must be (F, H, W, 3) or (H, W, 3) uint8, got {frames.dtype} {frames.shape}")
    f, h, w, _ = frames.shape
    labels = label_colours(frames, config)
    comps = connected_components(labels).reshape(-1)
    smallest = min(shape_area(s, SIZES["small"]) for s in ("circle", "square", "triangle"))
    min_pixels = max(3, int(config.min_area_fraction * smallest * h * w))
    out: list[list[DetectedObject]] = [[] for _ in range(f)]
    sel = np.flatnonzero(comps >= 0)
    if sel.size == 0:
        return out[0] if single else out
    cid = comps[sel]
    uniq, inverse, counts = np.unique(cid, return_inverse=True, return_counts=True)
    ys = (sel % (h * w)) // w
    xs = sel % w
    n = len(uniq)
    x0 = np.full(n, w, dtype=np.int64); np.minimum.at(x0, inverse, xs)
    x1 = np.full(n, -1, dtype=np.int64); np.maximum.at(x1, inverse, xs)
    y0 = np.full(n, h, dtype=np.int64); np.minimum.at(y0, inverse, ys)
    y1 = np.full(n, -1, dtype=np.int64); np.maximum.at(y1, inverse, ys)
    label_of = labels.reshape(-1)[uniq]
    first_frame = uniq // (h * w)
    pad = 3
    for k in np.flatnonzero(counts >= min_pixels):
        fi, colour_idx = int(first_frame[k]), int(label_of[k])
        ya, yb = max(int(y0[k]) - pad, 0), min(int(y1[k]) + pad + 1, h)
        xa, xb = max(int(x0[k]) - pad, 0), min(int(x1[k]) + pad + 1, w)
        comp = comps.reshape(f, h, w)[fi, ya:yb, xa:xb] == uniq[k]
        region_labels = labels[fi, ya:yb, xa:xb]
        support = _dilate(comp, 2) & ((region_labels < 0) | (region_labels == colour_idx))
        obs = _soft_alpha(frames[fi, ya:yb, xa:xb], colour_idx) * support
        out[fi].append(_describe(obs, xa, ya, w, h, COLOUR_NAMES[colour_idx], int(counts[k]),
                                 (x0[k], y0[k], x1[k], y1[k])))
    for objs in out:
        objs.sort(key=lambda o: -o.num_pixels)
    return out[0] if single else out
