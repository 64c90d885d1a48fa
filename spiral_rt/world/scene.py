"""The bundled world's semantics: objects, scenes, actions and how an action animates a scene.

Boundaries: this module is pure geometry and bookkeeping on the host (no pixels, no text, no
randomness). It says what a scene *is* (one to three coloured shapes on a fixed background), what
each action *does* to it (``apply_action``) and where every object is at any moment of the action's
animation (``interpolate``). ``render`` turns states into pixels, ``language`` turns text into
actions, ``agents`` judges pixels against these semantics.

Coordinates are normalised: x grows to the right, y grows downwards, both in [0, 1] over the frame,
so one scene renders at any resolution. An object's ``center`` is the centroid of its area (for a
triangle, one third of the height above its base), which is what a critic measures from pixels.

The 3x3 grid of named regions::

    top-left     top      top-right        region centres at x, y in {0.2, 0.5, 0.8}
    left         center   right
    bottom-left  bottom   bottom-right
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace

logger = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle")
"""The object shapes (axis-aligned; a triangle points up)."""

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (225, 40, 40),
    "green": (40, 190, 50),
    "blue": (40, 70, 230),
    "yellow": (235, 215, 40),
    "purple": (165, 50, 220),
    "cyan": (40, 210, 225),
}
"""Object colours by name, RGB uint8. Chosen far apart in direction from the background so that a
pixel blended with the background (antialiased edges, blur) still points towards its own colour."""

BACKGROUND: tuple[int, int, int] = (118, 118, 118)
"""The fixed, flat mid-grey background (every palette colour differs from it in a distinct direction)."""

SIZES: dict[str, float] = {"small": 0.07, "medium": 0.10, "large": 0.13}
"""Size name -> scale s (normalised): a circle's radius; the other shapes fit in a box of about 2s."""

SIZE_ORDER = ("small", "medium", "large")
"""Sizes from smallest to largest (grow/shrink move one place along it)."""

DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
"""Direction name -> unit (dx, dy) in image coordinates (y down)."""

REGION_COORDS = (0.2, 0.5, 0.8)
"""Centre coordinate of the three grid columns (x) and rows (y)."""

REGIONS: dict[str, tuple[float, float]] = {
    f"{row}{'-' if row and col else ''}{col}" or "center": (REGION_COORDS[ci], REGION_COORDS[ri])
    for ri, row in enumerate(("top", "", "bottom"))
    for ci, col in enumerate(("left", "", "right"))
}
"""Region name -> centre (x, y): top-left, top, top-right, left, center, right, bottom-left, bottom,
bottom-right."""

ACTION_KINDS = ("move", "move_to", "recolour", "grow", "shrink")
"""What an action does: move by a fixed distance in a direction, move to a named region, change
colour, grow one size, shrink one size."""

# Extent of each shape around its centroid, in units of the scale s: (left, right, up, down).
_TRIANGLE_BASE = 2.1
_TRIANGLE_HEIGHT = 1.8
_SQUARE_HALF = 0.9
_EXTENTS = {
    "circle": (1.0, 1.0, 1.0, 1.0),
    "square": (_SQUARE_HALF, _SQUARE_HALF, _SQUARE_HALF, _SQUARE_HALF),
    "triangle": (_TRIANGLE_BASE / 2, _TRIANGLE_BASE / 2, 2 * _TRIANGLE_HEIGHT / 3, _TRIANGLE_HEIGHT / 3),
}
_BOUNDING_RADIUS = 1.25
"""Radius (in units of s) of a circle around the centroid that contains every shape."""


def _check_choice(owner: str, name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{owner}: argument '{name}' must be one of {sorted(choices)}, got {value!r}")
    return value


def shape_extents(shape: str, scale: float) -> tuple[float, float, float, float]:
    """(left, right, up, down) distance from the centroid to the shape's bounding box edges."""
    _check_choice("shape_extents", "shape", shape, SHAPES)
    return tuple(e * scale for e in _EXTENTS[shape])  # type: ignore[return-value]


def shape_area(shape: str, scale: float) -> float:
    """Area of a shape of scale ``scale`` (normalised units squared)."""
    _check_choice("shape_area", "shape", shape, SHAPES)
    if shape == "circle":
        return math.pi * scale * scale
    if shape == "square":
        return (2 * _SQUARE_HALF * scale) ** 2
    return 0.5 * _TRIANGLE_BASE * _TRIANGLE_HEIGHT * scale * scale


def region_of(x: float, y: float) -> str:
    """Name of the grid region whose centre is nearest to (x, y)."""
    best = min(REGIONS.items(), key=lambda kv: (kv[1][0] - x) ** 2 + (kv[1][1] - y) ** 2)
    return best[0]


@dataclass(frozen=True)
class ObjectState:
    """One object at one moment. Static scenes have ``scale == SIZES[size]`` and no wipe."""

    shape: str
    """"circle", "square" or "triangle"."""
    colour: str
    """Palette name of the object's colour (during a colour change: the colour being replaced)."""
    size: str
    """Nominal size "small", "medium" or "large" (during a resize: the nearer of the two)."""
    center: tuple[float, float]
    """(x, y) centroid, normalised to [0, 1] (x right, y down)."""
    scale: float = -1.0
    """Continuous scale s (a circle's radius), normalised; -1 means ``SIZES[size]``."""
    next_colour: str | None = None
    """During a colour change: the new colour, painted top-down over the old one."""
    wipe: float = 0.0
    """During a colour change: fraction of the object's height already in ``next_colour``, in [0, 1]."""

    def __post_init__(self) -> None:
        _check_choice("ObjectState", "shape", self.shape, SHAPES)
        _check_choice("ObjectState", "colour", self.colour, PALETTE)
        _check_choice("ObjectState", "size", self.size, SIZES)
        if self.next_colour is not None:
            _check_choice("ObjectState", "next_colour", self.next_colour, PALETTE)
        if len(self.center) != 2 or not all(math.isfinite(float(c)) for c in self.center):
            raise ValueError(f"ObjectState: argument 'center' must be a finite (x, y) pair, got {self.center!r}")
        object.__setattr__(self, "center", (float(self.center[0]), float(self.center[1])))
        if self.scale == -1.0:
            object.__setattr__(self, "scale", SIZES[self.size])
        if not 0.0 < self.scale < 0.5:
            raise ValueError(f"ObjectState: argument 'scale' must be in (0, 0.5), got {self.scale!r}")
        if not 0.0 <= self.wipe <= 1.0:
            raise ValueError(f"ObjectState: argument 'wipe' must be in [0, 1], got {self.wipe!r}")

    @property
    def name(self) -> str:
        """How the language refers to the object: "red circle"."""
        return f"{self.colour} {self.shape}"

    @property
    def visible_colour(self) -> str:
        """The colour covering most of the object (the new one once the wipe is past half)."""
        return self.next_colour if self.next_colour is not None and self.wipe >= 0.5 else self.colour

    @property
    def region(self) -> str:
        """Name of the grid region the object is in."""
        return region_of(*self.center)

    @property
    def area(self) -> float:
        """Area in normalised units squared."""
        return shape_area(self.shape, self.scale)

    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) bounding box, normalised."""
        left, right, up, down = shape_extents(self.shape, self.scale)
        x, y = self.center
        return (x - left, y - up, x + right, y + down)

    def to_dict(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "center": list(self.center),
                "scale": self.scale, "next_colour": self.next_colour, "wipe": self.wipe}

    @classmethod
    def from_dict(cls, data: dict) -> "ObjectState":
        return cls(shape=data["shape"], colour=data["colour"], size=data["size"], center=tuple(data["center"]),
                   scale=data.get("scale", -1.0), next_colour=data.get("next_colour"), wipe=data.get("wipe", 0.0))


@dataclass(frozen=True)
class ObjectRef:
    """How a step names an object: its colour and shape (unique in a scene), optionally its size."""

    colour: str
    """Palette colour name."""
    shape: str
    """Shape name."""
    size: str | None = None
    """Optional size adjective; when given it must match too."""

    def __post_init__(self) -> None:
        _check_choice("ObjectRef", "colour", self.colour, PALETTE)
        _check_choice("ObjectRef", "shape", self.shape, SHAPES)
        if self.size is not None:
            _check_choice("ObjectRef", "size", self.size, SIZES)

    def __str__(self) -> str:
        return f"{self.size + ' ' if self.size else ''}{self.colour} {self.shape}"

    def matches(self, obj: ObjectState) -> bool:
        return obj.colour == self.colour and obj.shape == self.shape and (self.size is None or obj.size == self.size)


@dataclass(frozen=True)
class Action:
    """One step's action on one object."""

    kind: str
    """One of ``ACTION_KINDS``."""
    target: ObjectRef
    """The object acted on."""
    arg: str | None = None
    """move: a direction; move_to: a region; recolour: the new colour; grow/shrink: None."""

    def __post_init__(self) -> None:
        _check_choice("Action", "kind", self.kind, ACTION_KINDS)
        if not isinstance(self.target, ObjectRef):
            raise ValueError(f"Action: argument 'target' must be an ObjectRef, got {type(self.target).__name__}")
        expected = {"move": DIRECTIONS, "move_to": REGIONS, "recolour": PALETTE}.get(self.kind)
        if expected is None:
            if self.arg is not None:
                raise ValueError(f"Action: argument 'arg' must be None for {self.kind}, got {self.arg!r}")
        else:
            _check_choice("Action", "arg", self.arg, expected)


@dataclass(frozen=True)
class WorldConfig:
    """Resolution, timing and action magnitudes of the world."""

    width: int = 64
    """Frame width in pixels."""
    height: int = 64
    """Frame height in pixels."""
    frames_per_chunk: int = 12
    """Video frames per generator chunk (Wan: 12 = 3 latent frames)."""
    move_distance: float = 0.25
    """How far a directional move goes, as a fraction of the frame (16 px at 64x64)."""
    span_chunks: dict[str, int] = field(default_factory=lambda: {"move": 1, "move_to": 2, "recolour": 1, "grow": 1, "shrink": 1})
    """Chunks each action kind's animation spans."""
    margin: float = 0.02
    """Minimum gap between an object and the frame edge, and between two objects, normalised."""

    def __post_init__(self) -> None:
        for name in ("width", "height", "frames_per_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"WorldConfig: argument '{name}' must be a positive int, got {value!r}")
        if self.width != self.height:
            raise ValueError(f"WorldConfig: arguments 'width' and 'height' must be equal (square frames), got {self.width}x{self.height}")
        if self.width < 32:
            raise ValueError(f"WorldConfig: arguments 'width'/'height' must be >= 32 (shapes must stay segmentable), got {self.width}x{self.height}")
        if not 0.0 < self.move_distance < 0.6:
            raise ValueError(f"WorldConfig: argument 'move_distance' must be in (0, 0.6), got {self.move_distance!r}")
        if set(self.span_chunks) != set(ACTION_KINDS) or any(
                isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in self.span_chunks.values()):
            raise ValueError(f"WorldConfig: argument 'span_chunks' must map each of {ACTION_KINDS} to a positive int, got {self.span_chunks!r}")
        if not 0.0 <= self.margin < 0.1:
            raise ValueError(f"WorldConfig: argument 'margin' must be in [0, 0.1), got {self.margin!r}")

    def span_frames(self, action: Action) -> int:
        """Frames of the animation of ``action``."""
        return self.span_chunks[action.kind] * self.frames_per_chunk

    def __hash__(self) -> int:
        return hash((self.width, self.height, self.frames_per_chunk, self.move_distance,
                     tuple(sorted(self.span_chunks.items())), self.margin))


@dataclass(frozen=True)
class Scene:
    """A static scene: one to three objects with distinct colours, on the fixed background."""

    objects: tuple[ObjectState, ...]
    """The objects, in drawing order (later ones on top)."""

    def __post_init__(self) -> None:
        objects = tuple(self.objects)
        object.__setattr__(self, "objects", objects)
        if not 1 <= len(objects) <= 3:
            raise ValueError(f"Scene: argument 'objects' must hold 1 to 3 objects, got {len(objects)}")
        colours = [o.colour for o in objects]
        if len(set(colours)) != len(colours):
            raise ValueError(f"Scene: argument 'objects' must have distinct colours (a colour names an object), got {colours}")
        for o in objects:
            if o.next_colour is not None or o.wipe != 0.0 or o.scale != SIZES[o.size]:
                raise ValueError(f"Scene: argument 'objects' must be static states (no wipe, nominal scale), got {o!r}")

    def find(self, ref: ObjectRef) -> int:
        """Index of the object ``ref`` names; ValueError if none or several match."""
        hits = [i for i, o in enumerate(self.objects) if ref.matches(o)]
        if len(hits) != 1:
            present = ", ".join(o.name for o in self.objects)
            what = "no object" if not hits else f"{len(hits)} objects"
            raise ValueError(f"Scene.find: argument 'ref' names {what} ({ref}); the scene has: {present}")
        return hits[0]

    def describe(self) -> str:
        """Canonical text description: "a small red circle at the top-left and a large blue square at the center"."""
        parts = [f"a {o.size} {o.colour} {o.shape} at the {o.region}" for o in self.objects]
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]

    def to_dict(self) -> dict:
        return {"objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, data: dict) -> "Scene":
        return cls(objects=tuple(ObjectState.from_dict(o) for o in data["objects"]))


def _clamp_center(obj: ObjectState, x: float, y: float, config: WorldConfig, scale: float | None = None) -> tuple[float, float]:
    left, right, up, down = shape_extents(obj.shape, obj.scale if scale is None else scale)
    m = config.margin
    return (min(max(x, left + m), 1.0 - right - m), min(max(y, up + m), 1.0 - down - m))


def in_bounds(obj: ObjectState, config: WorldConfig) -> bool:
    """Whether the object lies inside the frame with ``config.margin`` to spare."""
    x0, y0, x1, y1 = obj.bbox()
    m = config.margin - 1e-9
    return x0 >= m and y0 >= m and x1 <= 1 - m and y1 <= 1 - m


def objects_overlap(a: ObjectState, b: ObjectState, gap: float) -> bool:
    """Conservative test: bounding circles closer than ``gap``."""
    d = math.hypot(a.center[0] - b.center[0], a.center[1] - b.center[1])
    return d < _BOUNDING_RADIUS * (a.scale + b.scale) + gap


def apply_action(scene: Scene, action: Action, config: WorldConfig) -> Scene:
    """The scene after ``action`` has finished.

    Moves are clamped so that the object stays inside the frame; a resize keeps the centroid (then
    clamps). Raises ValueError (argument 'action') when the target is missing or ambiguous, when it
    cannot grow/shrink further, or when the new colour is its own or another object's.
    """
    try:
        i = scene.find(action.target)
    except ValueError as err:
        raise ValueError(f"apply_action: argument 'action' cannot run: {err}") from None
    obj = scene.objects[i]
    if action.kind == "move":
        dx, dy = DIRECTIONS[action.arg]
        x, y = obj.center
        new = replace(obj, center=_clamp_center(obj, x + dx * config.move_distance, y + dy * config.move_distance, config))
    elif action.kind == "move_to":
        new = replace(obj, center=_clamp_center(obj, *REGIONS[action.arg], config))
    elif action.kind == "recolour":
        if action.arg == obj.colour:
            raise ValueError(f"apply_action: argument 'action' cannot run: the {obj.name} is already {action.arg}")
        taken = {o.colour for j, o in enumerate(scene.objects) if j != i}
        if action.arg in taken:
            raise ValueError(f"apply_action: argument 'action' cannot run: {action.arg} already names another object "
                             f"(colours must stay distinct)")
        new = replace(obj, colour=action.arg)
    else:
        k = SIZE_ORDER.index(obj.size) + (1 if action.kind == "grow" else -1)
        if not 0 <= k < len(SIZE_ORDER):
            raise ValueError(f"apply_action: argument 'action' cannot run: the {obj.name} is already {obj.size}")
        size = SIZE_ORDER[k]
        new = replace(obj, size=size, scale=SIZES[size], center=_clamp_center(obj, *obj.center, config, SIZES[size]))
    objects = list(scene.objects)
    objects[i] = new
    return Scene(tuple(objects))


def ease(t: float) -> float:
    """Smoothstep easing of progress t in [0, 1] (starts and stops at rest)."""
    t = min(max(t, 0.0), 1.0)
    return t * t * (3.0 - 2.0 * t)


def interpolate(start: Scene, end: Scene, action: Action, t: float) -> tuple[ObjectState, ...]:
    """Object states at progress ``t`` in [0, 1] of ``action`` animating ``start`` into ``end``.

    Positions and scales follow the eased progress; a colour change wipes the new colour over the
    object from top to bottom (every pixel stays a palette colour, so it stays segmentable).
    """
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"interpolate: argument 't' must be in [0, 1], got {t!r}")
    if len(start.objects) != len(end.objects):
        raise ValueError("interpolate: arguments 'start' and 'end' must hold the same objects")
    e = ease(t)
    states = []
    for a, b in zip(start.objects, end.objects):
        if a == b:
            states.append(a)
            continue
        center = (a.center[0] + e * (b.center[0] - a.center[0]), a.center[1] + e * (b.center[1] - a.center[1]))
        scale = a.scale + e * (b.scale - a.scale)
        size = a.size if abs(scale - a.scale) <= abs(scale - b.scale) else b.size
        if a.colour != b.colour:
            if e >= 1.0:
                states.append(b)
            else:
                states.append(ObjectState(a.shape, a.colour, size, center, scale, next_colour=b.colour, wipe=e))
        else:
            states.append(ObjectState(a.shape, a.colour, size, center, scale))
    return tuple(states)


def animation_states(start: Scene, action: Action, config: WorldConfig) -> tuple[Scene, list[tuple[ObjectState, ...]]]:
    """(end scene, per-frame states) of one step; frame i shows progress (i + 1) / F.

    The first frame is barely changed from ``start`` and the last one is exactly the end scene, so
    consecutive steps join without a repeated frame.
    """
    end = apply_action(start, action, config)
    num_frames = config.span_frames(action)
    return end, [interpolate(start, end, action, (i + 1) / num_frames) for i in range(num_frames)]


def check_layout(states: tuple[ObjectState, ...] | Scene, config: WorldConfig) -> str | None:
    """None when every object is inside the frame and no two overlap; otherwise what is wrong."""
    objects = states.objects if isinstance(states, Scene) else states
    for o in objects:
        if not in_bounds(o, config):
            return f"the {o.name} leaves the frame"
    for i in range(len(objects)):
        for j in range(i + 1, len(objects)):
            if objects_overlap(objects[i], objects[j], config.margin):
                return f"the {objects[i].name} and the {objects[j].name} overlap"
    return None


def simulate(scene: Scene, actions: list[Action], config: WorldConfig, *, strict: bool = False) -> list[Scene]:
    """The scenes after each action (len(actions) + 1 scenes, the first is ``scene``).

    ``strict``: also reject an action whose animation leaves the frame, overlaps two objects at any
    frame, or is a no-op (a clamped move that goes nowhere, a move to the region the object is in).
    Raises ValueError (argument 'actions') naming the step.
    """
    scenes = [scene]
    for k, action in enumerate(actions):
        try:
            end = apply_action(scenes[-1], action, config)
        except ValueError as err:
            raise ValueError(f"simulate: argument 'actions' step {k + 1}: {err}") from None
        if strict:
            problem = _strict_problem(scenes[-1], end, action, config)
            if problem:
                raise ValueError(f"simulate: argument 'actions' step {k + 1} ({action.kind} the {action.target}): {problem}")
        scenes.append(end)
    return scenes


def _strict_problem(start: Scene, end: Scene, action: Action, config: WorldConfig) -> str | None:
    i = start.find(action.target)
    a, b = start.objects[i], end.objects[i]
    if action.kind == "move":
        dx, dy = DIRECTIONS[action.arg]
        moved = (b.center[0] - a.center[0]) * dx + (b.center[1] - a.center[1]) * dy
        if moved < config.move_distance - 1e-6:
            return f"the move is cut short by the frame edge ({moved:.3f} of {config.move_distance})"
    if action.kind == "move_to" and math.hypot(b.center[0] - a.center[0], b.center[1] - a.center[1]) < 0.5 * config.move_distance:
        return f"the {a.name} is already at the {action.arg}"
    for t in [k / 8 for k in range(9)]:
        problem = check_layout(interpolate(start, end, action, t), config)
        if problem:
            return problem
    return None
