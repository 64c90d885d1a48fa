"""The bundled world's benchmark: the whole SPIRAL loop against ground truth on the public goal set.

    python bench/bench_world.py                                  # shipped weights -> bench/results/world.json
    python bench/bench_world.py --grpo-weights runs/grpo/world.safetensors
    python bench/bench_world.py --random-weights --goals 2       # smoke run (nothing written)

Goals: the fixed public goal set (``spiral_rt.world.load_goal_set``: 60 compound goals of 2-4 steps
over 1-3 objects), or its first ``--goals N``.

Showing the initial scene. Every goal comes with its start scene; the world model is an
action-conditioned world model that continues an observation. Every mode starts the session with
the rendered still scene as one observed chunk (``EngineGenerator.observe``: the codec's latents
written into the KV cache by the clean pass under the prompt ``Scene.describe()``), exactly the
intro chunk every training video starts with; then the mode's prompts. The intro's last frame is
the first key frame of the world memory (what the first step is judged against).

Modes (each goal is one engine session, through ``EngineGenerator``, the closed loop's generator):

  open     one prompt: the whole goal text for all the goal's chunks (the sum of its steps' spans)
  plan     the WorldPlanner's steps, each prompt for its span; no critic, no retries
  closed   ClosedLoop(WorldPlanner, WorldCritic): judgement, retries (--max-retries) and replans
           (--max-replans), speculation on
  grpo     plan, with the weights of ``--grpo-weights`` (a world-model weights file, the format
           ``save_world_weights`` writes, after GRPO post-training with the critic's reward);
           skipped with a message when the flag is not given

Noise: goal i uses noise id i and seeds derived as the closed loop derives them
(``SeedSequence([goal_seed, step_index, attempt])``), so the plan mode and the closed loop's first attempts see identical noise, and the
open mode the same noise as the plan mode's first step. ``--seed 0,1,2`` runs every mode once per
base seed (goal i of base seed s: seed s * 1000 + i) and pools the goals of all seeds into the mode's
row, which also lists each seed's rates (``by_seed``) and the standard error of the pooled step rate
(binomial over the pooled steps; one seed of the 60 goals: ~3.6 points).

Metrics, judged by ground truth on the generated frames after the run (not timed):

  step completion   each of the goal's steps (``goal_to_steps`` of the goal text: canonical prompt,
                    span, success criteria) is judged by the ``WorldCritic`` on the frames generated
                    for it, with the memory of the executed prefix: the key frame is the last frame
                    before the segment (the intro's for the first step). The critic measures the
                    objects by colour segmentation, predicts the expected end state from that start
                    with the world's own ``apply_action`` (the ground-truth dynamics), and checks the
                    step's predicate and the scene's consistency. In the open mode the one long
                    segment is cut at the goal's step spans. In the closed mode the executed steps
                    are matched in order to the goal's steps by action; a goal step the replanner
                    dropped because it judged it already held counts as completed only if its
                    predicate (target at the region / target of the new colour) holds in the last
                    frame before where it would have run; a goal step never executed otherwise
                    counts as failed.
  whole-goal success  every step of the goal completed.
  scene consistency  the goal's whole video keeps its objects: the intro shows exactly the initial
                    scene's (colour, shape) objects; in every segment no object of an unexpected
                    colour shows up for two analysed frames running, no untouched object is missing
                    for two analysed frames running, and at the segment's end there are as many
                    objects as in the scene, each untouched object keeps its shape, colour, size
                    (within the critic's ``size_tol``) and position (``position_tol``), and the
                    step's target keeps its shape, its colour unless the step recolours it, its size
                    unless the step resizes it, and its position unless the step moves it.
  wall time         seconds per goal of generation and (closed) agents, intro included, after one
                    warm-up chunk; mean over goals.
  closed only       retries and replans per goal (the loop's counters).

A ``ground_truth`` row applies the same judging to the renderer's videos of the same goals (intro
chunk, then each step's animation): a sanity check of the metrics, which should be ~1.0.

``--random-weights`` builds a tiny random world model (saved through ``save_world_weights`` to a
temporary file and loaded like the real one, with ``HashTextEncoder`` instead of MiniLM): a smoke run
of the plumbing whose numbers mean nothing. Its result is marked ``random_weights`` and is written,
to ``bench/results/world_smoke.json``, only with ``--write-smoke``; it never writes ``world.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common import print_table, write_result
from spiral_rt.agents.loop import ClosedLoop, LoopConfig
from spiral_rt.agents.types import Step, WorldMemory
from spiral_rt.engine.generator import EngineGenerator, HashTextEncoder
from spiral_rt.world import WorldConfig, WorldCritic, WorldPlanner, extract_objects, load_goal_set, render_video
from spiral_rt.world.agents import CriticConfig
from spiral_rt.world.goals import GoalSpec
from spiral_rt.world.language import action_of_step, goal_to_steps
from spiral_rt.world.scene import PALETTE, REGIONS, Action

logger = logging.getLogger("bench_world")

MODES = ("open", "plan", "closed", "grpo")
SEED = 0


# ----------------------------------------------------------------------------- runs


@dataclass
class GoalRun:
    """What one mode produced for one goal."""

    spec: GoalSpec
    intro: np.ndarray
    """(F, H, W, 3) uint8 frames of the intro chunk."""
    executed: list[tuple[Step, np.ndarray]]
    """The executed steps in order with their kept frames."""
    wall_s: float = 0.0
    chunks: int = 0
    """Chunks generated (rejected and dropped ones included)."""
    retries: int = 0
    replans: int = 0
    error: str | None = None


def derived_seed(goal_seed: int, step_index: int, attempt: int) -> int:
    """The closed loop's per-(step, attempt) seed (``ClosedLoop._seed`` with ``LoopConfig.seed = goal_seed``)."""
    return int(np.random.SeedSequence([goal_seed, step_index, attempt]).generate_state(1, np.uint32)[0])


def _goal_seed(seed: int, i: int) -> int:
    return seed * 1000 + i


def run_goal(engine, mode: str, spec: GoalSpec, index: int, seed: int, loop_config: LoopConfig, world: WorldConfig,
             scene_latents) -> GoalRun:
    """Generate goal ``spec`` in ``mode`` ("open", "plan" or "closed") on one session of ``engine``,
    starting from ``scene_latents(spec.scene)`` observed (``WorldModel.scene_latents``)."""
    goal_seed = _goal_seed(seed, index)
    steps = goal_to_steps(spec.text, world)
    t0 = time.perf_counter()
    gen = EngineGenerator(engine, noise_id=index, seed=goal_seed)
    try:
        intro = gen.observe(spec.scene.describe(), scene_latents(spec.scene))
        run = GoalRun(spec, intro, [])
        if mode == "open":
            total = sum(s.span_chunks for s in steps)
            frames = gen.generate(spec.text, total, derived_seed(goal_seed, 0, 1))
            at = 0
            for s in steps:  # cut the one segment at the goal's step spans
                n = s.span_chunks * world.frames_per_chunk
                run.executed.append((s, frames[at:at + n]))
                at += n
        elif mode == "plan":
            for s in WorldPlanner(world).plan(spec.goal, WorldMemory()).steps:
                run.executed.append((s, gen.generate(s.prompt, s.span_chunks, derived_seed(goal_seed, s.index, 1))))
        elif mode == "closed":
            cfg = dataclasses.replace(loop_config, seed=goal_seed)
            loop = ClosedLoop(gen, WorldPlanner(world), WorldCritic(world), cfg)
            result = loop.run(spec.goal, memory=WorldMemory(key_frames=[intro[-1]]))
            run.executed = list(zip(result.trace.executed_steps, result.segments))
            run.retries = int(result.trace.counters["retries"])
            run.replans = int(result.trace.counters["replans"])
            run.error = result.trace.error
        else:
            raise ValueError(f"run_goal: argument 'mode' must be 'open', 'plan' or 'closed', got {mode!r}")
        run.chunks = gen.chunks_generated
    finally:
        gen.close()
    run.wall_s = time.perf_counter() - t0
    return run


def ground_truth_run(spec: GoalSpec, world: WorldConfig) -> GoalRun:
    """The renderer's video of ``spec`` (intro chunk, then each step) as a GoalRun."""
    video = render_video(spec.scene, list(spec.actions), world, intro_chunks=1)
    steps = goal_to_steps(spec.text, world)
    executed = [(s, video.frames[video.step_index == k]) for k, s in enumerate(steps)]
    return GoalRun(spec, video.frames[video.step_index == -1], executed)


# ----------------------------------------------------------------------------- judging


def _by_colour(dets) -> dict:
    """The largest detection of each colour (detections come largest first)."""
    out = {}
    for d in dets:
        out.setdefault(d.colour, d)
    return out


def _dist(a, b) -> float:
    return math.hypot(a[0] - b[0], a[1] - b[1])


def _picks(num_frames: int, stride: int) -> list[int]:
    return sorted(set(range(0, num_frames, stride)) | {num_frames - 1})


def _target_colour(ref: dict, action: Action) -> str | None:
    """Colour of the step's target in the reference detections (by colour, else the one object of its shape)."""
    if action.target.colour in ref:
        return action.target.colour
    same = [c for c, d in ref.items() if d.shape == action.target.shape]
    return same[0] if len(same) == 1 else None


def predicate_holds(frame: np.ndarray, action: Action, critic: CriticConfig) -> bool:
    """Whether ``action``'s end condition already holds in ``frame`` (only recolour and move_to can)."""
    objs = _by_colour(extract_objects(frame, critic.perception))
    if action.kind == "recolour":
        d = objs.get(action.arg)
        return d is not None and d.shape == action.target.shape and action.target.colour not in objs
    if action.kind == "move_to":
        d = objs.get(action.target.colour)
        return d is not None and _dist(d.center, REGIONS[action.arg]) <= critic.region_tol
    return False


def judge_steps(run: GoalRun, world: WorldConfig, critic: WorldCritic) -> list[bool]:
    """Per goal step, whether it was completed (module docstring: step completion)."""
    goal_steps = goal_to_steps(run.spec.text, world)
    done: list[bool] = []
    j = 0
    last = run.intro[-1]
    for gs in goal_steps:
        action = action_of_step(gs)
        m = next((k for k in range(j, len(run.executed)) if action_of_step(run.executed[k][0]) == action), None)
        if m is None:
            done.append(predicate_holds(last, action, critic.critic))
            continue
        prev = run.executed[m - 1][1][-1] if m > 0 else run.intro[-1]
        frames = run.executed[m][1]
        verdict = critic.judge(frames, gs, WorldMemory(key_frames=[prev]))
        done.append(bool(verdict.completed))
        j = m + 1
        last = frames[-1]
    return done


def consistency_problem(run: GoalRun, critic: CriticConfig) -> str | None:
    """None when the goal's video keeps its objects, else the first problem (module docstring)."""
    scene = run.spec.scene
    n = len(scene.objects)
    ref = _by_colour(extract_objects(run.intro[-1], critic.perception))
    want = sorted((o.colour, o.shape) for o in scene.objects)
    got = sorted((c, d.shape) for c, d in ref.items())
    if got != want:
        return f"the intro shows {got} instead of the scene's {want}"
    for k, (step, frames) in enumerate(run.executed):
        action = action_of_step(step)
        where = f"step {k + 1} ({step.prompt!r})"
        t = _target_colour(ref, action)
        untouched = [c for c in ref if c != t]
        allowed = set(ref)
        if action.kind == "recolour":  # the target may take any free colour (a wrong colour is a wrong action)
            allowed |= set(PALETTE) - set(untouched)
        picks = _picks(len(frames), critic.frame_stride)
        dets = [_by_colour(d) for d in extract_objects(frames[picks], critic.perception)]
        missing = {c: 0 for c in untouched}
        extra: dict[str, int] = {}
        for by in dets:
            for c in missing:
                missing[c] = 0 if c in by else missing[c] + 1
                if missing[c] >= 2:
                    return f"{where}: the {c} {ref[c].shape} vanished"
            for c in set(extra) | set(by):
                extra[c] = extra.get(c, 0) + 1 if (c in by and c not in allowed) else 0
                if extra[c] >= 2:
                    return f"{where}: a {c} {by[c].shape} appeared"
        end = dets[-1]
        if len(end) != n:
            return f"{where}: {len(end)} object(s) at the end instead of {n}"
        for c in untouched:
            e, s = end[c], ref[c]
            if e.shape != s.shape:
                return f"{where}: the untouched {c} {s.shape} became a {e.shape}"
            if _dist(e.center, s.center) > critic.position_tol:
                return f"{where}: the untouched {c} {s.shape} moved"
            ratio = e.area / max(s.area, 1e-9)
            if ratio > critic.size_tol or ratio < 1.0 / critic.size_tol:
                return f"{where}: the untouched {c} {s.shape} changed size (area x{ratio:.2f})"
        if t is not None:
            s = ref[t]
            if action.kind == "recolour":
                e = end.get(t) or next((end[c] for c in end if c not in untouched), None)
            else:
                e = end.get(t)
            if e is None:
                return f"{where}: the target {t} {s.shape} vanished or changed colour"
            if e.shape != s.shape:
                return f"{where}: the target {t} {s.shape} became a {e.shape}"
            if action.kind not in ("grow", "shrink"):
                ratio = e.area / max(s.area, 1e-9)
                if ratio > critic.size_tol or ratio < 1.0 / critic.size_tol:
                    return f"{where}: the target {t} {s.shape} changed size (area x{ratio:.2f})"
            if action.kind not in ("move", "move_to") and _dist(e.center, s.center) > critic.position_tol:
                return f"{where}: the target {t} {s.shape} moved"
        ref = end
    return None


@dataclass
class GoalScore:
    id: str
    steps: int
    steps_completed: int
    consistent: bool
    problem: str | None
    wall_s: float
    chunks: int
    retries: int
    replans: int
    error: str | None = None
    step_done: list[bool] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def score_run(run: GoalRun, world: WorldConfig, critic: WorldCritic) -> GoalScore:
    done = judge_steps(run, world, critic)
    problem = consistency_problem(run, critic.critic)
    return GoalScore(id=run.spec.id, steps=len(done), steps_completed=sum(done), consistent=problem is None,
                     problem=problem, wall_s=run.wall_s, chunks=run.chunks, retries=run.retries, replans=run.replans,
                     error=run.error, step_done=done)


def summarize(mode: str, scores: list[GoalScore]) -> dict:
    """One table row: the rates over ``scores``."""
    steps = sum(s.steps for s in scores)
    row = {"mode": mode, "goals": len(scores), "steps": steps,
           "step_completion_rate": sum(s.steps_completed for s in scores) / max(steps, 1),
           "goal_success_rate": sum(s.steps_completed == s.steps for s in scores) / max(len(scores), 1),
           "scene_consistency_rate": sum(s.consistent for s in scores) / max(len(scores), 1)}
    p = row["step_completion_rate"]
    row["step_completion_se"] = math.sqrt(p * (1 - p) / max(steps, 1))
    if mode != "ground_truth":
        row.update(wall_s_per_goal=sum(s.wall_s for s in scores) / max(len(scores), 1),
                   wall_s_total=sum(s.wall_s for s in scores),
                   chunks_per_goal=sum(s.chunks for s in scores) / max(len(scores), 1))
    if mode == "closed":
        row.update(retries_per_goal=sum(s.retries for s in scores) / max(len(scores), 1),
                   replans_per_goal=sum(s.replans for s in scores) / max(len(scores), 1),
                   loop_errors=sum(s.error is not None for s in scores))
    return row


# ----------------------------------------------------------------------------- models


def _engine(world_model, device: torch.device):
    kv = None if device.type == "cuda" else 64 * 2**20
    return world_model.engine(kv_memory_bytes=kv)


def load_model(args, path: Path | None, device: torch.device, dtype: torch.dtype):
    from spiral_rt.world.model import load_world_model

    if args.random_weights and path is None:
        from spiral_rt.world.model import PixelCodecConfig, build_world_dit, save_world_weights, world_dit_config

        torch.manual_seed(args.seed[0])
        dit = build_world_dit(world_dit_config("tiny"))
        with tempfile.TemporaryDirectory() as tmp:
            f = save_world_weights(Path(tmp) / "random.safetensors", dit, PixelCodecConfig(), dtype=torch.float32,
                                   train_info={"random_weights": True})
            cfg = dit.config
            return load_world_model(f, device=device, dtype=dtype, text_encoder=HashTextEncoder(cfg.text_dim, cfg.text_len))
    if args.random_weights:  # GRPO weights in a smoke run: same stand-in text encoder
        from spiral_rt.world.model.loader import read_world_weights

        meta = read_world_weights(path)[1]["dit_config"]
        return load_world_model(path, device=device, dtype=dtype,
                                text_encoder=HashTextEncoder(int(meta["text_dim"]), int(meta["text_len"])))
    return load_world_model(path, device=device, dtype=dtype)


# ----------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="The bundled world's benchmark (open, plan, closed, GRPO) against ground truth.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--weights", type=Path, default=None, help="world-model weights (default: the shipped file)")
    src.add_argument("--random-weights", action="store_true", help="smoke run with a tiny random world model")
    p.add_argument("--grpo-weights", type=Path, default=None, help="weights after GRPO post-training (grpo mode)")
    p.add_argument("--goals", type=int, default=None, help="benchmark the first N goals of the set (default: all)")
    p.add_argument("--goal-set", type=Path, default=None, help="goal set file (default: the packaged public set)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--max-retries", type=int, default=LoopConfig.max_retries, help="closed loop: retries per step")
    p.add_argument("--max-replans", type=int, default=LoopConfig.max_replans, help="closed loop: replans per goal")
    p.add_argument("--seed", default=str(SEED),
                   help="base seed, or comma-separated base seeds pooled into each row (goal i uses seed * 1000 + i)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--no-ground-truth", action="store_true", help="skip the ground-truth sanity row")
    p.add_argument("--write-smoke", action="store_true", help="with --random-weights: write bench/results/world_smoke.json")
    p.add_argument("--label", default=None, help="a 'setting' text on every row of this run (e.g. the GRPO run's settings)")
    p.add_argument("--merge", type=Path, default=None,
                   help="an earlier world.json whose rows this run does not replace (same mode and --label) are kept, "
                        "each with the commit and date it came from")
    p.add_argument("--log-level", default="WARNING")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        parser.error(f"argument --modes: unknown mode(s) {bad} (choose from {', '.join(MODES)})")
    args.modes = [m for m in MODES if m in modes]
    try:
        args.seed = [int(x) for x in str(args.seed).split(",") if x.strip()]
    except ValueError:
        parser.error(f"argument --seed: expected comma-separated integers, got {args.seed!r}")
    if not args.seed or len(set(args.seed)) != len(args.seed) or min(args.seed) < 0:
        parser.error(f"argument --seed: expected distinct integers >= 0, got {args.seed}")
    if args.goals is not None and args.goals < 1:
        parser.error(f"argument --goals: must be >= 1, got {args.goals}")
    if args.write_smoke and not args.random_weights:
        parser.error("argument --write-smoke: only with --random-weights (a real run writes bench/results/world.json)")
    if args.max_retries < 0 or args.max_replans < 0:
        parser.error("arguments --max-retries/--max-replans: must be >= 0")
    for name in ("weights", "grpo_weights", "merge"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            parser.error(f"argument --{name.replace('_', '-')}: {str(path)!r} is not a file")
    if not args.random_weights and args.weights is None:
        from spiral_rt.world.model import DEFAULT_WEIGHTS

        if not DEFAULT_WEIGHTS.is_file():
            parser.error(f"the shipped world-model weights {DEFAULT_WEIGHTS} do not exist yet (train them, pass "
                         "--weights PATH, or use --random-weights for a smoke run)")
        args.weights = DEFAULT_WEIGHTS
    try:
        args.device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"argument --device: {exc}")
    if args.goal_set is not None and not args.goal_set.is_file():
        parser.error(f"argument --goal-set: {str(args.goal_set)!r} is not a file")
    goal_count = len(load_goal_set(args.goal_set))
    if args.goals is not None and args.goals > goal_count:
        parser.error(f"argument --goals: the goal set has {goal_count} goals, got {args.goals}")
    return args


def run_benchmark(args: argparse.Namespace) -> dict:
    """Run every requested mode and the sanity row; returns {"settings", "rows", "per_goal", "messages"}."""
    world = WorldConfig()
    critic = WorldCritic(world)
    goals = load_goal_set(args.goal_set)[: args.goals]
    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    loop_config = LoopConfig(max_retries=args.max_retries, max_replans=args.max_replans)
    rows, per_goal, messages = [], {}, []

    if not args.no_ground_truth:
        scores = [score_run(ground_truth_run(g, world), world, critic) for g in goals]
        rows.append(summarize("ground_truth", scores))
        per_goal["ground_truth"] = [s.to_dict() for s in scores]

    models = {}
    base_modes = [m for m in args.modes if m != "grpo"]
    if base_modes:
        models["base"] = load_model(args, args.weights, device, dtype)
    if "grpo" in args.modes:
        if args.grpo_weights is None:
            msg = "grpo: skipped (no --grpo-weights; run GRPO post-training with the critic's reward and pass its weights)"
            print(msg)
            messages.append(msg)
        else:
            models["grpo"] = load_model(args, args.grpo_weights, device, dtype)

    for mode in args.modes:
        key = "grpo" if mode == "grpo" else "base"
        if key not in models:
            continue
        engine = _engine(models[key], device)
        try:
            with EngineGenerator(engine) as warm:
                warm.warmup(goals[0].scene.describe())
            gen_mode = "plan" if mode == "grpo" else mode
            by_seed = {}
            for seed in args.seed:
                by_seed[seed] = []
                for i, g in enumerate(goals):
                    run = run_goal(engine, gen_mode, g, i, seed, loop_config, world, models[key].scene_latents)
                    by_seed[seed].append(score_run(run, world, critic))
                    logger.info("%s seed %d %s: %d/%d steps, consistent %s, %.2f s", mode, seed, g.id,
                                by_seed[seed][-1].steps_completed, by_seed[seed][-1].steps, by_seed[seed][-1].consistent,
                                run.wall_s)
        finally:
            engine.close()
        scores = [s for seed_scores in by_seed.values() for s in seed_scores]
        row = summarize(mode, scores)
        if len(by_seed) > 1:
            row["by_seed"] = [{"seed": seed, **{k: v for k, v in summarize(mode, ss).items()
                                                if k in ("step_completion_rate", "goal_success_rate")}}
                              for seed, ss in by_seed.items()]
        rows.append(row)
        per_goal[mode] = [{**s.to_dict(), "seed": seed} for seed, ss in by_seed.items() for s in ss]

    settings = {"goals": len(goals), "goal_set": str(args.goal_set or "spiral_rt/world/goals.json"),
                "modes": args.modes, "weights": "random (tiny, smoke run)" if args.random_weights else str(args.weights),
                "grpo_weights": str(args.grpo_weights) if args.grpo_weights else None,
                "random_weights": bool(args.random_weights), "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                "seed": args.seed[0] if len(args.seed) == 1 else args.seed, "loop": {"max_retries": args.max_retries, "max_replans": args.max_replans, "speculate": True},
                "intro": "the rendered start scene, 1 observed chunk under Scene.describe() (as in training)"}
    if "base" in models:
        settings["weights_train_info"] = models["base"].metadata.get("train", {})
    return {"settings": settings, "rows": rows, "per_goal": per_goal, "messages": messages}


COLUMNS = ["mode", "goals", "steps", "step_completion_rate", "goal_success_rate", "scene_consistency_rate",
           "wall_s_per_goal", "retries_per_goal", "replans_per_goal"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING), format="%(message)s")
    out = run_benchmark(args)
    if args.random_weights:
        print("RANDOM WEIGHTS (smoke run): the numbers below measure the plumbing, not the model")
    print_table(out["rows"], COLUMNS)
    extra = {"per_goal": out["per_goal"], "messages": out["messages"]}
    if args.random_weights:
        if args.write_smoke:
            write_result("world_smoke", {**out["settings"], "note": "RANDOM WEIGHTS: smoke run, not a measurement"},
                         out["rows"], extra)
    else:
        rows = out["rows"]
        if args.label:
            for r in rows:
                r["setting"] = args.label
        if args.merge is not None:
            rows, extra = merge_results(json.loads(args.merge.read_text()), rows, extra, args.label)
        write_result("world", out["settings"], rows, extra)
    return 0


def merge_results(earlier: dict, rows: list[dict], extra: dict, label: str | None) -> tuple[list[dict], dict]:
    """This run's rows after the rows of ``earlier`` (a world.json) that it does not replace (same mode
    and setting); kept rows and their per-goal records carry the commit and date they came from."""
    new = {(r["mode"], r.get("setting")) for r in rows}
    kept = []
    for r in earlier.get("results", []):
        if (r["mode"], r.get("setting")) in new:
            continue
        r = dict(r)
        r.setdefault("from", {"commit": earlier.get("commit"), "date": earlier.get("date")})
        kept.append(r)
    per_goal = dict(earlier.get("per_goal", {}))
    for mode, records in extra["per_goal"].items():
        per_goal[f"{mode}/{label}" if label else mode] = records
    return kept + rows, {**extra, "per_goal": per_goal, "messages": earlier.get("messages", []) + extra["messages"]}


if __name__ == "__main__":
    raise SystemExit(main())
