"""The ``spiral-rt`` command: ``info`` still works; ``generate`` with random weights and the world's
agents writes the video, the trace and the contact sheet on the CPU; bad arguments and a missing
bundled model exit 2 with a message naming the problem."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch

from spiral_rt import cli


def run_cli(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_info_still_works(capsys):
    code, out, _ = run_cli(["info"], capsys)
    assert code == 0 and "spiral_rt" in out and "ops (backends" in out


def test_generate_random_weights_writes_video_trace_and_contact_sheet(tmp_path, capsys):
    out_dir = tmp_path / "run"
    t0 = time.perf_counter()
    code, out, err = run_cli(["generate", "move the red circle left, then make the red circle blue", "--random-weights",
                              "--device", "cpu", "--out", str(out_dir), "--seed", "3", "--max-retries", "1",
                              "--max-replans", "0", "--no-warmup"], capsys)
    elapsed = time.perf_counter() - t0
    assert code == 0, err
    assert elapsed < 45, f"took {elapsed:.1f} s"  # 5-15 s on 2 cores (generous: shared CI machines)
    video, trace_path, sheet = out_dir / "video.mp4", out_dir / "trace.json", out_dir / "contact_sheet.png"
    for path in (video, trace_path, sheet):
        assert path.is_file() and path.stat().st_size > 0, path
        assert str(path) in out  # printed where they are
    assert "RANDOM WEIGHTS" in out and "[random weights]" in out
    trace = json.loads(trace_path.read_text())
    assert trace["model"]["random_weights"] is True and trace["model"]["source"] == "random"
    assert trace["model"]["preset"] == "tiny-test" and "no language model" in trace["model"]["text_encoder"]
    assert any("RANDOM WEIGHTS" in w for w in trace["warnings"])
    assert trace["config"]["seed"] == 3 and trace["config"]["max_retries"] == 1
    # the world planner parsed two steps; random frames are rejected by the world critic, retried once, kept
    assert len(trace["initial_plan"]["steps"]) == 2
    attempts = trace["attempts"]
    assert {a["step_index"] for a in attempts} == {0, 1}
    assert all(a["decision"] for a in attempts)
    assert trace["num_video_frames"] == 9 + 12  # one chunk per step, 32 x 32
    assert trace["outputs"]["video"] == str(video) and not trace["outputs"]["video_is_frame_folder"]
    import av

    with av.open(str(video)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 21 and frames[0].shape == (32, 32, 3) and np.std(frames[5]) > 1.0
    # progress lines per attempt went to stderr
    assert "step 0 attempt 1" in err


@pytest.mark.parametrize("argv, message", [
    (["--max-retries", "-1"], "--max-retries must be >= 0"),
    (["--seed", "x"], "--seed must be an integer"),
    (["--device", "tpu"], "argument --device: invalid choice"),
    (["--planner", "gpt4"], "--planner must be world (the bundled world's programmatic agent), openai:MODEL"),
    (["--critic", "openai:"], "--critic must be world"),
    (["--latent-size", "4"], "--latent-size: expected 2 arguments"),
    (["--fps", "0"], "--fps must be >= 1"),
])
def test_bad_arguments_exit_2_with_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "move the red circle left", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--model", "/no/such/ckpt.safetensors", "--config", "tiny-test"], "argument --model: '/no/such/ckpt.safetensors' is neither"),
    (["--random-weights", "--config", "no-such-preset"], "argument --config: 'no-such-preset' is not a preset"),
    (["--random-weights", "--model", "/tmp"], "argument --random-weights: cannot be combined with --model"),
    (["--random-weights", "--text-encoder", "/tmp"], "argument --text-encoder: not used with --random-weights"),
    (["--model", "/tmp"], "argument --config: required with --model PATH"),
    (["--model", "/tmp", "--config", "tiny-test"], "argument --vae: required with --model PATH"),
    (["--vae", "/tmp/x"], "argument --vae: only used with --model PATH or --random-weights"),
    (["--random-weights", "--latent-size", "3", "4"], "argument --latent-size: 3 4 must be multiples of the patch"),
])
def test_inconsistent_arguments_exit_2_naming_the_argument(argv, message, capsys, tmp_path):
    code, out, err = run_cli(["generate", "move the red circle left", "--device", "cpu", "--out", str(tmp_path / "o"),
                              *argv], capsys)
    assert code == 2
    assert message in err and err.count("\n") == 1  # one line
    assert not (tmp_path / "o").exists()  # nothing was generated


def test_bundled_world_model_without_weights_exits_2(capsys, tmp_path, monkeypatch):
    import spiral_rt.world.model.loader as loader

    monkeypatch.setattr(loader, "DEFAULT_WEIGHTS", tmp_path / "missing.safetensors")
    code, out, err = run_cli(["generate", "move the red circle left", "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    assert err.strip() == err.strip().splitlines()[0]  # one line
    assert "bundled world model's weights are not installed" in err and "--random-weights" in err
    assert not (tmp_path / "o").exists()


def test_readme_command_runs_the_bundled_world_from_its_start_scene(capsys, tmp_path):
    """The README's first command with the shipped weights: the goal's scene is observed first, the
    loop runs on it, and video, trace and contact sheet are written (a few seconds on a CPU)."""
    from spiral_rt.world.goals import scene_for_goal

    goal = "move the red circle left, then make the blue square green"
    code, out, err = run_cli(["generate", goal, "--out", str(tmp_path / "demo"), "--no-progress"], capsys)
    assert code == 0, err
    for name in ("video.mp4", "trace.json", "contact_sheet.png"):
        assert (tmp_path / "demo" / name).is_file(), name
    trace = json.loads((tmp_path / "demo" / "trace.json").read_text())
    start = trace["start_scene"]
    assert start["description"] == scene_for_goal(goal, seed=0).describe() and start["observed_frames"] == 12
    import av

    with av.open(str(tmp_path / "demo" / "video.mp4")) as f:  # the observed scene, then the loop's segments
        assert sum(1 for _ in f.decode(video=0)) == 12 + trace["num_video_frames"]


def test_world_start_failure_exits_1_with_the_reason(capsys, tmp_path, monkeypatch):
    import spiral_rt.world.model.loader as loader

    def broken(*args, **kwargs):
        raise RuntimeError("codec exploded")

    monkeypatch.setattr(loader, "scene_latents", broken)
    code, out, err = run_cli(["generate", "move the red circle left", "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    assert code == 1 and "start scene" in err and "codec exploded" in err
    assert not (tmp_path / "o").exists()


def test_generate_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--config", "--vae", "--text-encoder", "--random-weights", "--planner", "--critic", "--out",
                 "--seed", "--max-retries", "--device"):
        assert flag in out


def test_unreadable_checkpoint_exits_2_naming_model(capsys, tmp_path):
    ckpt = tmp_path / "dit.safetensors"
    ckpt.write_bytes(b"not a checkpoint")
    (tmp_path / "umt5").mkdir()
    code, out, err = run_cli(["generate", "move the red circle left", "--device", "cpu", "--model", str(ckpt),
                              "--config", "world-small", "--vae", str(ckpt), "--text-encoder", str(tmp_path / "umt5"),
                              "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    assert err.startswith("spiral-rt generate: error: argument --model: cannot load") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------ rollout and train-grpo

ROLLOUT_GOAL = "move the red circle left, then make the red circle blue"
TINY_ROLLOUT = ["--random-weights", "--device", "cpu", "--group-size", "2", "--chunks", "2", "--fork-chunk", "1",
                "--train-steps", "0", "--seed", "3", "--no-progress"]
TINY_TRAIN = ["--random-weights", "--device", "cpu", "--lora-rank", "4", "--lr", "1e-2", "--no-progress"]


@pytest.fixture(scope="module")
def rollout_dir(tmp_path_factory):
    """One tiny rollout (1 goal x 1 plan x 2 videos of 2 chunks, fork after chunk 1, one trained step)."""
    out = tmp_path_factory.mktemp("rollout") / "r"
    t0 = time.perf_counter()
    code = cli.main(["rollout", ROLLOUT_GOAL, *TINY_ROLLOUT, "--out", str(out)])
    return out, code, time.perf_counter() - t0


def test_rollout_writes_batch_planner_jsonl_and_summary(rollout_dir):
    from spiral_rt.rollout import RolloutBatch

    out, code, elapsed = rollout_dir
    assert code == 0
    assert elapsed < 30, f"took {elapsed:.1f} s"  # ~2 s on 2 cores
    for name in ("batch.json", "tensors.safetensors", "frames.safetensors", "planner.jsonl", "summary.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    batch = RolloutBatch.load(out)
    assert batch.num_members == 2 and batch.num_transitions == 1
    assert batch.chunk.tolist() == [1] and batch.step.tolist() == [0]
    assert batch.spec["seed"] == 3 and batch.spec["fork_chunk"] == 1 and batch.spec["group_size"] == 2
    assert batch.rewards is not None and batch.advantages is not None and batch.frames.shape[0] == 2
    assert batch.stats["model"]["random_weights"] is True and batch.stats["model"]["weights_seed"] == 3
    lines = (out / "planner.jsonl").read_text().splitlines()
    assert len(lines) == 1  # one plan
    record = json.loads(lines[0])
    assert ROLLOUT_GOAL in json.dumps(record) and "make the red circle blue" in json.dumps(record)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["videos"] == 2 and summary["transitions_per_video"] == 1
    assert summary["rollout"]["schedule"] == "batched" and summary["rollout"]["trained_chunks"] == [1]
    [group] = summary["groups"]
    assert group["plan"] == ["move the red circle left", "make the red circle blue"]
    assert group["rewards"] == pytest.approx(batch.rewards.tolist())
    assert group["reward_mean"] == pytest.approx(float(batch.rewards.mean()))
    assert group["reward_std"] == pytest.approx(float(batch.rewards.std(unbiased=False)))
    assert summary["advantages"] == pytest.approx(batch.advantages.tolist())
    assert summary["videos_per_s"] > 0 and summary["timings"]["seconds"] >= summary["timings"]["generate_seconds"] > 0
    assert summary["peak_kv_pages"] > 0 and summary["peak_kv_bytes"] == summary["peak_kv_pages"] * summary["page_bytes"]
    assert summary["model"]["source"] == "random" and summary["frames_per_video"] == 9 + 12


def test_rollout_prints_a_summary_table(tmp_path, capsys):
    code, out, err = run_cli(["rollout", "make the red circle blue", *TINY_ROLLOUT, "--plans", "2", "--group-size", "1",
                              "--planner", "none", "--schedule", "naive", "--out", str(tmp_path / "r")], capsys)
    assert code == 0, err
    assert "RANDOM WEIGHTS" in out and "videos/s" in out and "peak KV" in out
    header, g0, g1 = out.splitlines()[1:4]
    assert header.split()[:4] == ["group", "goal", "plan", "reward"]
    assert g0.split()[0] == "0" and g1.split()[0] == "1"  # K = 2 plans: two groups
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["rollout"]["schedule"] == "naive" and [g["plan"] for g in summary["groups"]] == [["make the red circle blue"]] * 2
    assert str(tmp_path / "r" / "summary.json") in out


def _train(argv, capsys):
    return run_cli(["train-grpo", *argv, *TINY_TRAIN], capsys)


def test_train_grpo_trains_checkpoints_and_resumes(rollout_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    from spiral_rt.rollout import RolloutBatch

    src, code, _ = rollout_dir
    assert code == 0
    # noise frames all score alike: give the two members opposite advantages so the update is not zero
    batch = RolloutBatch.load(src)
    batch.advantages = torch.tensor([1.0, -1.0], dtype=torch.float64)
    batch.save(tmp_path / "b")
    ck = tmp_path / "ck"
    t0 = time.perf_counter()
    code, out, err = _train(["--batches", str(tmp_path / "b"), "--out", str(ck), "--steps", "2"], capsys)
    assert code == 0, err
    assert "weights seed 3" in out  # the rollout's random weights, from the batch's record
    step2 = ck / "step-00000002"
    assert json.loads((step2 / "trainer.json").read_text())["step"] == 2
    assert (step2 / "weights.safetensors").is_file() and (step2 / "optimizer.pt").is_file()
    assert str(step2) in out
    log = [json.loads(line) for line in (ck / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["batch"] == str(tmp_path / "b") for r in log)
    # same weights as the rollout: the first step's recomputed log-probs equal the recorded ones
    assert log[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert log[0]["grad_norm"] > 0 and log[1]["ratio_mean"] != pytest.approx(1.0, abs=1e-7)
    w2 = load_file(str(step2 / "weights.safetensors"))
    assert w2 and all(n.endswith((".lora_A", ".lora_B")) for n in w2)
    assert any(float(t.abs().max()) > 0 for n, t in w2.items() if n.endswith(".lora_B"))  # adapters moved

    # again without --resume: refused, nothing changes
    code, out, err = _train(["--batches", str(tmp_path / "b"), "--out", str(ck)], capsys)
    assert code == 2 and "argument --out:" in err and "--resume" in err and err.count("\n") == 1
    assert len((ck / "log.jsonl").read_text().splitlines()) == 2

    code, out, err = _train(["--batches", str(tmp_path / "b"), "--out", str(ck), "--resume", "--steps", "1"], capsys)
    assert code == 0, err
    step3 = ck / "step-00000003"
    assert json.loads((step3 / "trainer.json").read_text())["step"] == 3
    log = [json.loads(line) for line in (ck / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert "trained steps 3..3" in out
    w3 = load_file(str(step3 / "weights.safetensors"))
    assert any(not torch.equal(w2[n], w3[n]) for n in w2)  # continued from step 2's adapters and optimizer
    assert time.perf_counter() - t0 < 30


def test_train_grpo_under_torchrun_two_ranks(rollout_dir, tmp_path):
    """torchrun --nproc_per_node 2: each rank trains on its own batch, gradients averaged (gloo on the CPU),
    rank 0 writes the log and the checkpoint."""
    import subprocess
    import sys

    from spiral_rt.rollout import RolloutBatch

    src, code, _ = rollout_dir
    assert code == 0
    for name, adv in (("b0", [1.0, -1.0]), ("b1", [-1.0, 1.0])):
        batch = RolloutBatch.load(src)
        batch.advantages = torch.tensor(adv, dtype=torch.float64)
        batch.save(tmp_path / name)
    ck = tmp_path / "ck"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "spiral_rt.cli",
           "train-grpo", "--batches", str(tmp_path / "b0"), str(tmp_path / "b1"), "--out", str(ck), "--steps", "1", *TINY_TRAIN]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = [json.loads(line) for line in (ck / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["rank"] == 0 and log[0]["batch"] == str(tmp_path / "b0")
    assert (ck / "step-00000001" / "weights.safetensors").is_file()
    assert proc.stdout.count("checkpoint:") == 1  # rank 0 reports


def test_train_grpo_refuses_batches_of_another_model(rollout_dir, tmp_path, capsys):
    src, code, _ = rollout_dir
    assert code == 0
    code, out, err = _train(["--batches", str(src), "--out", str(tmp_path / "ck"), "--seed", "5"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "argument --batches:" in err and "weights_seed=3" in err and "weights_seed=5" in err
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("argv, message", [
    (["--group-size", "0"], "--group-size must be >= 1"),
    (["--noise", "shared"], "argument --noise: invalid choice"),
    (["--schedule", "fast"], "argument --schedule: invalid choice"),
    (["--planner", "gpt4"], "--planner must be world"),
    (["--train-steps", "x"], "--train-steps must be an integer"),
    (["--seed", "-1"], "--seed must be in [0, 2**32)"),
])
def test_rollout_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["rollout", ROLLOUT_GOAL, *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--fork-chunk", "2"], "argument --fork-chunk: 'fork_chunk' must be an int in [0, num_chunks=2)"),
    (["--train-chunks", "1"], "argument --train-chunks: 'train_chunks' entries must be ints in [0, 1)"),
    (["--train-steps", "3"], "argument --train-steps: 'train_steps' includes step 3"),
    (["a fox in snow"], "argument GOAL: the planner cannot plan it"),
    (["--goals", "/no/such/goals.txt"], "argument --goals: give goals as GOAL arguments or in --goals FILE, not both"),
])
def test_rollout_inconsistent_arguments_exit_2_naming_the_argument(argv, message, tmp_path, capsys):
    goal = [] if argv[0] == "a fox in snow" else [ROLLOUT_GOAL]
    code, out, err = run_cli(["rollout", *goal, *TINY_ROLLOUT, "--out", str(tmp_path / "o"), *argv], capsys)
    assert code == 2
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_rollout_goal_sources(tmp_path, capsys):
    code, _, err = run_cli(["rollout", *TINY_ROLLOUT, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "argument GOAL: no goals" in err
    code, _, err = run_cli(["rollout", *TINY_ROLLOUT, "--goals", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "argument --goals: cannot read" in err
    (tmp_path / "goals.txt").write_text("# comments and blank lines are skipped\n\n")
    code, _, err = run_cli(["rollout", *TINY_ROLLOUT, "--goals", str(tmp_path / "goals.txt"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "holds no goals" in err
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "batch.json").write_text("{}")
    code, _, err = run_cli(["rollout", ROLLOUT_GOAL, *TINY_ROLLOUT, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "argument --out:" in err and "already holds a rollout" in err


@pytest.mark.parametrize("argv, message", [
    (["--batches", "B", "--clip-range", "1.5"], "--clip-range must be < 1"),
    (["--batches", "B", "--lr", "0"], "--lr must be > 0"),
    (["--batches", "B", "--convention", "median"], "argument --convention: invalid choice"),
    (["--batches", "B", "--lora-rank", "-1"], "--lora-rank must be >= 0"),
    ([], "the following arguments are required: --batches"),
])
def test_train_grpo_bad_arguments_exit_2(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train-grpo", "--out", str(tmp_path / "ck"), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_train_grpo_missing_batch_or_checkpoint_exits_2(rollout_dir, tmp_path, capsys):
    src, code, _ = rollout_dir
    code, _, err = _train(["--batches", str(tmp_path / "nothing"), "--out", str(tmp_path / "ck")], capsys)
    assert code == 2 and err.count("\n") == 1 and "argument --batches:" in err and "holds no rollout" in err
    code, _, err = _train(["--batches", str(src), "--out", str(tmp_path / "ck"), "--resume"], capsys)
    assert code == 2 and err.count("\n") == 1 and "argument --resume: no checkpoint" in err
    assert not (tmp_path / "ck").exists()
    from spiral_rt.rollout import RolloutBatch

    batch = RolloutBatch.load(src)
    batch.mu = None  # a rollout without recorded means cannot be trained with --ratio-norm
    batch.save(tmp_path / "nomu")
    code, _, err = _train(["--batches", str(tmp_path / "nomu"), "--out", str(tmp_path / "ck"), "--ratio-norm"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "argument --batches:" in err and "ratio_norm needs the rollout's means" in err
    assert not (tmp_path / "ck").exists()


def test_rollout_and_train_grpo_help(capsys):
    for command, flags in (("rollout", ("--goals", "--plans", "--group-size", "--chunks", "--fork-chunk", "--train-chunks",
                                        "--train-steps", "--noise", "--seed", "--critic", "--planner", "--schedule",
                                        "--out", "--random-weights", "--config")),
                           ("train-grpo", ("--batches", "--out", "--resume", "--lora-rank", "--lr", "--steps",
                                           "--kl-coef", "--convention", "--ratio-norm", "--random-weights"))):
        with pytest.raises(SystemExit) as exc:
            cli.main([command, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        for flag in flags:
            assert flag in out, (command, flag)
