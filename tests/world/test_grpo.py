"""World GRPO post-training (spiral_rt.world.grpo) on the CPU: the plan layout, a smoke run of the
whole loop (rollout -> critic -> update -> weights file), the "dpo" objective's CLI flags reaching the
trainer, and configuration errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from spiral_rt.engine.generator import HashTextEncoder
from spiral_rt.rl.trainer import LoRALinear
from spiral_rt.world.goals import random_goal
from spiral_rt.world.grpo import GRPO_SEED_BASE, WorldGRPOConfig, goal_plan, iteration_goals, main, run
from spiral_rt.world.language import goal_to_steps
from spiral_rt.world.model.loader import load_world_model
from spiral_rt.world.scene import WorldConfig
from tests.spawn_helpers import run_ranks


def test_goal_plan_puts_the_scene_intro_first():
    wcfg = WorldConfig()
    plan, chunks, scene = goal_plan(123, wcfg)
    spec = random_goal(123, wcfg)
    assert scene == spec.scene
    steps = goal_to_steps(spec.text, wcfg)
    assert plan.goal.text == spec.text
    assert plan.steps[0].prompt == spec.scene.describe() and plan.steps[0].span_chunks == 1
    assert [s.prompt for s in plan.steps[1:]] == [s.prompt for s in steps]
    assert chunks == 1 + sum(s.span_chunks for s in steps)


def test_iteration_goals_share_a_chunk_count_and_never_repeat():
    wcfg = WorldConfig()
    stream = iteration_goals(5, 3, wcfg)
    iterations = [next(stream) for _ in range(6)]
    seen = [index for it in iterations for index, _, _, _ in it]
    assert len(seen) == len(set(seen)) == 18
    for it in iterations:
        assert len(it) == 3 and len({chunks for _, _, chunks, _ in it}) == 1
        for index, plan, chunks, scene in it:
            ref_plan, ref_chunks, _ = goal_plan(GRPO_SEED_BASE + 5 * 100_003 + index, wcfg)
            assert plan.goal.text == ref_plan.goal.text and chunks == ref_chunks
    again = iteration_goals(5, 3, wcfg)
    assert [[i for i, *_ in next(again)] for _ in range(6)] == [[i for i, *_ in it] for it in iterations]


def test_goal_pool_cycles_over_its_goals_only():
    wcfg = WorldConfig()
    seen = [index for it, _ in zip(iteration_goals(5, 2, wcfg, pool=3), range(8)) for index, *_ in it]
    assert len(seen) == 16 and set(seen) <= {0, 1, 2}
    single = iteration_goals(5, 1, wcfg, pool=1)
    assert [[i for i, *_ in next(single)] for _ in range(3)] == [[0]] * 3
    with pytest.raises(ValueError, match="goal_pool"):
        WorldGRPOConfig(goal_pool=-1).validate()


@pytest.mark.parametrize("gate", [True, False])
def test_smoke_run_writes_loadable_weights_and_an_on_policy_log(tmp_path, gate):
    summary = run(WorldGRPOConfig(out=str(tmp_path), smoke=True, progress=False, goals_per_update=1, gate_adapters=gate))
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(lines) == summary["goals"] == summary["updates"] == 2 and summary["ranks"] == 1
    for rec in lines:
        # the trainer rebuilds the rollout's contexts exactly: before the update the ratio is 1
        assert abs(rec["ratio_mean"] - 1.0) < 1e-4 and rec["transitions"] > 0
        assert 0.0 <= rec["reward_mean"] <= 1.0 and 0.0 <= rec["step_success"] <= 1.0
    world = load_world_model(tmp_path / "world.safetensors", text_encoder=HashTextEncoder(384, 16))
    adapters = [m for m in world.dit.modules() if isinstance(m, LoRALinear)]
    if gate:  # the adapters come back gated to the trained steps' timesteps (folded, they would act everywhere)
        assert adapters and all(m.gate_timesteps == adapters[0].gate_timesteps for m in adapters)
        assert len(adapters[0].gate_timesteps) == 3
        trained = load_file(str(tmp_path / "trainer" / "weights.safetensors"))  # the trainer's own adapters
        loaded = dict(world.dit.named_parameters())
        assert set(trained) <= set(loaded)
        for name, t in trained.items():
            torch.testing.assert_close(loaded[name], t.half().float())  # stored at fp16
    else:
        assert not adapters and not any("lora" in k for k in world.dit.state_dict())  # folded into the weights
    assert json.loads((tmp_path / "summary.json").read_text())["weights"].endswith("world.safetensors")
    assert torch.isfinite(next(world.dit.parameters())).all()


def _rank_worker(rank: int, out: str) -> None:
    # the group exists already (run_ranks); under torchrun run() would join through the environment
    run(WorldGRPOConfig(out=out, smoke=True, progress=False, goals_per_update=1))


def test_two_ranks_roll_out_different_goals_and_rank0_logs_both(tmp_path):
    run_ranks(_rank_worker, (str(tmp_path),), 2, tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert sorted((r["iteration"], r["rank"]) for r in lines) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert len({g for r in lines for g in r["goals"]}) == 4  # every rank its own goal every update
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["goals"] == 4 and (tmp_path / "world.safetensors").is_file()


@pytest.mark.parametrize("field, value", [("iterations", 0), ("group_size", 1), ("lr", 0.0), ("seed", -1),
                                          ("kl_coef", -1.0), ("save_every", 0), ("goals_per_update", 0),
                                          ("train_steps", "0,x"), ("train_steps", "-1"),
                                          ("critic_processes", -1), ("noise", "shared"), ("credit", "chunk"),
                                          ("objective", "ppo"), ("denoising_weights", "all"), ("dpo_beta", 0.0),
                                          ("dpo_beta", -2.0), ("lora_targets", "self_attn.q,,ffn.0"),
                                          ("denoising_input", "clean")])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        WorldGRPOConfig(**{field: value}).validate()


def test_time_limit_stops_after_the_update_and_writes_weights_binary_reward(tmp_path):
    summary = run(WorldGRPOConfig(out=str(tmp_path), smoke=True, progress=False, goals_per_update=1, time_limit_min=1e-6,
                                  reward="completed"))
    assert summary["updates"] == summary["goals"] == 1
    assert (tmp_path / "world.safetensors").is_file()
    rec = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert rec["reward_mean"] == rec["step_success"]  # binary reward: the mean of completed steps
    with pytest.raises(ValueError, match="reward"):
        WorldGRPOConfig(reward="graded").validate()
    with pytest.raises(ValueError, match="time_limit_min"):
        WorldGRPOConfig(time_limit_min=-1).validate()


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    from safetensors.torch import load_file

    whole = run(WorldGRPOConfig(out=str(tmp_path / "whole"), smoke=True, progress=False, goals_per_update=1, iterations=2))
    run(WorldGRPOConfig(out=str(tmp_path / "split"), smoke=True, progress=False, goals_per_update=1, iterations=1))
    resumed = run(WorldGRPOConfig(out=str(tmp_path / "split"), smoke=True, progress=False, goals_per_update=1, iterations=2))
    assert whole["updates"] == resumed["updates"] == 2 and resumed["goals"] == 1  # the second run did update 2 only
    a, b = load_file(str(tmp_path / "whole" / "world.safetensors")), load_file(str(tmp_path / "split" / "world.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = (tmp_path / "split" / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines] == [1, 2]


def test_flow_grpo_policy_rollouts_are_recomputed_exactly(tmp_path):
    """Flow-GRPO's SDE step as the GRPO policy (the default is the engine's re-noise sampler): the
    trainer rebuilds its log-probs (ratio 1)."""
    run(WorldGRPOConfig(out=str(tmp_path), smoke=True, progress=False, goals_per_update=1, policy="flow_grpo",
                        train_steps=""))
    for line in (tmp_path / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert abs(rec["ratio_mean"] - 1.0) < 1e-4 and rec["transitions"] > 0
    with pytest.raises(ValueError, match="policy"):
        WorldGRPOConfig(policy="ddim").validate()


def test_goals_per_update_accumulate_distinct_goals_into_one_update(tmp_path):
    summary = run(WorldGRPOConfig(out=str(tmp_path / "all"), smoke=True, progress=False, iterations=1, goals_per_update=2))
    rec = json.loads((tmp_path / "all" / "log.jsonl").read_text().splitlines()[0])
    assert summary["updates"] == 1 and summary["goals"] == 2 and len(set(rec["goals"])) == 2
    assert rec["step"] == 1 and abs(rec["ratio_mean"] - 1.0) < 1e-4
    run(WorldGRPOConfig(out=str(tmp_path / "first"), smoke=True, progress=False, iterations=1, goals_per_update=2,
                        train_steps="0"))
    first = json.loads((tmp_path / "first" / "log.jsonl").read_text().splitlines()[0])
    assert first["goals"] == rec["goals"] and 0 < first["transitions"] < rec["transitions"]  # only step 0 trained


def test_step_credit_run_updates_on_policy(tmp_path):
    run(WorldGRPOConfig(out=str(tmp_path), smoke=True, progress=False, iterations=1, goals_per_update=2, credit="step"))
    rec = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert abs(rec["ratio_mean"] - 1.0) < 1e-4 and rec["transitions"] > 0


def test_dpo_cli_flags_reach_the_trainer_config(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--smoke", "--no-progress", "--iterations", "1", "--goals-per-update", "1",
                 "--objective", "dpo", "--dpo-beta", "250"]) == 0
    saved = json.loads((tmp_path / "trainer" / "trainer.json").read_text())["config"]
    assert saved["objective"] == "dpo" and saved["dpo_beta"] == 250.0
    rec = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert "dpo_pairs" in rec and "dpo_accuracy" in rec
    assert main(["--out", str(tmp_path / "bad"), "--smoke", "--objective", "dpo", "--dpo-beta", "0"]) == 2
    assert "'dpo_beta'" in capsys.readouterr().out
    with pytest.raises(ValueError, match="credit"):  # pairs are ranked by the member's (video) reward
        WorldGRPOConfig(objective="dpo", credit="step").validate()


def test_lora_targets_flag_adapts_only_those_linears(tmp_path):
    assert main(["--out", str(tmp_path), "--smoke", "--no-progress", "--iterations", "1", "--goals-per-update", "1",
                 "--lora-targets", "self_attn.q, self_attn.k"]) == 0
    state = json.loads((tmp_path / "trainer" / "trainer.json").read_text())
    assert state["config"]["lora_targets"] == ["self_attn.q", "self_attn.k"]
    assert state["parameters"] and all(".self_attn.q." in n or ".self_attn.k." in n for n in state["parameters"])
