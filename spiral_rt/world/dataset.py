"""Training data for the bundled world's tiny model: rendered goal videos with prompts and ground truth.

Boundaries: writes and reads files; the content comes from ``goals`` (what happens), ``language``
(the prompts) and ``render`` (the pixels). It knows nothing about the model that will train on it.

Layout of a dataset directory::

    manifest.json          {"format": 1, "config": {...}, "seed": .., "videos": [{"file", "goal", "prompts",
                             "scene_prompt", "spans", "num_frames", ...}, ...]}
    video_00000.npz        one compressed numpy archive per video:
      frames       (F, H, W, 3) uint8   intro chunk(s) of the still scene, then each step's animation
      step_index   (F,) int32           step of each frame (-1: intro)
      chunk_prompt (C,) str             the prompt of each chunk (C = F / frames_per_chunk); the intro
                                        chunk's prompt is the scene description
      obj_shape, obj_colour, obj_size, obj_next_colour   (F, K) int8  indices into SHAPES, colour names,
                                        SIZE_ORDER (-1: no object / no wipe); K = objects in the scene
      obj_center   (F, K, 2) float64    centroid (x, y), normalised
      obj_scale    (F, K) float64       continuous scale s, normalised
      obj_wipe     (F, K) float64       colour-change progress
      goal, scene_prompt  str; prompts (S,) str  the goal text, the scene description, step prompts

Objects never appear or vanish in rendered videos, so object k is the same object in every frame.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .goals import random_goal
from .language import canonical_prompt
from .render import RenderedVideo, render_video
from .scene import PALETTE, SHAPES, SIZE_ORDER, ObjectState, Scene, WorldConfig

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version of the on-disk layout (bumped on any incompatible change)."""
_COLOURS = tuple(PALETTE)


@dataclass(frozen=True)
class DatasetConfig:
    """What to generate."""

    num_videos: int = 1000
    """Videos (goals) to write."""
    seed: int = 0
    """Video i renders ``random_goal(seed * 1_000_003 + i)``."""
    min_steps: int = 1
    """Fewest steps per goal."""
    max_steps: int = 4
    """Most steps per goal."""
    intro_chunks: int = 1
    """Chunks of the still initial scene before the first step (conditioned on the scene description)."""

    def __post_init__(self) -> None:
        for name, low in (("num_videos", 1), ("min_steps", 1), ("max_steps", 1), ("intro_chunks", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"DatasetConfig: argument '{name}' must be an int >= {low}, got {value!r}")
        if self.min_steps > self.max_steps:
            raise ValueError(f"DatasetConfig: argument 'min_steps' ({self.min_steps}) must be <= 'max_steps' ({self.max_steps})")


@dataclass
class VideoRecord:
    """One video read back from a dataset."""

    frames: np.ndarray
    """(F, H, W, 3) uint8."""
    step_index: np.ndarray
    """(F,) int32, -1 for intro frames."""
    chunk_prompts: list[str]
    """Prompt of each chunk."""
    states: list[tuple[ObjectState, ...]]
    """Per frame, every object's state."""
    goal: str
    """The goal text."""
    prompts: list[str]
    """The step prompts."""
    scene_prompt: str
    """The description of the initial scene."""


def _state_arrays(states: list[tuple[ObjectState, ...]]) -> dict[str, np.ndarray]:
    num_frames, k = len(states), max(len(s) for s in states)
    shape = np.full((num_frames, k), -1, np.int8)
    colour = np.full((num_frames, k), -1, np.int8)
    size = np.full((num_frames, k), -1, np.int8)
    next_colour = np.full((num_frames, k), -1, np.int8)
    center = np.zeros((num_frames, k, 2), np.float64)
    scale = np.zeros((num_frames, k), np.float64)
    wipe = np.zeros((num_frames, k), np.float64)
    for f, objs in enumerate(states):
        for j, o in enumerate(objs):
            shape[f, j] = SHAPES.index(o.shape)
            colour[f, j] = _COLOURS.index(o.colour)
            size[f, j] = SIZE_ORDER.index(o.size)
            next_colour[f, j] = _COLOURS.index(o.next_colour) if o.next_colour else -1
            center[f, j] = o.center
            scale[f, j] = o.scale
            wipe[f, j] = o.wipe
    return {"obj_shape": shape, "obj_colour": colour, "obj_size": size, "obj_next_colour": next_colour,
            "obj_center": center, "obj_scale": scale, "obj_wipe": wipe}


def _states_from_arrays(data) -> list[tuple[ObjectState, ...]]:
    out = []
    for f in range(data["obj_shape"].shape[0]):
        objs = []
        for j in range(data["obj_shape"].shape[1]):
            if data["obj_shape"][f, j] < 0:
                continue
            nc = int(data["obj_next_colour"][f, j])
            objs.append(ObjectState(SHAPES[data["obj_shape"][f, j]], _COLOURS[data["obj_colour"][f, j]],
                                    SIZE_ORDER[data["obj_size"][f, j]], tuple(float(c) for c in data["obj_center"][f, j]),
                                    float(data["obj_scale"][f, j]), _COLOURS[nc] if nc >= 0 else None, float(data["obj_wipe"][f, j])))
        out.append(tuple(objs))
    return out


def chunk_prompts(video: RenderedVideo, scene_prompt: str, frames_per_chunk: int) -> list[str]:
    """The prompt of each chunk of ``video``: the scene description for intro chunks, else the step's prompt."""
    num_frames = video.frames.shape[0]
    if num_frames % frames_per_chunk:
        raise ValueError(f"chunk_prompts: argument 'video' has {num_frames} frames, not a multiple of {frames_per_chunk}")
    out = []
    for c in range(num_frames // frames_per_chunk):
        k = int(video.step_index[c * frames_per_chunk])
        out.append(scene_prompt if k < 0 else video.prompts[k])
    return out


def write_video(path: str | Path, video: RenderedVideo, goal: str, scene: Scene, config: WorldConfig) -> dict:
    """Write one video archive; returns its manifest entry."""
    path = Path(path)
    scene_prompt = scene.describe()
    prompts = chunk_prompts(video, scene_prompt, config.frames_per_chunk)
    np.savez_compressed(path, frames=video.frames, step_index=video.step_index, chunk_prompt=np.asarray(prompts),
                        goal=np.asarray(goal), scene_prompt=np.asarray(scene_prompt), prompts=np.asarray(video.prompts, dtype=str),
                        **_state_arrays(video.states))
    spans = [int((video.step_index == k).sum()) // config.frames_per_chunk for k in range(len(video.prompts))]
    return {"file": path.name, "goal": goal, "scene_prompt": scene_prompt, "prompts": list(video.prompts),
            "spans": spans, "num_frames": int(video.frames.shape[0]), "num_objects": len(scene.objects)}


def write_dataset(out_dir: str | Path, dataset: DatasetConfig | None = None, config: WorldConfig | None = None) -> Path:
    """Render ``dataset.num_videos`` random goals into ``out_dir``; returns the manifest path."""
    dataset = dataset or DatasetConfig()
    config = config or WorldConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(dataset.num_videos):
        seed = dataset.seed * 1_000_003 + i
        num_steps = random.Random(seed).randint(dataset.min_steps, dataset.max_steps)
        spec = random_goal(seed, config, num_steps=num_steps, goal_id=f"video-{i:05d}")
        prompts = [canonical_prompt(a) for a in spec.actions]
        video = render_video(spec.scene, list(spec.actions), config, prompts=prompts, intro_chunks=dataset.intro_chunks)
        entries.append(write_video(out / f"video_{i:05d}.npz", video, spec.text, spec.scene, config))
        if (i + 1) % 100 == 0:
            logger.info("wrote %d / %d videos to %s", i + 1, dataset.num_videos, out)
    manifest = {"format": FORMAT_VERSION, "config": {**asdict(config)}, "dataset": asdict(dataset), "videos": entries}
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    logger.info("dataset of %d videos in %s", len(entries), out)
    return path


def read_manifest(out_dir: str | Path) -> dict:
    """The manifest of a dataset directory (ValueError on a format it does not know)."""
    data = json.loads((Path(out_dir) / "manifest.json").read_text())
    if data.get("format") != FORMAT_VERSION:
        raise ValueError(f"read_manifest: argument 'out_dir' holds format {data.get('format')!r}, this reader knows {FORMAT_VERSION}")
    return data


def read_video(path: str | Path) -> VideoRecord:
    """Read one video archive written by ``write_video``."""
    with np.load(Path(path), allow_pickle=False) as data:
        return VideoRecord(frames=data["frames"], step_index=data["step_index"], chunk_prompts=[str(p) for p in data["chunk_prompt"]],
                           states=_states_from_arrays(data), goal=str(data["goal"]), prompts=[str(p) for p in data["prompts"]],
                           scene_prompt=str(data["scene_prompt"]))


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Render a training set of the bundled world.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--num-videos", type=int, default=DatasetConfig.num_videos)
    parser.add_argument("--seed", type=int, default=DatasetConfig.seed)
    parser.add_argument("--resolution", type=int, default=WorldConfig.width)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_dataset(args.out_dir, DatasetConfig(num_videos=args.num_videos, seed=args.seed),
                  WorldConfig(width=args.resolution, height=args.resolution))
    return 0

