"""The ``spiral-rt`` command: ``info`` still works; ``generate`` with random weights and the world's
agents writes the video, the trace and the contact sheet on the CPU; bad arguments and a missing
bundled model exit 2 with a message naming the problem."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

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


def test_bundled_world_model_without_weights_exits_2(capsys, tmp_path):
    code, out, err = run_cli(["generate", "move the red circle left", "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    assert err.strip() == err.strip().splitlines()[0]  # one line
    assert "bundled world model's weights are not installed" in err and "--random-weights" in err
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
