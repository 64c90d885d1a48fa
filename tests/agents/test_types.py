"""The typed records: validation with named arguments, JSON round trips, world memory."""

import json

import numpy as np
import pytest

from spiral_rt.agents.types import ExecutedStep, FailureKind, Goal, Plan, Step, Verdict, WorldMemory


def _json_round_trip(obj):
    return type(obj).from_dict(json.loads(json.dumps(obj.to_dict())))


def test_records_round_trip_through_json():
    goal = Goal("stack the cubes", id="g7")
    steps = [Step("pick up the red cube", 3, ["red cube in the gripper"], 0), Step("put it on the blue cube", 2, [], 1)]
    plan = Plan(goal, steps, rationale="two motions")
    verdict = Verdict(0.25, False, FailureKind.PHYSICS, "the cube passes through the table", "lift the cube higher", True)
    for obj in (goal, steps[0], plan, verdict, Verdict(1.0, True)):
        assert _json_round_trip(obj) == obj
    assert plan.total_chunks == 5
    assert verdict.to_dict()["failure"] == "physics"
    assert FailureKind("drift_or_inconsistency") is FailureKind.DRIFT


@pytest.mark.parametrize("make, argument", [
    (lambda: Goal(""), "text"),
    (lambda: Step("", 1), "prompt"),
    (lambda: Step("x", 0), "span_chunks"),
    (lambda: Step("x", True), "span_chunks"),
    (lambda: Step("x", 1, "not a list"), "success_criteria"),
    (lambda: Step("x", 1, index=-1), "index"),
    (lambda: Plan(Goal("g"), []), "steps"),
    (lambda: Verdict(1.5, True), "score"),
    (lambda: Verdict(float("nan"), True), "score"),
    (lambda: Verdict(0.5, "yes"), "completed"),
    (lambda: Verdict(0.5, False, "melted"), "failure"),
])
def test_invalid_records_name_the_argument(make, argument):
    with pytest.raises(ValueError, match=f"'{argument}'"):
        make()


def test_verdict_accepts_failure_strings_and_drops_blank_refinement():
    v = Verdict(0.1, False, "wrong_action", refined_prompt="  ")
    assert v.failure is FailureKind.WRONG_ACTION and v.refined_prompt is None


def test_world_memory_records_renders_and_round_trips():
    memory = WorldMemory(max_key_frames=2)
    assert "Nothing" in memory.render()
    frames = [np.full((4, 6, 3), k, np.uint8) for k in range(3)]
    for k, frame in enumerate(frames):
        memory.record(Step(f"step {k}", k + 1, index=k), Verdict(0.9, True, feedback=f"fine {k}"), frame,
                      prompt_used=f"step {k} refined" if k == 1 else None, attempts=k + 1)
    assert [e.attempts for e in memory.executed] == [1, 2, 3]
    assert len(memory.key_frames) == 2 and memory.key_frames[0][0, 0, 0] == 1  # oldest dropped
    assert memory.num_chunks == 6
    text = memory.render()
    assert text == memory.summary
    assert "step 1 refined" in text and "3 attempts" in text and "fine 2" in text
    assert "earlier steps omitted" in memory.render(max_steps=1)
    back = _json_round_trip(memory)
    assert back == memory and back.key_frames[1].dtype == np.uint8
    assert isinstance(back.executed[0], ExecutedStep)


def test_world_memory_rejects_bad_key_frames():
    with pytest.raises(ValueError, match="key_frame"):
        WorldMemory().record(Step("x", 1), Verdict(1.0, True), np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="key_frame"):
        WorldMemory(key_frames=[np.zeros((4, 4, 3), np.float32)])
