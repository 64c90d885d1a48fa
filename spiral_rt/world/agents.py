"""Programmatic agents of the bundled world: a parsing planner and a pixel-measuring critic.

Boundaries: these implement ``spiral_rt.agents.protocols.PlanAgent`` and ``CriticAgent`` for the
bundled world only. The planner reads goals in the world's language (``language``); the critic
measures object states in generated frames (``perception``), predicts what the step should have done
from the segment's starting state (``scene.apply_action``) and compares. Neither touches a model,
the engine or a device; both are stateless between calls (thread safe).

What the critic checks, and the failure kind it reports (the first that applies wins):

- an object appeared or vanished by the end of the segment, or an untouched object vanished for
  several frames in the middle -> DRIFT ("a blue square appeared", "the red circle vanished");
- the step's predicate failed because the wrong thing happened: the target moved the wrong way,
  took the wrong colour, resized the wrong way, or another object did what the target should have
  -> WRONG_ACTION ("the red circle moved right instead of left");
- an object jumped between consecutive frames (or away from the previous segment's last frame)
  -> PHYSICS ("the red circle jumped 17.0 px between frames 5 and 6");
- the target did nothing, or only part of the action -> INCOMPLETE_ACTION;
- an attribute that the step does not change changed (an untouched object moved, the target changed
  size during a move) -> DRIFT.

The starting state of a segment is the last key frame in memory when there is one (what was
accepted before), else the segment's first frame (which a renderer or a model shows at almost zero
progress).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from ..agents.types import FailureKind, Goal, Plan, Step, Verdict, WorldMemory
from .language import GoalParseError, action_of_step, canonical_prompt, make_step, parse_goal
from .perception import DetectedObject, PerceptionConfig, extract_objects
from .scene import (REGIONS, Action, ObjectRef, ObjectState, Scene, WorldConfig, apply_action,
                    region_of)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Planner
# ---------------------------------------------------------------------------------------------


class WorldPlanner:
    """PlanAgent for the bundled world: parses the goal into canonical steps.

    ``replan`` keeps the remaining steps (the failed one first) but re-reads the world from the last
    key frame in memory: steps whose predicate already holds are dropped, and when a step's target
    has drifted to another colour (the same shape, the one object of that shape) a corrective
    recolour step is put in front of it.
    """

    def __init__(self, config: WorldConfig | None = None, perception: PerceptionConfig | None = None):
        self.config = config or WorldConfig()
        self.perception = perception or PerceptionConfig()

    def plan(self, goal: Goal, memory: WorldMemory) -> Plan:
        actions = parse_goal(goal.text)
        steps = [make_step(a, k, self.config) for k, a in enumerate(actions)]
        kinds = ", ".join(a.kind for a in actions)
        return Plan(goal=goal, steps=steps, rationale=f"parsed {len(steps)} clause(s) of the goal into steps ({kinds})")

    def replan(self, goal: Goal, memory: WorldMemory, remaining: list[Step]) -> Plan:
        if not remaining:
            raise ValueError("WorldPlanner.replan: argument 'remaining' must hold at least the failed step")
        actions = [action_of_step(s) for s in remaining]
        start_index = remaining[0].index
        notes = []
        if memory.key_frames:
            observed = _scene_from_detections(extract_objects(memory.key_frames[-1], self.perception))
            if observed is not None:
                actions, notes = self._repair(observed, actions)
        if not actions:
            # Everything left already holds: a single no-op-free step is impossible, so re-issue the last one.
            actions = [action_of_step(remaining[-1])]
            notes.append("every remaining step already holds; re-issuing the last one")
        steps = [make_step(a, start_index + k, self.config) for k, a in enumerate(actions)]
        rationale = "replanned the remaining steps from the last key frame" + (": " + "; ".join(notes) if notes else "")
        return Plan(goal=goal, steps=steps, rationale=rationale)

    def _repair(self, scene: Scene, actions: list[Action]) -> tuple[list[Action], list[str]]:
        out: list[Action] = []
        notes: list[str] = []
        for action in actions:
            try:
                idx = scene.find(action.target)
            except ValueError:
                if action.kind == "recolour" and any(o.colour == action.arg and o.shape == action.target.shape for o in scene.objects):
                    notes.append(f"'{canonical_prompt(action)}' already holds: dropped")
                    continue
                same_shape = [o for o in scene.objects if o.shape == action.target.shape]
                taken = {o.colour for o in scene.objects}
                if len(same_shape) == 1 and action.target.colour not in taken:
                    stray = same_shape[0]
                    fix = Action("recolour", ObjectRef(stray.colour, stray.shape), action.target.colour)
                    notes.append(f"the {action.target} looks {stray.colour} now: recolour it first")
                    out.append(fix)
                    scene = apply_action(scene, fix, self.config)
                    idx = scene.find(action.target)
                else:
                    notes.append(f"no {action.target} in view; keeping the step")
                    out.append(action)
                    continue
            if _predicate_holds(scene, idx, action, self.config):
                notes.append(f"'{canonical_prompt(action)}' already holds: dropped")
                continue
            out.append(action)
            try:
                scene = apply_action(scene, action, self.config)
            except ValueError:
                pass
        return out, notes


def _predicate_holds(scene: Scene, idx: int, action: Action, config: WorldConfig) -> bool:
    obj = scene.objects[idx]
    if action.kind == "move_to":
        cx, cy = REGIONS[action.arg]
        return math.hypot(obj.center[0] - cx, obj.center[1] - cy) < 0.05
    if action.kind == "recolour":
        return obj.colour == action.arg
    return False


def _scene_from_detections(dets: list[DetectedObject]) -> Scene | None:
    """The largest detection per colour as a Scene (None if it is not a valid scene)."""
    seen: dict[str, DetectedObject] = {}
    for d in dets:
        if d.colour not in seen:
            seen[d.colour] = d
    try:
        return Scene(tuple(d.as_state() for d in list(seen.values())[:3]))
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------
# Critic
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CriticConfig:
    """Tolerances of the world critic, normalised to the frame size unless stated."""

    position_tol: float = 0.06
    """An object counts as not moved when its centroid moved less than this (3.8 px at 64x64)."""
    region_tol: float = 0.1
    """A move to a region succeeds when the centroid ends this close to the expected position."""
    min_progress: float = 0.6
    """A directional move or resize must reach this fraction of the expected change."""
    no_progress: float = 0.3
    """Below this fraction of the expected change the target counts as not having acted."""
    max_overshoot: float = 1.6
    """Above this multiple of the expected change the action was the wrong one."""
    max_lateral: float = 0.35
    """Largest sideways drift of a directional move, as a fraction of its length."""
    size_tol: float = 1.45
    """An untouched object's area may change by this factor (either way) before it counts as resized."""
    max_jump: float = 0.1
    """Largest centroid step between consecutive analysed frames before it counts as a teleport."""
    frame_stride: int = 2
    """Analyse every ``frame_stride``-th frame of the segment (and always the last) for the temporal checks."""
    perception: PerceptionConfig = field(default_factory=PerceptionConfig)
    """Segmentation thresholds."""

    def __post_init__(self) -> None:
        for name in ("position_tol", "region_tol", "min_progress", "no_progress", "max_lateral", "max_jump"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                raise ValueError(f"CriticConfig: argument '{name}' must be in (0, 1), got {value!r}")
        if not self.no_progress < self.min_progress:
            raise ValueError(f"CriticConfig: argument 'no_progress' ({self.no_progress}) must be below 'min_progress' ({self.min_progress})")
        if not self.max_overshoot > 1.0 or not self.size_tol > 1.0:
            raise ValueError(f"CriticConfig: arguments 'max_overshoot'/'size_tol' must be > 1, got {self.max_overshoot}, {self.size_tol}")
        if isinstance(self.frame_stride, bool) or not isinstance(self.frame_stride, int) or self.frame_stride < 1:
            raise ValueError(f"CriticConfig: argument 'frame_stride' must be a positive int, got {self.frame_stride!r}")


_PRIORITY = {"vanish": 0, "wrong": 1, "physics": 2, "incomplete": 3, "drift": 4}
_KIND = {"vanish": FailureKind.DRIFT, "wrong": FailureKind.WRONG_ACTION, "physics": FailureKind.PHYSICS,
         "incomplete": FailureKind.INCOMPLETE_ACTION, "drift": FailureKind.DRIFT}
_VERB_ING = {"move": "moving", "move_to": "moving", "recolour": "changing colour", "grow": "growing", "shrink": "shrinking"}


def _direction_name(dx: float, dy: float) -> str:
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def _dist(a: tuple[float, float], b: tuple[float, float]) -> float:
    return math.hypot(a[0] - b[0], a[1] - b[1])


@dataclass
class _Problem:
    category: str
    message: str


class WorldCritic:
    """CriticAgent for the bundled world (see the module docstring for what it checks)."""

    def __init__(self, config: WorldConfig | None = None, critic: CriticConfig | None = None):
        self.config = config or WorldConfig()
        self.critic = critic or CriticConfig()

    # -- public ---------------------------------------------------------------------------------

    def judge(self, frames: np.ndarray, step: Step, memory: WorldMemory) -> Verdict:
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
            raise ValueError(f"WorldCritic.judge: argument 'frames' must be (F, H, W, 3) uint8 with F >= 1, got {frames.dtype} {frames.shape}")
        try:
            action = action_of_step(step)
        except GoalParseError as err:
            return Verdict(score=0.0, completed=False, failure=FailureKind.OTHER, plan_is_wrong=True,
                           feedback=f"the step is not in the world's language: {err}")
        reference = memory.key_frames[-1] if memory.key_frames else frames[0]
        if reference.shape != frames.shape[1:]:
            logger.warning("key frame %s and segment %s differ in size; using the segment's first frame",
                           reference.shape, frames.shape[1:])
            reference = frames[0]
        stride = self.critic.frame_stride
        picks = sorted(set(range(0, frames.shape[0], stride)) | {frames.shape[0] - 1})
        batch = np.concatenate([reference[None], frames[picks]])
        detections = extract_objects(batch, self.critic.perception)
        return self._judge_detections(detections[0], detections[1:], picks, action, step)

    # -- internals ------------------------------------------------------------------------------

    def _judge_detections(self, start_dets, frame_dets, picks, action: Action, step: Step) -> Verdict:
        refined = canonical_prompt(action) if canonical_prompt(action) != step.prompt.strip() else None
        start = _scene_from_detections(start_dets)
        if start is None:
            return Verdict(score=0.0, completed=False, failure=FailureKind.OTHER, plan_is_wrong=False,
                           feedback="no object is visible at the start of the segment")
        try:
            t = start.find(action.target)
        except ValueError:
            t = self._find_loosely(start, action.target)
            if t is None:
                present = ", ".join(o.name for o in start.objects)
                return Verdict(score=0.0, completed=False, failure=FailureKind.OTHER, plan_is_wrong=True,
                               feedback=f"there is no {action.target} in the scene to act on (it shows: {present})")
        try:
            expected = apply_action(start, Action(action.kind, ObjectRef(start.objects[t].colour, start.objects[t].shape), action.arg), self.config)
        except ValueError as err:
            return Verdict(score=0.0, completed=False, failure=FailureKind.OTHER, plan_is_wrong=True,
                           feedback=f"the step cannot be done from the current scene: {err}")
        end_dets = frame_dets[-1]
        match, appeared = self._match(start, expected, end_dets)
        problems: list[_Problem] = []
        for d in appeared:
            problems.append(_Problem("vanish", f"a {d.colour} {d.shape} appeared"))
        for i, o in enumerate(start.objects):
            if match[i] is None:
                problems.append(_Problem("vanish", f"the {o.name} vanished"))
        progress = 0.0
        target_acted = False
        if match[t] is not None:
            progress, target_acted, msgs = self._check_target(start.objects[t], expected.objects[t], match[t], action)
            problems.extend(msgs)
        problems.extend(self._check_untouched(start, expected, match, t, action, target_acted))
        problems.extend(self._check_time(start, frame_dets, picks))
        problems.sort(key=lambda p: _PRIORITY[p.category])
        if not problems:
            return Verdict(score=1.0, completed=True, failure=None, feedback=f"done: {canonical_prompt(action)}", refined_prompt=None)
        num_objects = len(start.objects)
        consistency = max(0.0, 1.0 - sum(p.category in ("vanish", "drift", "physics") for p in problems) / (num_objects + 1))
        score = min(0.85, 0.7 * progress + 0.3 * consistency)
        feedback = "; ".join(dict.fromkeys(p.message for p in problems))
        return Verdict(score=score, completed=False, failure=_KIND[problems[0].category], feedback=feedback,
                       refined_prompt=refined, plan_is_wrong=False)

    @staticmethod
    def _find_loosely(scene: Scene, ref: ObjectRef) -> int | None:
        """The target by colour alone when its shape was misread (colours are unique in a scene)."""
        hits = [i for i, o in enumerate(scene.objects) if o.colour == ref.colour]
        return hits[0] if len(hits) == 1 else None

    def _match(self, start: Scene, expected: Scene, dets: list[DetectedObject]):
        """Assign end detections to start objects: old colour, then expected colour, then nearest unexplained."""
        match: list[DetectedObject | None] = [None] * len(start.objects)
        free = list(dets)

        def take(i: int, pred, near: tuple[float, float], limit: float = math.inf) -> None:
            cands = [d for d in free if pred(d) and _dist(d.center, near) <= limit]
            if cands:
                best = min(cands, key=lambda d: _dist(d.center, near))
                match[i] = best
                free.remove(best)

        # Colours are unique in a scene: an object still showing its old colour is that object (this
        # also catches a target that failed to change colour); then the asked-for new colour.
        passes = (
            lambda i: (lambda d: d.colour == start.objects[i].colour),
            lambda i: (lambda d: d.colour == expected.objects[i].colour),
        )
        for make_pred in passes:
            for i in range(len(start.objects)):
                if match[i] is None:
                    take(i, make_pred(i), expected.objects[i].center)
        # Detections left over: the nearest one of the same shape, then of any shape, is the object with
        # a changed colour (the caller judges whether that change was asked for).
        for same_shape in (True, False):
            for i in range(len(start.objects)):
                if match[i] is None:
                    shape = start.objects[i].shape
                    take(i, lambda d: d.shape == shape or not same_shape, start.objects[i].center, 0.35)
        return match, free

    def _check_target(self, s: ObjectState, x: ObjectState, e: DetectedObject, action: Action):
        """(progress in [0, 1], whether the target acted at all, problems) for the step's target."""
        c = self.critic
        name = s.name
        problems: list[_Problem] = []
        d = (e.center[0] - s.center[0], e.center[1] - s.center[1])
        moved = math.hypot(*d)
        ratio = e.area / max(s.area, 1e-9)
        progress = 0.0
        acted = False
        if action.kind in ("move", "move_to"):
            v = (x.center[0] - s.center[0], x.center[1] - s.center[1])
            length = math.hypot(*v)
            if length < 1e-6:
                progress = 1.0 if moved < c.position_tol else 0.0
                if moved >= c.position_tol:
                    problems.append(_Problem("wrong", f"the {name} moved {_direction_name(*d)} although it cannot go {action.arg}"))
            else:
                u = (v[0] / length, v[1] / length)
                along = d[0] * u[0] + d[1] * u[1]
                lateral = abs(d[0] * u[1] - d[1] * u[0])
                frac = along / length
                progress = float(min(max(frac, 0.0), 1.0))
                acted = moved >= max(c.no_progress * length, c.position_tol)
                if action.kind == "move":
                    ok = c.min_progress <= frac <= c.max_overshoot and lateral <= max(c.max_lateral * length, c.position_tol)
                    want = action.arg
                else:
                    ok = _dist(e.center, x.center) <= c.region_tol
                    want = f"to the {action.arg}"
                if not ok:
                    if not acted:
                        problems.append(_Problem("incomplete", f"the {name} did not move (it should move {want})"))
                    elif frac >= c.no_progress and lateral <= max(c.max_lateral * max(along, 0.0), c.position_tol) and frac < 1.0:
                        px = along * self.config.width
                        problems.append(_Problem("incomplete", f"the {name} moved {want} only {px:.0f} of {length * self.config.width:.0f} px"))
                    elif action.kind == "move":
                        if frac > c.max_overshoot and lateral <= c.max_lateral * along:
                            problems.append(_Problem("wrong", f"the {name} moved too far {want} ({along * self.config.width:.0f} px instead of {length * self.config.width:.0f})"))
                        else:
                            problems.append(_Problem("wrong", f"the {name} moved {_direction_name(*d)} instead of {want}"))
                    else:
                        problems.append(_Problem("wrong", f"the {name} moved to the {region_of(*e.center)} instead of the {action.arg}"))
            problems.extend(self._persist(s, e, name, keep_position=False, keep_colour=True, keep_size=True))
        elif action.kind == "recolour":
            if e.colour == action.arg:
                progress, acted = 1.0, True
            elif e.colour == s.colour:
                problems.append(_Problem("incomplete", f"the {name} is still {s.colour} (it should turn {action.arg})"))
            else:
                acted = True
                problems.append(_Problem("wrong", f"the {name} turned {e.colour} instead of {action.arg}"))
            problems.extend(self._persist(s, e, name, keep_position=True, keep_colour=False, keep_size=True))
        else:
            want = x.area / s.area
            g = math.log(max(ratio, 1e-6)) / math.log(want)
            progress = float(min(max(g, 0.0), 1.0))
            word = "grow" if action.kind == "grow" else "shrink"
            past = "grew" if action.kind == "grow" else "shrank"
            other = "shrank" if action.kind == "grow" else "grew"
            acted = abs(g) >= c.no_progress
            if g < -c.no_progress:
                problems.append(_Problem("wrong", f"the {name} {other} instead of {'growing' if word == 'grow' else 'shrinking'}"))
            elif g < c.no_progress:
                problems.append(_Problem("incomplete", f"the {name} did not {word} (area x{ratio:.2f})"))
            elif g < c.min_progress:
                problems.append(_Problem("incomplete", f"the {name} {past} only a little (area x{ratio:.2f}, expected x{want:.2f})"))
            elif g > c.max_overshoot + 0.25:
                problems.append(_Problem("wrong", f"the {name} {past} too much (area x{ratio:.2f}, expected x{want:.2f})"))
            shift = _dist(e.center, x.center)
            if shift > c.position_tol:
                problems.append(_Problem("drift", f"the {name} also moved {_direction_name(e.center[0] - x.center[0], e.center[1] - x.center[1])}"))
            problems.extend(self._persist(s, e, name, keep_position=False, keep_colour=True, keep_size=False))
        # The target did something other than what was asked: that is the wrong action, not an unfinished one.
        if not acted and any(p.category == "drift" for p in problems):
            problems = [_Problem("wrong", f"the {name} changed in the wrong way instead of {_VERB_ING[action.kind]}: "
                                 + ", ".join(p.message for p in problems))]
            acted = True
        return progress, acted, problems

    def _persist(self, s: ObjectState, e: DetectedObject, name: str, *, keep_position: bool, keep_colour: bool,
                 keep_size: bool) -> list[_Problem]:
        c = self.critic
        out = []
        if keep_position and _dist(e.center, s.center) > c.position_tol:
            out.append(_Problem("drift", f"the {name} moved {_direction_name(e.center[0] - s.center[0], e.center[1] - s.center[1])}"))
        if keep_colour and e.colour != s.colour:
            out.append(_Problem("drift", f"the {name} turned {e.colour}"))
        if keep_size:
            ratio = e.area / max(s.area, 1e-9)
            if ratio > c.size_tol or ratio < 1.0 / c.size_tol:
                out.append(_Problem("drift", f"the {name} {'grew' if ratio > 1 else 'shrank'} (area x{ratio:.2f})"))
        if e.shape != s.shape:
            out.append(_Problem("drift", f"the {name} became a {e.shape}"))
        return out

    def _check_untouched(self, start: Scene, expected: Scene, match, t: int, action: Action, target_acted: bool) -> list[_Problem]:
        c = self.critic
        out = []
        for i, s in enumerate(start.objects):
            e = match[i]
            if i == t or e is None:
                continue
            changes = self._persist(s, e, s.name, keep_position=True, keep_colour=True, keep_size=True)
            if not changes:
                continue
            did_asked = False
            if not target_acted:
                d = (e.center[0] - s.center[0], e.center[1] - s.center[1])
                ratio = e.area / max(s.area, 1e-9)
                if action.kind == "move":
                    did_asked = math.hypot(*d) > c.position_tol and _direction_name(*d) == action.arg
                elif action.kind == "move_to":
                    did_asked = _dist(e.center, REGIONS[action.arg]) <= c.region_tol * 1.5 and math.hypot(*d) > c.position_tol
                elif action.kind == "recolour":
                    did_asked = e.colour == action.arg
                elif action.kind == "grow":
                    did_asked = ratio > c.size_tol
                else:
                    did_asked = ratio < 1.0 / c.size_tol
            if did_asked:
                out.append(_Problem("wrong", f"the {s.name} was {'moved' if action.kind.startswith('move') else 'changed'} "
                                    f"instead of the {action.target} ({'; '.join(p.message for p in changes)})"))
            else:
                out.extend(_Problem(p.category, p.message.replace(f"the {s.name} ", f"the {s.name} also ", 1)) for p in changes)
        return out

    def _check_time(self, start: Scene, frame_dets, picks) -> list[_Problem]:
        """Teleports between analysed frames and untouched objects missing for several frames."""
        c = self.critic
        out: list[_Problem] = []
        prev = {o.colour: (o.center, -1) for o in start.objects}
        missing_run = {o.colour: 0 for o in start.objects}
        reported_missing = set()
        reported_jump = set()
        for dets, frame in zip(frame_dets, picks):
            by_colour: dict[str, DetectedObject] = {}
            for d in dets:
                by_colour.setdefault(d.colour, d)
            for colour in list(prev):
                d = by_colour.get(colour)
                if d is None:
                    missing_run[colour] += 1
                    if missing_run[colour] >= 2 and colour not in reported_missing and frame != picks[-1]:
                        reported_missing.add(colour)
                    continue
                missing_run[colour] = 0
                center, last = prev[colour]
                gap = max(frame - last, 1)
                jump = _dist(d.center, center)
                if jump > c.max_jump * (1.0 + 0.5 * (gap - 1)) and colour not in reported_jump:
                    reported_jump.add(colour)
                    where = "from the previous segment's last frame" if last < 0 else f"between frames {last} and {frame}"
                    out.append(_Problem("physics", f"the {colour} {d.shape} jumped {jump * self.config.width:.1f} px {where}"))
                prev[colour] = (d.center, frame)
        # An object that is missing mid-segment but back at the end flickered; one missing at the end is
        # reported by the end-state check. A colour being wiped away legitimately disappears at the end.
        for colour in reported_missing:
            if colour in {d.colour for d in frame_dets[-1]}:
                name = next(o.name for o in start.objects if o.colour == colour)
                out.append(_Problem("vanish", f"the {name} vanished for part of the segment"))
        return out


__all__ = ["CriticConfig", "WorldCritic", "WorldPlanner"]
