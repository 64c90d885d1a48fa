"""Random valid scenes and compound goals, and the fixed public goal set (``goals.json``).

Boundaries: this module only *chooses* scenes and actions (seeded, deterministic); their meaning is
``scene``'s and their wording ``language``'s. Every goal it makes is valid under
``scene.simulate(..., strict=True)``: each action can run, no move is cut short by the frame, no two
objects overlap at any frame of any animation, and no step is a no-op, so a correct execution is
unambiguous to judge.

The public goal set is regenerated (and checked in CI to be unchanged) with::

    python -m spiral_rt.world.make_goals            # rewrites spiral_rt/world/goals.json
    python -m spiral_rt.world.make_goals --check    # exits 1 if the file differs from the generator

Randomness is Python's ``random.Random(seed)`` (its sequence for ``random()``, ``randrange`` and
``choice`` is stable across Python versions), so the set depends on nothing but the seed.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from ..agents.types import Goal
from .language import goal_text, parse_goal
from .scene import (DIRECTIONS, PALETTE, REGIONS, SHAPES, SIZE_ORDER, Action, ObjectRef,
                    ObjectState, Scene, WorldConfig, check_layout, simulate)

logger = logging.getLogger(__name__)

GOAL_SET_SEED = 20250807
"""Seed of the public goal set."""
GOAL_SET_SIZE = 60
"""Goals in the public goal set."""
GOAL_SET_PATH = Path(__file__).with_name("goals.json")
"""Where the public goal set lives (inside the package)."""
_ACTION_WEIGHTS = {"move": 0.45, "move_to": 0.25, "recolour": 0.14, "grow": 0.08, "shrink": 0.08}


@dataclass(frozen=True)
class GoalSpec:
    """A compound goal with the scene it starts from."""

    id: str
    """Stable identifier ("world-000")."""
    text: str
    """The goal in canonical language ("move the red circle left, then ...")."""
    scene: Scene
    """The initial scene."""
    actions: tuple[Action, ...]
    """The steps' actions, in order (what ``parse_goal(text)`` returns)."""

    @property
    def goal(self) -> Goal:
        """The agents' Goal record."""
        return Goal(text=self.text, id=self.id)

    def to_dict(self) -> dict:
        return {"id": self.id, "text": self.text, "num_objects": len(self.scene.objects),
                "num_steps": len(self.actions), "scene": self.scene.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "GoalSpec":
        return cls(id=data["id"], text=data["text"], scene=Scene.from_dict(data["scene"]),
                   actions=tuple(parse_goal(data["text"])))


def _check_count(name: str, value, low: int, high: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
        raise ValueError(f"argument '{name}' must be an int in [{low}, {high}] or None, got {value!r}")


def random_scene(rng: random.Random, config: WorldConfig, num_objects: int | None = None, max_tries: int = 1000) -> Scene:
    """A random valid scene: 1-3 objects (or ``num_objects``), distinct colours, inside the frame, apart."""
    _check_count("num_objects", num_objects, 1, 3)
    n = num_objects if num_objects is not None else rng.randint(1, 3)
    for _ in range(max_tries):
        colours = rng.sample(sorted(PALETTE), n)
        objects = []
        for colour in colours:
            shape, size = rng.choice(SHAPES), rng.choice(SIZE_ORDER)
            objects.append(ObjectState(shape, colour, size, (round(rng.uniform(0.15, 0.85), 3), round(rng.uniform(0.15, 0.85), 3))))
        scene = Scene(tuple(objects))
        if check_layout(scene, config) is None:
            return scene
    raise RuntimeError(f"random_scene: no valid layout of {n} objects in {max_tries} tries")


def _random_action(rng: random.Random, scene: Scene) -> Action:
    obj = rng.choice(scene.objects)
    kind = rng.choices(list(_ACTION_WEIGHTS), weights=list(_ACTION_WEIGHTS.values()))[0]
    target = ObjectRef(obj.colour, obj.shape)
    if kind == "move":
        return Action(kind, target, rng.choice(list(DIRECTIONS)))
    if kind == "move_to":
        return Action(kind, target, rng.choice([r for r in REGIONS if r != obj.region]))
    if kind == "recolour":
        taken = {o.colour for o in scene.objects}
        return Action(kind, target, rng.choice([c for c in PALETTE if c not in taken]))
    return Action(kind, target)


def _undoes(previous: Action, action: Action) -> bool:
    """Whether ``action`` plainly reverts ``previous`` (turn it back, grow after shrink, move back)."""
    same = previous.target.shape == action.target.shape
    if previous.kind == "recolour" and action.kind == "recolour":
        return same and action.target.colour == previous.arg and action.arg == previous.target.colour
    if {previous.kind, action.kind} == {"grow", "shrink"}:
        return same and previous.target.colour == action.target.colour
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    return (previous.kind == action.kind == "move" and same and previous.target.colour == action.target.colour
            and opposite[previous.arg] == action.arg)


def random_actions(rng: random.Random, scene: Scene, num_steps: int, config: WorldConfig, max_tries: int = 200) -> list[Action]:
    """``num_steps`` random actions that are valid in sequence from ``scene`` (strict simulation)."""
    _check_count("num_steps", num_steps, 1, 16)
    actions: list[Action] = []
    current = scene
    for k in range(num_steps):
        for _ in range(max_tries):
            action = _random_action(rng, current)
            if actions and _undoes(actions[-1], action):
                continue
            try:
                current = simulate(current, [action], config, strict=True)[-1]
            except ValueError:
                continue
            actions.append(action)
            break
        else:
            raise RuntimeError(f"random_actions: no valid action for step {k + 1} in {max_tries} tries")
    return actions


def random_goal(seed: int, config: WorldConfig | None = None, *, num_objects: int | None = None,
                num_steps: int | None = None, goal_id: str | None = None) -> GoalSpec:
    """A random valid compound goal (2-4 steps unless ``num_steps``) with its initial scene."""
    config = config or WorldConfig()
    _check_count("num_steps", num_steps, 1, 16)
    rng = random.Random(seed)
    for _ in range(100):
        scene = random_scene(rng, config, num_objects)
        n = num_steps if num_steps is not None else rng.randint(2, 4)
        try:
            actions = random_actions(rng, scene, n, config)
        except RuntimeError:
            continue
        return GoalSpec(id=goal_id or f"seed-{seed}", text=goal_text(actions), scene=scene, actions=tuple(actions))
    raise RuntimeError(f"random_goal: seed {seed} found no valid goal")


def scene_for_goal(text: str, seed: int = 0, config: WorldConfig | None = None, max_tries: int = 2000) -> Scene:
    """A start scene in which the goal ``text`` can be carried out: the objects its steps name (with
    their colour and shape before any recolouring), random sizes and positions from ``seed``, such that
    every step is valid in turn (strict simulation). What the closed loop starts from when a goal
    comes without its scene (``spiral-rt generate GOAL`` on the bundled world).

    Raises ``GoalParseError`` (a ValueError) for text outside the world's language and ValueError when
    the goal names more than three objects, contradicts itself (two shapes under one colour) or no
    layout in ``max_tries`` lets every step be carried out.
    """
    config = config or WorldConfig()
    actions = parse_goal(text)
    start: list[ObjectRef] = []
    shape_of: dict[str, str] = {}  # colour -> shape of the object that has it now
    for a in actions:
        ref = a.target
        if ref.colour not in shape_of:
            shape_of[ref.colour] = ref.shape
            start.append(ObjectRef(ref.colour, ref.shape))
        elif shape_of[ref.colour] != ref.shape:
            raise ValueError(f"scene_for_goal: argument 'text' names a {ref.colour} {ref.shape} where the "
                             f"{ref.colour} object is a {shape_of[ref.colour]} (colours are unique in a scene)")
        if a.kind == "recolour":
            if a.arg in shape_of:
                raise ValueError(f"scene_for_goal: argument 'text' recolours the {ref} {a.arg}, a colour another "
                                 "object already has (colours are unique in a scene)")
            shape_of[a.arg] = shape_of.pop(ref.colour)
    if len(start) > 3:
        raise ValueError(f"scene_for_goal: argument 'text' names {len(start)} objects; the world holds at most 3")
    rng = random.Random(seed)
    for _ in range(max_tries):
        scene = Scene(tuple(ObjectState(r.shape, r.colour, rng.choice(SIZE_ORDER),
                                        (round(rng.uniform(0.15, 0.85), 3), round(rng.uniform(0.15, 0.85), 3)))
                            for r in start))
        if check_layout(scene, config) is not None:
            continue
        try:
            simulate(scene, actions, config, strict=True)
        except ValueError:
            continue
        return scene
    raise ValueError(f"scene_for_goal: no layout of {len(start)} object(s) in {max_tries} tries lets every step of "
                     f"{text!r} be carried out (moves need room; sizes have limits)")


def build_goal_set(seed: int = GOAL_SET_SEED, num_goals: int = GOAL_SET_SIZE, config: WorldConfig | None = None) -> list[GoalSpec]:
    """The public goal set: ``num_goals`` goals cycling through 1-3 objects and 2-4 steps.

    Goal i has 1 + i % 3 objects and 2 + (i // 3) % 3 steps, so every (objects, steps) pair appears
    equally often; its randomness comes from ``random.Random(seed * 1000 + i)``.
    """
    if isinstance(num_goals, bool) or not isinstance(num_goals, int) or num_goals < 1:
        raise ValueError(f"build_goal_set: argument 'num_goals' must be a positive int, got {num_goals!r}")
    config = config or WorldConfig()
    return [random_goal(seed * 1000 + i, config, num_objects=1 + i % 3, num_steps=2 + (i // 3) % 3, goal_id=f"world-{i:03d}")
            for i in range(num_goals)]


def goal_set_json(goals: list[GoalSpec], seed: int = GOAL_SET_SEED) -> str:
    """The goals.json text of ``goals``."""
    payload = {
        "description": "The bundled world's public goal set (generated by spiral_rt.world.goals.build_goal_set; do not edit by hand).",
        "seed": seed,
        "num_goals": len(goals),
        "goals": [g.to_dict() for g in goals],
    }
    return json.dumps(payload, indent=1) + "\n"


def load_goal_set(path: str | Path | None = None) -> list[GoalSpec]:
    """Read a goal set file (default: the packaged public set)."""
    path = Path(path) if path is not None else GOAL_SET_PATH
    data = json.loads(path.read_text())
    return [GoalSpec.from_dict(g) for g in data["goals"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write (or check) the bundled world's public goal set.")
    parser.add_argument("--out", type=Path, default=GOAL_SET_PATH, help="where to write goals.json")
    parser.add_argument("--seed", type=int, default=GOAL_SET_SEED)
    parser.add_argument("--num-goals", type=int, default=GOAL_SET_SIZE)
    parser.add_argument("--check", action="store_true", help="exit 1 if --out differs from what the generator writes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    text = goal_set_json(build_goal_set(args.seed, args.num_goals), args.seed)
    if args.check:
        same = args.out.exists() and args.out.read_text() == text
        logger.info("%s is %s", args.out, "up to date" if same else "out of date")
        return 0 if same else 1
    args.out.write_text(text)
    logger.info("wrote %d goals to %s", args.num_goals, args.out)
    return 0

