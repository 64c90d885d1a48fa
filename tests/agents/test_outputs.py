"""Video, JSON trace and contact sheet of a run."""

import builtins
import json

import numpy as np
import pytest
from PIL import Image

from spiral_rt.agents import outputs
from spiral_rt.agents import trace as tr
from spiral_rt.agents.loop import ClosedLoop, LoopConfig
from spiral_rt.agents.outputs import ContactSheetConfig, contact_sheet_size, write_outputs, write_video
from spiral_rt.agents.testing import FakeGenerator, ScriptedCritic, ScriptedPlanner, reject
from spiral_rt.agents.types import FailureKind, Goal, Step


@pytest.fixture
def result():
    steps = [Step("a square moves right", 2, ["square at the right"]), Step("the square turns green", 1), Step("it shrinks", 1)]
    critic = ScriptedCritic({"the square turns green": [reject("still red", FailureKind.WRONG_ACTION), RuntimeError("critic down")]})
    planner = ScriptedPlanner([steps])
    return ClosedLoop(FakeGenerator(height=30, width=45), planner, critic, LoopConfig()).run(Goal("square right, green, small", id="t1"))


def _block_imports(monkeypatch, *names):
    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name.split(".")[0] in names:
            raise ImportError(f"blocked {name}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)


def test_outputs_of_a_run(result, tmp_path):
    paths = write_outputs(result, tmp_path, fps=8)
    assert paths.video == tmp_path / "video.mp4" and paths.video.stat().st_size > 0
    data = json.loads(paths.trace.read_text())
    assert data["goal"] == {"text": "square right, green, small", "id": "t1"} and data["completed"]
    assert [s["prompt"] for s in data["initial_plan"]["steps"]] == ["a square moves right", "the square turns green", "it shrinks"]
    assert [(a["step_index"], a["decision"]) for a in data["attempts"]] == [
        (0, tr.ACCEPTED), (1, tr.RETRY), (2, tr.DROPPED), (1, tr.ACCEPTED), (2, tr.ACCEPTED)]
    assert data["attempts"][1]["verdict"]["failure"] == "wrong_action"
    assert data["attempts"][3]["critic_fallback"] and data["fallbacks"][0]["error"] == "RuntimeError: critic down"
    assert data["counters"]["rollbacks"] == 1 and data["counters"]["speculations_dropped"] == 1
    for key in ("total_s", "generate_s", "critic_wait_s", "first_plan_s"):
        assert data["timings"][key] >= 0
    assert data["agent_latencies"]["critic"]["calls"] == 4 and data["agent_latencies"]["planner"]["calls"] == 1
    assert data["num_video_frames"] == result.video.shape[0] == 16
    assert data["outputs"]["video"].endswith("video.mp4") and not data["outputs"]["video_is_frame_folder"]
    assert data["config"]["max_retries"] == 2


def test_mp4_decodes_to_the_frames(result, tmp_path):
    av = pytest.importorskip("av")
    path = write_video(result.video, tmp_path / "v.mp4", fps=8)
    with av.open(str(path)) as container:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert decoded.shape == (16, 30, 46, 3)  # odd width padded to even
    err = np.abs(decoded[:, :, :45].astype(int) - result.video.astype(int)).mean()
    assert err < 12, err


def test_without_encoders_the_video_becomes_png_frames(result, tmp_path, monkeypatch, caplog):
    _block_imports(monkeypatch, "av", "imageio_ffmpeg")
    path = write_video(result.video, tmp_path / "v.mp4")
    assert path == tmp_path / "v" and len(list(path.glob("frame_*.png"))) == 16
    assert not (tmp_path / "v.mp4").exists()
    np.testing.assert_array_equal(np.asarray(Image.open(path / "frame_00003.png"))[:, :45], result.video[3])
    assert "PNG frames" in caplog.text


def test_encoder_failure_falls_through(result, tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("encoder crashed")

    monkeypatch.setattr(outputs, "_write_pyav", broken)
    _block_imports(monkeypatch, "imageio_ffmpeg")
    assert write_video(result.video, tmp_path / "v.mp4").is_dir()


@pytest.mark.parametrize("bad, match", [(np.zeros((0, 4, 4, 3), np.uint8), "frames"), (np.zeros((2, 4, 4), np.uint8), "frames")])
def test_write_video_validates(bad, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        write_video(bad, tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="fps"):
        write_video(np.zeros((1, 4, 4, 3), np.uint8), tmp_path / "x.mp4", fps=0)


def test_contact_sheet_has_a_row_per_step_and_a_cell_per_attempt(result, tmp_path):
    cfg = ContactSheetConfig(thumb_height=60, thumbs_per_attempt=3, label_width=200, caption_lines=3, line_height=12,
                             pad=6, border=2, header_height=40)
    path = outputs.write_contact_sheet(result.trace, tmp_path / "sheet.png", cfg)
    thumb_w = round(45 * 60 / 30)
    cell_w = 3 * thumb_w + 2 * 2
    rows, max_attempts = 3, 2  # steps 0, 1, 2; steps 1 and 2 have two attempts each
    row_h = 60 + 2 * 2 + 3 * 12
    expected = (6 + 200 + max_attempts * (cell_w + 6), 40 + rows * (row_h + 6) + 6)
    assert Image.open(path).size == expected == contact_sheet_size(result.trace, cfg)
    sheet = np.asarray(Image.open(path))
    # the first attempt of step 1 is framed red (rejected), its second yellow (critic fallback)
    y1 = 40 + (row_h + 6) + 1
    x0 = 6 + 200
    assert tuple(sheet[y1, x0 + 1]) == outputs.DECISION_COLOURS[tr.RETRY]
    assert tuple(sheet[y1, x0 + cell_w + 6 + 1]) == outputs.FALLBACK_COLOUR
    # and the thumbnails are the attempt's first, middle and last frames
    attempt = result.trace.attempts[1]
    for t, frame in enumerate(attempt.thumbnails):
        expected_thumb = np.asarray(Image.fromarray(frame).resize((thumb_w, 60), Image.BILINEAR))
        x = x0 + 2 + t * thumb_w
        np.testing.assert_array_equal(sheet[y1 + 1: y1 + 61, x: x + thumb_w], expected_thumb)


def test_empty_run_still_writes_trace_and_sheet(tmp_path):
    class Broken(FakeGenerator):
        def generate(self, *a):
            raise RuntimeError("no GPU")

    result = ClosedLoop(Broken(), ScriptedPlanner(), ScriptedCritic()).run("anything")
    paths = write_outputs(result, tmp_path)
    assert paths.video is None and paths.contact_sheet.exists()
    data = json.loads(paths.trace.read_text())
    assert not data["completed"] and "no GPU" in data["error"] and any("no video" in w for w in data["warnings"])
