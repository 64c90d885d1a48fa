"""The training-set writer: files, manifest and a lossless round trip of frames, prompts and states."""

import numpy as np
import pytest

from spiral_rt.world.dataset import DatasetConfig, read_manifest, read_video, write_dataset
from spiral_rt.world.goals import random_goal
from spiral_rt.world.language import canonical_prompt, parse_goal
from spiral_rt.world.render import render_video
from spiral_rt.world.scene import WorldConfig


def test_write_and_read_back(tmp_path):
    cfg = WorldConfig()
    ds = DatasetConfig(num_videos=4, seed=3, min_steps=1, max_steps=3)
    manifest_path = write_dataset(tmp_path, ds, cfg)
    manifest = read_manifest(tmp_path)
    assert manifest_path.name == "manifest.json" and len(manifest["videos"]) == 4
    for i, entry in enumerate(manifest["videos"]):
        video = read_video(tmp_path / entry["file"])
        spec = random_goal(ds.seed * 1_000_003 + i, cfg, num_steps=len(entry["prompts"]))
        expected = render_video(spec.scene, list(spec.actions), cfg, prompts=[canonical_prompt(a) for a in spec.actions])
        assert video.frames.dtype == np.uint8 and np.array_equal(video.frames, expected.frames)
        assert video.states == expected.states and np.array_equal(video.step_index, expected.step_index)
        assert 1 <= len(video.prompts) <= 3 and video.goal == spec.text == entry["goal"]
        assert [a for p in video.prompts for a in parse_goal(p)] == list(spec.actions)
        num_chunks = video.frames.shape[0] // cfg.frames_per_chunk
        assert len(video.chunk_prompts) == num_chunks == 1 + sum(entry["spans"])
        assert video.chunk_prompts[0] == video.scene_prompt == spec.scene.describe()
        assert video.chunk_prompts[1] == video.prompts[0]


def test_config_validation():
    with pytest.raises(ValueError, match="'min_steps'"):
        DatasetConfig(min_steps=3, max_steps=2)
    with pytest.raises(ValueError, match="'num_videos'"):
        DatasetConfig(num_videos=0)
