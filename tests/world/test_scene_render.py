"""Scene semantics and the renderer: determinism, animation end points, ground truth, validation."""

import numpy as np
import pytest

from spiral_rt.world.goals import random_goal, scene_for_goal
from spiral_rt.world.perception import label_colours
from spiral_rt.world.render import degrade, render_frame, render_step, render_video
from spiral_rt.world.scene import (PALETTE, REGIONS, SIZES, Action, ObjectRef, ObjectState, Scene, WorldConfig,
                                   apply_action, simulate)

CFG = WorldConfig()


def _scene():
    return Scene((ObjectState("circle", "red", "small", (0.2, 0.2)), ObjectState("square", "blue", "large", (0.5, 0.5)),
                  ObjectState("triangle", "yellow", "medium", (0.8, 0.8))))


def test_render_is_deterministic_and_goal_dependent():
    a = random_goal(11)
    v1 = render_video(a.scene, list(a.actions), CFG)
    v2 = render_video(a.scene, list(a.actions), CFG)
    assert v1.frames.dtype == np.uint8 and v1.frames.shape[1:] == (64, 64, 3)
    assert np.array_equal(v1.frames, v2.frames) and v1.states == v2.states
    b = random_goal(12)
    assert not np.array_equal(render_frame(a.scene, CFG), render_frame(b.scene, CFG))


def test_video_layout_and_ground_truth():
    scene = _scene()
    actions = [Action("move", ObjectRef("red", "circle"), "right"), Action("move_to", ObjectRef("blue", "square"), "bottom-left"),
               Action("recolour", ObjectRef("yellow", "triangle"), "green")]
    v = render_video(scene, actions, CFG, intro_chunks=1)
    fpc = CFG.frames_per_chunk
    assert v.frames.shape[0] == fpc * (1 + 1 + 2 + 1) == len(v.states) == len(v.step_index)
    assert list(np.unique(v.step_index)) == [-1, 0, 1, 2]
    # Intro frames show the initial scene; each step's last frame is exactly the scene after it.
    assert np.array_equal(v.frames[0], render_frame(scene, CFG))
    for k in range(3):
        last = np.flatnonzero(v.step_index == k)[-1]
        assert v.states[last] == v.scenes[k + 1].objects
        assert np.array_equal(v.frames[last], render_frame(v.scenes[k + 1], CFG))
    # The move goes 16 px to the right, smoothly (monotone, never more than ~2.5 px per frame).
    xs = np.array([s[0].center[0] for s, k in zip(v.states, v.step_index) if k == 0]) * 64
    assert abs(xs[-1] - (0.2 * 64 + 16)) < 1e-6 and np.all(np.diff(xs) >= 0) and np.diff(xs).max() < 2.5
    # During the colour change the object is partly old, partly new colour: both labels present.
    mid = np.flatnonzero(v.step_index == 2)[fpc // 2]
    labels = set(np.unique(label_colours(v.frames[mid])).tolist())
    names = list(PALETTE)
    assert {names.index("yellow"), names.index("green")} <= labels


def test_resolution_128_and_antialiasing_keeps_colours_segmentable():
    cfg = WorldConfig(width=128, height=128)
    frame = render_frame(_scene(), cfg)
    assert frame.shape == (128, 128, 3)
    labels = label_colours(frame)
    names = list(PALETTE)
    for colour, expect in (("red", np.pi * (SIZES["small"] * 128) ** 2), ("blue", (2 * 0.9 * SIZES["large"] * 128) ** 2)):
        area = (labels == names.index(colour)).sum()
        assert abs(area - expect) / expect < 0.05, (colour, area, expect)
    # Edge pixels are blends (antialiasing), but only background-to-own-colour blends.
    assert len({tuple(p) for p in frame.reshape(-1, 3)}) > 10


def test_apply_action_semantics_and_errors():
    scene = _scene()
    moved = apply_action(scene, Action("move", ObjectRef("red", "circle"), "left"), CFG)
    assert moved.objects[0].center[0] == pytest.approx(SIZES["small"] + CFG.margin)  # clamped at the frame edge
    there = apply_action(scene, Action("move_to", ObjectRef("red", "circle"), "bottom"), CFG)
    assert there.objects[0].center == pytest.approx(REGIONS["bottom"])
    grown = apply_action(scene, Action("grow", ObjectRef("red", "circle")), CFG)
    assert grown.objects[0].size == "medium"
    with pytest.raises(ValueError, match="already large"):
        apply_action(scene, Action("grow", ObjectRef("blue", "square")), CFG)
    with pytest.raises(ValueError, match="another object"):
        apply_action(scene, Action("recolour", ObjectRef("blue", "square"), "red"), CFG)
    with pytest.raises(ValueError, match="no object"):
        apply_action(scene, Action("move", ObjectRef("green", "circle"), "up"), CFG)
    with pytest.raises(ValueError, match="step 1"):
        simulate(scene, [Action("move", ObjectRef("red", "circle"), "left")], CFG, strict=True)


@pytest.mark.parametrize("bad, match", [
    (lambda: Scene(()), "objects"),
    (lambda: Scene((ObjectState("circle", "red", "small", (0.3, 0.3)), ObjectState("square", "red", "small", (0.7, 0.7)))), "distinct colours"),
    (lambda: ObjectState("hexagon", "red", "small", (0.5, 0.5)), "'shape'"),
    (lambda: ObjectState("circle", "pink", "small", (0.5, 0.5)), "'colour'"),
    (lambda: Action("move", ObjectRef("red", "circle"), "sideways"), "'arg'"),
    (lambda: WorldConfig(width=64, height=48), "'width' and 'height'"),
    (lambda: WorldConfig(frames_per_chunk=0), "'frames_per_chunk'"),
])
def test_validation_names_the_argument(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_render_step_and_state_round_trip():
    scene = _scene()
    frames, states, end = render_step(scene, Action("shrink", ObjectRef("blue", "square")), CFG)
    assert frames.shape == (CFG.frames_per_chunk, 64, 64, 3) and states[-1] == end.objects
    assert [s[1].size for s in states][-1] == "medium"
    for s in states:
        for o in s:
            assert ObjectState.from_dict(o.to_dict()) == o
    assert Scene.from_dict(scene.to_dict()) == scene


def test_degrade_is_seeded():
    frames = render_step(_scene(), Action("move", ObjectRef("red", "circle"), "down"), CFG)[0]
    a = degrade(frames, noise_std=8, blur_sigma=0.6, rng=np.random.default_rng(3))
    b = degrade(frames, noise_std=8, blur_sigma=0.6, rng=np.random.default_rng(3))
    assert np.array_equal(a, b) and a.shape == frames.shape and not np.array_equal(a, frames)
    with pytest.raises(ValueError, match="'rng'"):
        degrade(frames, noise_std=1.0)


def test_scene_for_goal_holds_the_named_objects_and_every_step_is_valid():
    cfg = WorldConfig()
    for seed in range(20):
        spec = random_goal(seed)
        scene = scene_for_goal(spec.text, seed=seed)
        # the goal's objects (as first named), nothing else; every step valid in turn
        assert sorted((o.colour, o.shape) for o in scene.objects) == sorted(
            {(a.target.colour, a.target.shape) for a in spec.actions if not any(
                b.kind == "recolour" and b.arg == a.target.colour for b in spec.actions[:spec.actions.index(a)])})
        simulate(scene, list(spec.actions), cfg, strict=True)
        assert scene_for_goal(spec.text, seed=seed) == scene  # seeded
    with pytest.raises(ValueError, match="colours are unique"):
        scene_for_goal("move the red circle left, then move the red square up")
    with pytest.raises(ValueError, match="at most 3"):
        scene_for_goal("move the red circle left, then move the blue square up, then move the green triangle up, "
                       "then move the cyan circle down")
    with pytest.raises(ValueError):
        scene_for_goal("dance wildly")
