"""Correct and deliberately wrong executions of a step, rendered, for testing the world critic.

Each maker returns the segment's per-frame object states (or None when the mistake cannot be made
in this scene) and the failure kind the critic must report.
"""

from __future__ import annotations

import math

from spiral_rt.agents.types import FailureKind
from spiral_rt.world.scene import (DIRECTIONS, PALETTE, REGIONS, Action, ObjectRef, ObjectState, Scene, WorldConfig,
                                   animation_states, apply_action, check_layout, interpolate)


def _frames(start: Scene, end: Scene, action: Action, config: WorldConfig, stop: float = 1.0):
    n = config.span_frames(action)
    return [interpolate(start, end, action, min((i + 1) / n, 1.0) * stop) for i in range(n)]


def _valid(start: Scene, end: Scene, action: Action, config: WorldConfig) -> bool:
    return all(check_layout(interpolate(start, end, action, t / 6), config) is None for t in range(7))


def _clearly_elsewhere(origin, right, wrong) -> bool:
    """The wrong destination is a real move (>= 0.15) more than 45 degrees off the right one."""
    a = (right[0] - origin[0], right[1] - origin[1])
    b = (wrong[0] - origin[0], wrong[1] - origin[1])
    na, nb = math.hypot(*a), math.hypot(*b)
    return nb >= 0.15 and (a[0] * b[0] + a[1] * b[1]) < math.cos(math.pi / 4) * na * nb


def correct(start, action, config, rng):
    return animation_states(start, action, config)[1], None


def wrong_direction(start, action, config, rng):
    i = start.find(action.target)
    if action.kind == "move":
        options = [d for d in DIRECTIONS if d != action.arg]
    elif action.kind == "move_to":
        here = start.objects[i].region
        options = [r for r in REGIONS if r not in (action.arg, here)]
    elif action.kind in ("grow", "shrink"):
        options = ["shrink" if action.kind == "grow" else "grow"]
    else:
        return None, None
    rng.shuffle(options)
    right_end = apply_action(start, action, config).objects[i].center
    for opt in options:
        alt = Action(opt, action.target) if action.kind in ("grow", "shrink") else Action(action.kind, action.target, opt)
        try:
            end = apply_action(start, alt, config)
        except ValueError:
            continue
        if action.kind not in ("move", "move_to") or _clearly_elsewhere(start.objects[i].center, right_end, end.objects[i].center):
            if _valid(start, end, alt, config):
                return _frames(start, end, alt, config), FailureKind.WRONG_ACTION
    return None, None


def wrong_colour(start, action, config, rng):
    if action.kind != "recolour":
        return None, None
    taken = {o.colour for o in start.objects} | {action.arg}
    options = sorted(c for c in PALETTE if c not in taken)
    if not options:
        return None, None
    alt = Action("recolour", action.target, rng.choice(options))
    end = apply_action(start, alt, config)
    return _frames(start, end, alt, config), FailureKind.WRONG_ACTION


def wrong_object(start, action, config, rng):
    i = start.find(action.target)
    others = [j for j in range(len(start.objects)) if j != i]
    rng.shuffle(others)
    for j in others:
        o = start.objects[j]
        alt = Action(action.kind, ObjectRef(o.colour, o.shape), action.arg)
        try:
            end = apply_action(start, alt, config)
        except ValueError:
            continue
        if end == start or not _valid(start, end, alt, config):
            continue
        if action.kind == "move" and abs(end.objects[j].center[0] - o.center[0]) + abs(end.objects[j].center[1] - o.center[1]) < 0.15:
            continue
        return _frames(start, end, alt, config), FailureKind.WRONG_ACTION
    return None, None


def incomplete(start, action, config, rng):
    end = apply_action(start, action, config)
    return _frames(start, end, action, config, stop=rng.uniform(0.0, 0.25)), FailureKind.INCOMPLETE_ACTION


def vanish(start, action, config, rng):
    frames, _ = correct(start, action, config, rng)
    i = rng.randrange(len(start.objects))
    k = rng.randrange(len(frames) // 3, len(frames) - 2)
    return [s if f < k else s[:i] + s[i + 1:] for f, s in enumerate(frames)], FailureKind.DRIFT


def appear(start, action, config, rng):
    frames, _ = correct(start, action, config, rng)
    end = apply_action(start, action, config)
    used = {o.colour for o in start.objects} | {o.colour for o in end.objects}
    colour = rng.choice(sorted(c for c in PALETTE if c not in used))
    for _ in range(200):
        new = ObjectState(rng.choice(("circle", "square", "triangle")), colour, rng.choice(("small", "medium")),
                          (rng.uniform(0.15, 0.85), rng.uniform(0.15, 0.85)))
        if all(check_layout(s + (new,), config) is None for s in frames):
            k = rng.randrange(len(frames) // 3, len(frames) - 1)
            return [s if f < k else s + (new,) for f, s in enumerate(frames)], FailureKind.DRIFT
    return None, None


def teleport(start, action, config, rng):
    if action.kind not in ("move", "move_to"):
        return None, None
    end = apply_action(start, action, config)
    i = start.find(action.target)
    if math.hypot(end.objects[i].center[0] - start.objects[i].center[0], end.objects[i].center[1] - start.objects[i].center[1]) < 0.2:
        return None, None
    n = config.span_frames(action)
    k = rng.randrange(2, n - 2)
    return [start.objects if f < k else end.objects for f in range(n)], FailureKind.PHYSICS


MISTAKES = {"wrong_direction": wrong_direction, "wrong_colour": wrong_colour, "wrong_object": wrong_object,
            "incomplete": incomplete, "vanish": vanish, "appear": appear, "teleport": teleport}
