"""The world's programmatic agents against ground truth on rendered (not generated) videos."""

import logging
import random
from collections import Counter

import numpy as np
import pytest

from spiral_rt.agents.protocols import CriticAgent, PlanAgent
from spiral_rt.agents.types import FailureKind, Goal, Verdict, WorldMemory
from spiral_rt.world.agents import WorldCritic, WorldPlanner
from spiral_rt.world.goals import random_goal
from spiral_rt.world.language import make_step
from spiral_rt.world.render import degrade, render_frame, render_states
from spiral_rt.world.scene import Action, ObjectRef, ObjectState, Scene, WorldConfig, interpolate, simulate

from .executions import MISTAKES, correct

logger = logging.getLogger(__name__)
CFG = WorldConfig()
NOISE, BLUR = 8.0, 0.6


def _judge_all(num_goals: int, seed_offset: int):
    """Judge, for every step of ``num_goals`` random goals, the correct execution and one mistake
    (cycling through the kinds of mistake), on noisy blurred frames, with memory as the loop keeps it."""
    critic = WorldCritic(CFG)
    noise = np.random.default_rng(seed_offset)
    names = list(MISTAKES)
    results = []  # (execution name, expected kind, verdict)
    turn = 0
    for g in range(num_goals):
        spec = random_goal(seed_offset + g, CFG)
        rng = random.Random(seed_offset + g)
        scenes = simulate(spec.scene, list(spec.actions), CFG)
        memory = WorldMemory()
        for k, action in enumerate(spec.actions):
            step = make_step(action, k, CFG)
            tried = [("correct",) + correct(scenes[k], action, CFG, rng)]
            for _ in range(len(names)):
                name = names[turn % len(names)]
                turn += 1
                states, kind = MISTAKES[name](scenes[k], action, CFG, rng)
                if states is not None:
                    tried.append((name, states, kind))
                    break
            for name, states, kind in tried:
                frames = degrade(render_states(states, CFG), noise_std=NOISE, blur_sigma=BLUR, rng=noise)
                results.append((name, kind, critic.judge(frames, step, memory)))
            key = degrade(render_frame(scenes[k + 1], CFG), noise_std=NOISE, blur_sigma=BLUR, rng=noise)
            memory.record(step, Verdict(score=1.0, completed=True), key)
    return results


def _agrees(kind, verdict) -> bool:
    return verdict.completed if kind is None else (not verdict.completed and verdict.failure == kind)


def test_critic_agrees_with_ground_truth():
    results = _judge_all(num_goals=70, seed_offset=1000)
    per = Counter()
    agree = Counter()
    for name, kind, verdict in results:
        per[name] += 1
        agree[name] += _agrees(kind, verdict)
    rate = sum(agree.values()) / len(results)
    table = ", ".join(f"{n} {agree[n]}/{per[n]}" for n in sorted(per))
    logger.info("critic agreement %.4f over %d judgements (%s)", rate, len(results), table)
    assert len(results) >= 300 and set(per) == {"correct", *MISTAKES}
    assert rate >= 0.98, table
    assert agree["correct"] / per["correct"] >= 0.98, table  # correct executions are accepted
    for name in MISTAKES:
        assert per[name] >= 8 and agree[name] / per[name] >= 0.9, table  # each kind of mistake is caught


def _scene2():
    return Scene((ObjectState("circle", "red", "medium", (0.5, 0.5)), ObjectState("square", "blue", "small", (0.8, 0.2))))


def _frames(states):
    return render_states(states, CFG)


def _still(scene, n=12):
    return [scene.objects] * n


def test_feedback_is_specific():
    critic = WorldCritic(CFG)
    scene = _scene2()
    step = make_step(Action("move", ObjectRef("red", "circle"), "left"), 0, CFG)
    v = critic.judge(_frames(correct(scene, Action("move", ObjectRef("red", "circle"), "right"), CFG, None)[0]), step, WorldMemory())
    assert not v.completed and v.failure == FailureKind.WRONG_ACTION
    assert "the red circle moved right instead of left" in v.feedback
    # A new object: "a green triangle appeared".
    extra = ObjectState("triangle", "green", "small", (0.2, 0.8))
    states = correct(scene, Action("move", ObjectRef("red", "circle"), "left"), CFG, None)[0]
    v = critic.judge(_frames([s + (extra,) if i > 4 else s for i, s in enumerate(states)]), step, WorldMemory())
    assert v.failure == FailureKind.DRIFT and "a green triangle appeared" in v.feedback
    # Nothing happens.
    v = critic.judge(_frames(_still(scene)), step, WorldMemory())
    assert v.failure == FailureKind.INCOMPLETE_ACTION and "did not move" in v.feedback and v.score < 0.5
    # The blue square moves left instead of the red circle.
    other = simulate(scene, [Action("move", ObjectRef("blue", "square"), "left")], CFG)[-1]
    v = critic.judge(_frames([interpolate(scene, other, None, (i + 1) / 12) for i in range(12)]), step, WorldMemory())
    assert v.failure == FailureKind.WRONG_ACTION and "blue square" in v.feedback and "instead of the red circle" in v.feedback
    # Correct execution: accepted with score 1.
    v = critic.judge(_frames(correct(scene, Action("move", ObjectRef("red", "circle"), "left"), CFG, None)[0]), step, WorldMemory())
    assert v.completed and v.score == 1.0 and v.failure is None


def test_critic_uses_memory_and_flags_impossible_steps():
    critic = WorldCritic(CFG)
    scene = _scene2()
    step = make_step(Action("move", ObjectRef("red", "circle"), "left"), 0, CFG)
    moved = simulate(scene, [Action("move", ObjectRef("red", "circle"), "left")], CFG)[-1]
    # The segment only shows the end state: without memory nothing happened, with the key frame it moved.
    frames = _frames(_still(moved))
    assert not critic.judge(frames, step, WorldMemory()).completed
    memory = WorldMemory()
    memory.record(make_step(Action("grow", ObjectRef("blue", "square")), 0, CFG), Verdict(1.0, True), render_frame(scene, CFG))
    v = critic.judge(frames, step, memory)
    assert not v.completed and v.failure == FailureKind.PHYSICS and "jumped" in v.feedback  # it teleported at the cut
    # A step about an object that is not there, or that cannot happen, is the plan's fault.
    v = critic.judge(frames, make_step(Action("move", ObjectRef("green", "circle"), "up"), 0, CFG), WorldMemory())
    assert v.plan_is_wrong and not v.completed and "no green circle" in v.feedback
    v = critic.judge(frames, make_step(Action("shrink", ObjectRef("blue", "square")), 0, CFG), WorldMemory())
    assert v.plan_is_wrong and "already small" in v.feedback
    with pytest.raises(ValueError, match="'frames'"):
        critic.judge(np.zeros((2, 64, 64), np.uint8), step, WorldMemory())


def test_agents_implement_the_protocols():
    assert isinstance(WorldPlanner(CFG), PlanAgent)
    assert isinstance(WorldCritic(CFG), CriticAgent)


def test_planner_plans_and_replans_from_memory():
    planner = WorldPlanner(CFG)
    goal = Goal("move the red circle to the top-left, then make the blue square green, then move the green square down", id="g")
    plan = planner.plan(goal, WorldMemory())
    assert [s.prompt for s in plan.steps] == ["move the red circle to the top-left", "make the blue square green",
                                              "move the green square down"]
    assert [s.index for s in plan.steps] == [0, 1, 2] and plan.goal == goal and plan.rationale
    # The last key frame shows the blue square gone yellow (drift): the replan first turns it blue again,
    # so that the remaining steps' names are right.
    scene = _scene2()
    after1 = simulate(scene, [Action("move_to", ObjectRef("red", "circle"), "top-left")], CFG)[-1]
    drifted = simulate(after1, [Action("recolour", ObjectRef("blue", "square"), "yellow")], CFG)[-1]
    memory = WorldMemory()
    memory.record(plan.steps[0], Verdict(1.0, True), render_frame(drifted, CFG))
    new = planner.replan(goal, memory, plan.steps[1:])
    assert [s.prompt for s in new.steps] == ["make the yellow square blue", "make the blue square green", "move the green square down"]
    assert new.steps[0].index == 1 and "recolour" in new.rationale
    # A step that already holds is dropped.
    done = simulate(after1, [Action("recolour", ObjectRef("blue", "square"), "green")], CFG)[-1]
    memory = WorldMemory()
    memory.record(plan.steps[0], Verdict(1.0, True), render_frame(done, CFG))
    new = planner.replan(goal, memory, plan.steps[1:])
    assert [s.prompt for s in new.steps] == ["move the green square down"] and "already holds" in new.rationale
    with pytest.raises(ValueError, match="'remaining'"):
        planner.replan(goal, memory, [])
