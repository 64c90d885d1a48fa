"""bench/bench_world.py: the smoke run, the ground-truth judging (and that it can fail), arguments."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import bench_world as bw  # noqa: E402
import common  # noqa: E402
from spiral_rt.world import WorldConfig, WorldCritic, load_goal_set  # noqa: E402
from spiral_rt.world.language import action_of_step  # noqa: E402

SMOKE = ["--random-weights", "--goals", "2", "--max-retries", "1", "--max-replans", "1"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world():
    return WorldConfig()


@pytest.fixture(scope="module")
def critic(world):
    return WorldCritic(world)


@pytest.fixture(scope="module")
def goals():
    return load_goal_set()


@pytest.fixture(scope="module")
def smoke():
    return bw.run_benchmark(bw.parse_args(SMOKE))


def _row(out, mode):
    return next(r for r in out["rows"] if r["mode"] == mode)


# ----------------------------------------------------------------------------- the smoke run


def test_smoke_run_completes_every_mode_but_grpo(smoke):
    modes = [r["mode"] for r in smoke["rows"]]
    assert modes == ["ground_truth", "open", "plan", "closed"]
    assert any("grpo: skipped" in m and "--grpo-weights" in m for m in smoke["messages"])
    for r in smoke["rows"]:
        assert r["goals"] == 2 and r["steps"] == sum(s["steps"] for s in smoke["per_goal"][r["mode"]])
        for k in ("step_completion_rate", "goal_success_rate", "scene_consistency_rate"):
            assert 0.0 <= r[k] <= 1.0, (r["mode"], k, r[k])
    for mode in ("open", "plan", "closed"):
        r = _row(smoke, mode)
        assert r["wall_s_per_goal"] > 0 and r["chunks_per_goal"] >= 2  # at least one chunk per step (the intro is observed)
    closed = _row(smoke, "closed")
    assert closed["retries_per_goal"] >= 0 and closed["replans_per_goal"] >= 0 and closed["loop_errors"] == 0
    # plan generates exactly the intro and one span per step; the closed loop at least as much
    plan_chunks = _row(smoke, "plan")["chunks_per_goal"]
    assert closed["chunks_per_goal"] >= plan_chunks
    assert smoke["settings"]["random_weights"] is True


def test_ground_truth_row_is_perfect(smoke, goals, world, critic):
    gt = _row(smoke, "ground_truth")
    assert gt["step_completion_rate"] == gt["goal_success_rate"] == gt["scene_consistency_rate"] == 1.0
    scores = [bw.score_run(bw.ground_truth_run(g, world), world, critic) for g in goals[:15]]
    row = bw.summarize("ground_truth", scores)
    assert row["step_completion_rate"] >= 0.98 and row["scene_consistency_rate"] >= 0.98, row


def test_grpo_mode_loads_its_own_weights(tmp_path):
    from spiral_rt.world.model import PixelCodecConfig, build_world_dit, save_world_weights, world_dit_config

    # the same tiny random model the smoke run builds: grpo must then reproduce plan exactly
    torch.manual_seed(bw.SEED)
    path = save_world_weights(tmp_path / "grpo.safetensors", build_world_dit(world_dit_config("tiny")),
                              PixelCodecConfig(), dtype=torch.float32)
    out = bw.run_benchmark(bw.parse_args(["--random-weights", "--goals", "1", "--modes", "plan,grpo",
                                          "--no-ground-truth", "--grpo-weights", str(path)]))
    assert [r["mode"] for r in out["rows"]] == ["plan", "grpo"] and not out["messages"]
    p, g = out["per_goal"]["plan"][0], out["per_goal"]["grpo"][0]
    assert (p["step_done"], p["consistent"], p["chunks"]) == (g["step_done"], g["consistent"], g["chunks"])


def test_seeds_pool_into_one_row_with_each_seeds_rates():
    base = ["--random-weights", "--goals", "2", "--modes", "plan", "--no-ground-truth"]
    single = {seed: bw.run_benchmark(bw.parse_args(base + ["--seed", str(seed)])) for seed in (0, 3)}
    pooled = bw.run_benchmark(bw.parse_args(base + ["--seed", "0,3"]))
    row = pooled["rows"][0]
    # each seed's goals are exactly its single-seed run's (same noise), pooled in order
    assert [(r["id"], r["seed"], r["step_done"]) for r in pooled["per_goal"]["plan"]] == [
        (r["id"], seed, r["step_done"]) for seed in (0, 3) for r in single[seed]["per_goal"]["plan"]]
    assert [b["step_completion_rate"] for b in row["by_seed"]] == [single[s]["rows"][0]["step_completion_rate"] for s in (0, 3)]
    assert row["goals"] == 4 and row["steps"] == sum(single[s]["rows"][0]["steps"] for s in (0, 3))
    p = row["step_completion_rate"]
    assert row["step_completion_se"] == pytest.approx((p * (1 - p) / row["steps"]) ** 0.5)
    assert pooled["settings"]["seed"] == [0, 3] and "by_seed" not in single[0]["rows"][0]


def test_smoke_writes_only_with_write_smoke_and_never_world_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.delenv("OUT", raising=False)
    fast = ["--random-weights", "--goals", "1", "--modes", "open", "--no-ground-truth"]
    assert bw.main(fast) == 0
    assert list(tmp_path.iterdir()) == []
    assert "RANDOM WEIGHTS" in capsys.readouterr().out
    assert bw.main(fast + ["--write-smoke"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world_smoke.json"]
    data = json.loads((tmp_path / "world_smoke.json").read_text())
    assert data["settings"]["random_weights"] is True and "RANDOM WEIGHTS" in data["settings"]["note"]
    assert data["results"][0]["mode"] == "open" and "per_goal" in data


# ----------------------------------------------------------------------------- judging can fail


def test_consistency_catches_vanishing_appearing_and_drift(goals, world, critic):
    spec = next(g for g in goals if len(g.scene.objects) >= 2 and g.actions[0].kind in ("move", "move_to")
                and g.actions[1].target.colour != g.actions[0].target.colour)
    run = bw.ground_truth_run(spec, world)
    assert bw.consistency_problem(run, critic.critic) is None
    bg = run.intro[0, 0, 0].copy()
    untouched = next(o for o in spec.scene.objects if o.colour != spec.actions[0].target.colour)

    def erase(frames, colour):  # paint every pixel of that object's colour family with the background
        from spiral_rt.world.perception import COLOUR_NAMES, label_colours

        out = frames.copy()
        out[label_colours(frames) == COLOUR_NAMES.index(colour)] = bg
        return out

    step, seg = run.executed[0]
    vanished = bw.GoalRun(spec, run.intro, [(step, erase(seg, untouched.colour))] + run.executed[1:])
    assert "vanished" in bw.consistency_problem(vanished, critic.critic)
    # the intro must show the initial scene
    wrong_intro = bw.GoalRun(spec, erase(run.intro, untouched.colour), run.executed)
    assert "intro" in bw.consistency_problem(wrong_intro, critic.critic)
    # an untouched object that moves: the second step's segment shows the intro again, so the first
    # step's target (untouched by the second step) jumps back
    frozen = bw.GoalRun(spec, run.intro, [run.executed[0], (run.executed[1][0], np.repeat(run.intro[-1:], len(run.executed[1][1]), 0))])
    assert "untouched" in bw.consistency_problem(frozen, critic.critic)


def test_step_judgement_fails_frozen_video_and_matches_replanned_steps(goals, world, critic):
    spec = goals[0]
    run = bw.ground_truth_run(spec, world)
    assert bw.judge_steps(run, world, critic) == [True] * len(spec.actions)
    still = [(s, np.repeat(run.intro[-1:], len(f), 0)) for s, f in run.executed]
    assert bw.judge_steps(bw.GoalRun(spec, run.intro, still), world, critic) == [False] * len(spec.actions)
    # closed loop: a goal step never executed fails unless its predicate already holds
    missing_first = bw.GoalRun(spec, run.intro, run.executed[1:])
    done = bw.judge_steps(missing_first, world, critic)
    first = action_of_step(run.executed[0][0])
    assert done[0] is bw.predicate_holds(run.intro[-1], first, critic.critic) is False


def test_predicate_holds_reads_recolour_and_regions(goals, world, critic):
    from spiral_rt.world.render import render_video

    spec = next(g for g in goals if any(a.kind == "recolour" for a in g.actions))
    k = next(i for i, a in enumerate(spec.actions) if a.kind == "recolour")
    video = render_video(spec.scene, list(spec.actions), world, intro_chunks=0)
    after = video.frames[video.step_index == k][-1]
    before = video.frames[video.step_index == k][0] if k == 0 else video.frames[video.step_index == k - 1][-1]
    assert bw.predicate_holds(after, spec.actions[k], critic.critic)
    assert not bw.predicate_holds(before, spec.actions[k], critic.critic)


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("argv, message", [
    (["--random-weights", "--goals", "0"], "--goals"),
    (["--random-weights", "--goals", "1000"], "--goals"),
    (["--random-weights", "--modes", "open,bogus"], "--modes"),
    (["--random-weights", "--modes", ","], "--modes"),
    (["--goals", "2", "--write-smoke", "--weights", __file__], "--write-smoke"),
    (["--weights", "/nonexistent/world.safetensors"], "--weights"),
    (["--random-weights", "--grpo-weights", "/nonexistent/grpo.safetensors"], "--grpo-weights"),
    (["--random-weights", "--weights", __file__], "not allowed with"),
    (["--random-weights", "--max-retries", "-1"], "--max-retries"),
    (["--random-weights", "--goal-set", "/nonexistent/goals.json"], "--goal-set"),
    (["--random-weights", "--seed", "0,x"], "--seed"),
    (["--random-weights", "--seed", "1,1"], "--seed"),
    (["--random-weights", "--seed", "-1"], "--seed"),
])
def test_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bw.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_shipped_weights_is_a_clear_error(capsys):
    from spiral_rt.world.model import DEFAULT_WEIGHTS

    if DEFAULT_WEIGHTS.is_file():
        args = bw.parse_args([])
        assert args.weights == DEFAULT_WEIGHTS
        return
    with pytest.raises(SystemExit):
        bw.parse_args([])
    err = capsys.readouterr().err
    assert "do not exist" in err and "--random-weights" in err


def test_merge_keeps_rows_this_run_does_not_replace():
    earlier = {"commit": "abc", "date": "d0", "messages": ["m0"],
               "results": [{"mode": "plan", "step_completion_rate": 0.5}, {"mode": "closed", "step_completion_rate": 0.8},
                           {"mode": "grpo", "setting": "run 1", "step_completion_rate": 0.4}],
               "per_goal": {"plan": [1], "closed": [2], "grpo/run 1": [3]}}
    rows = [{"mode": "plan", "setting": "run 2", "step_completion_rate": 0.6},
            {"mode": "grpo", "setting": "run 2", "step_completion_rate": 0.7}]
    merged, extra = bw.merge_results(earlier, rows, {"per_goal": {"plan": [4], "grpo": [5]}, "messages": []},
                                              "run 2")
    assert [(r["mode"], r.get("setting")) for r in merged] == [
        ("plan", None), ("closed", None), ("grpo", "run 1"), ("plan", "run 2"), ("grpo", "run 2")]
    assert merged[0]["from"] == {"commit": "abc", "date": "d0"} and "from" not in merged[-1]
    assert extra["per_goal"] == {"plan": [1], "closed": [2], "grpo/run 1": [3], "plan/run 2": [4], "grpo/run 2": [5]}
    again, _ = bw.merge_results(earlier, [{"mode": "plan", "step_completion_rate": 0.9}],
                                         {"per_goal": {}, "messages": []}, None)
    assert [r["step_completion_rate"] for r in again if r["mode"] == "plan"] == [0.9]  # replaced
