"""The world's language: parsing, canonical round trips, errors, random goals and the public goal set."""

import json

import pytest

from spiral_rt.world.goals import GOAL_SET_PATH, GOAL_SET_SEED, build_goal_set, goal_set_json, load_goal_set, random_goal
from spiral_rt.world.language import (GoalParseError, action_from_criteria, action_of_step, canonical_prompt, goal_text,
                                      goal_to_steps, parse_goal, success_criteria)
from spiral_rt.world.scene import Action, WorldConfig, simulate

CFG = WorldConfig()


def test_parse_the_example_goal():
    steps = goal_to_steps("move the red circle left, then make the blue square green, then move the red circle to the top-right", CFG)
    assert [s.prompt for s in steps] == ["move the red circle left", "make the blue square green", "move the red circle to the top-right"]
    assert [s.span_chunks for s in steps] == [1, 1, 2] and [s.index for s in steps] == [0, 1, 2]
    assert steps[0].success_criteria == ["moved(red circle, left)", "consistent(scene)"]
    assert steps[1].success_criteria[0] == "recoloured(blue square, green)"
    assert steps[2].success_criteria[0] == "at(red circle, top-right)"


@pytest.mark.parametrize("text, canonical", [
    ("First, grow the small yellow triangle; then shrink the red circle. Finally move the green square to the upper left corner",
     "make the small yellow triangle bigger, then make the red circle smaller, then move the green square to the top-left"),
    ("change the colour of the red circle to blue and then slide the blue circle to the middle",
     "make the red circle blue, then move the blue circle to the center"),
    ("Move the Red Circle up and turn the blue square yellow.", "move the red circle up, then make the blue square yellow"),
    ("paint the cyan triangle purple then make the purple triangle larger",
     "make the cyan triangle purple, then make the purple triangle bigger"),
    ("move the green circle to the bottom right", "move the green circle to the bottom-right"),
    ("move the green circle to the left", "move the green circle to the left"),
])
def test_paraphrases_parse_to_canonical(text, canonical):
    assert goal_text(parse_goal(text)) == canonical
    # "to the left" is the region, "left" the directional move.
    assert parse_goal("move the green circle to the left")[0].kind == "move_to"
    assert parse_goal("move the green circle left")[0].kind == "move"


@pytest.mark.parametrize("text, index, words", [
    ("move the red circle left, then make the blue sqaure green", 1, ["did you mean 'square'"]),
    ("jump the red circle", 0, ["unknown verb 'jump'"]),
    ("move the red circle left, then move the red circle sideways, then grow the red circle", 1, ["unknown direction 'sideways'"]),
    ("make the pink circle blue", 0, ["expected a colour", "'pink'"]),
    ("move the red circle to the far away", 0, ["unknown region"]),
    ("make the red circle shiny", 0, ["unknown colour or size change 'shiny'"]),
    ("grow the red circle a lot", 0, ["unexpected words"]),
])
def test_parse_errors_name_the_clause(text, index, words):
    with pytest.raises(GoalParseError) as info:
        parse_goal(text)
    err = info.value
    assert isinstance(err, ValueError) and err.clause_index == index
    assert f"clause {index + 1} of" in str(err) and repr(err.clause) in str(err)
    for w in words:
        assert w in str(err)


def test_empty_goal_is_an_error():
    with pytest.raises(GoalParseError, match="'text'"):
        parse_goal("   ")


def test_round_trips_over_random_goals():
    for seed in range(200):
        spec = random_goal(seed)
        actions = list(spec.actions)
        assert parse_goal(spec.text) == actions
        assert goal_text(parse_goal(goal_text(actions))) == spec.text
        for k, a in enumerate(actions):
            assert parse_goal(canonical_prompt(a)) == [a]
            assert action_from_criteria(success_criteria(a)) == a
            step = goal_to_steps(spec.text, CFG)[k]
            assert action_of_step(step) == a
        assert 2 <= len(actions) <= 4 and 1 <= len(spec.scene.objects) <= 3
        simulate(spec.scene, actions, CFG, strict=True)  # valid: raises otherwise


def test_random_goal_is_seeded():
    assert random_goal(5) == random_goal(5)
    assert random_goal(5) != random_goal(6)
    with pytest.raises(ValueError, match="'num_steps'"):
        random_goal(1, num_steps=0)


def test_criteria_errors():
    with pytest.raises(GoalParseError, match="exactly one"):
        action_from_criteria(["consistent(scene)"])
    with pytest.raises(GoalParseError, match="unknown predicate"):
        action_from_criteria(["teleported(red circle, left)"])
    with pytest.raises(GoalParseError, match="unknown object"):
        action_from_criteria(["moved(red blob, left)"])


def test_public_goal_set_is_fixed_and_well_formed():
    goals = load_goal_set()
    assert len(goals) >= 50
    assert GOAL_SET_PATH.read_text() == goal_set_json(build_goal_set(GOAL_SET_SEED), GOAL_SET_SEED), \
        "goals.json is stale: run python -m spiral_rt.world.make_goals"
    data = json.loads(GOAL_SET_PATH.read_text())
    assert data["seed"] == GOAL_SET_SEED and len({g["id"] for g in data["goals"]}) == len(goals)
    kinds, objects, steps = set(), set(), set()
    for g in goals:
        simulate(g.scene, list(g.actions), CFG, strict=True)
        kinds |= {a.kind for a in g.actions}
        objects.add(len(g.scene.objects))
        steps.add(len(g.actions))
        assert g.goal.text == g.text and g.goal.id == g.id
    assert kinds == {"move", "move_to", "recolour", "grow", "shrink"}
    assert objects == {1, 2, 3} and steps == {2, 3, 4}
    # Goals with several objects act on more than one of them.
    assert any(len({a.target.shape + a.target.colour for a in g.actions}) > 1 for g in goals if len(g.scene.objects) > 1)
    assert all(isinstance(a, Action) for g in goals for a in g.actions)
