"""State extraction from pixels: centroid accuracy, colour/shape/size, connected components."""

import random
from collections import deque

import numpy as np
import pytest

from spiral_rt.world.goals import random_scene
from spiral_rt.world.perception import connected_components, extract_objects
from spiral_rt.world.render import degrade, render_frame, render_states
from spiral_rt.world.scene import Action, ObjectRef, WorldConfig, animation_states, simulate

CFG = WorldConfig()


def _accuracy(frames, scenes, cfg):
    errors, wrong = [], []
    for dets, states in zip(extract_objects(frames), scenes):
        assert len(dets) == len(states), (dets, states)
        for o in states:
            (d,) = [d for d in dets if d.colour == o.colour]
            errors.append(np.hypot(*np.subtract(d.center_px(cfg), (o.center[0] * cfg.width, o.center[1] * cfg.height))))
            if (d.shape, d.size) != (o.shape, o.size):
                wrong.append((o, d))
    return np.array(errors), wrong


@pytest.mark.parametrize("noise, blur", [(0.0, 0.0), (8.0, 0.6)])
def test_static_scenes(noise, blur):
    rng = random.Random(7)
    scenes = [random_scene(rng, CFG).objects for _ in range(150)]
    frames = degrade(np.stack([render_frame(s, CFG) for s in scenes]), noise_std=noise, blur_sigma=blur,
                     rng=np.random.default_rng(0))
    errors, wrong = _accuracy(frames, scenes, CFG)
    assert errors.max() < 1.5, errors.max()
    assert errors.mean() < 0.3
    assert len(wrong) <= len(errors) // 100, wrong[:3]


def test_moving_objects_every_frame():
    """Centroids of objects in motion (sub-pixel positions, every frame of an animation)."""
    rng = random.Random(3)
    states = []
    while len(states) < 120:
        scene = random_scene(rng, CFG)
        o = rng.choice(scene.objects)
        action = Action("move_to", ObjectRef(o.colour, o.shape), rng.choice(["center", "top-left", "bottom-right"]))
        try:
            simulate(scene, [action], CFG, strict=True)  # no overlaps on the way
        except ValueError:
            continue
        states.extend(animation_states(scene, action, CFG)[1])
    frames = degrade(render_states(states, CFG), noise_std=8.0, blur_sigma=0.6, rng=np.random.default_rng(1))
    errors, _ = _accuracy(frames, states, CFG)
    assert errors.max() < 1.5 and errors.mean() < 0.3


def test_extract_single_frame_and_validation():
    scene = random_scene(random.Random(1), CFG, num_objects=2)
    dets = extract_objects(render_frame(scene, CFG))
    assert {d.colour for d in dets} == {o.colour for o in scene.objects}
    with pytest.raises(ValueError, match="'frames'"):
        extract_objects(np.zeros((4, 4), np.uint8))


def test_connected_components_match_breadth_first_search():
    rng = np.random.default_rng(0)
    for trial in range(10):
        lab = rng.integers(-1, 3, size=(2, 17, 19))
        if trial % 2:
            lab = np.where(rng.random(lab.shape) < 0.5, -1, lab)
        cc = connected_components(lab)
        for f in range(2):
            seen = np.zeros(lab.shape[1:], bool)
            for y, x in zip(*np.nonzero(lab[f] >= 0)):
                if seen[y, x]:
                    continue
                comp, queue = [], deque([(y, x)])
                seen[y, x] = True
                while queue:
                    a, b = queue.popleft()
                    comp.append((a, b))
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            c, d = a + dy, b + dx
                            if 0 <= c < 17 and 0 <= d < 19 and not seen[c, d] and lab[f, c, d] == lab[f, y, x]:
                                seen[c, d] = True
                                queue.append((c, d))
                ids = {int(cc[f, a, b]) for a, b in comp}
                assert len(ids) == 1 and (cc[f] == cc[f, y, x]).sum() == len(comp)
        assert np.all((cc < 0) == (lab < 0))
