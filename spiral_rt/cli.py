"""The ``spiral-rt`` command.

Subcommands:
  info        what this installation can run: versions, devices, the native build, and which
              backend each op would use on each device.
  generate    SPIRAL's closed loop on one goal: plan, generate each step's segment with the streaming
              engine, judge it, regenerate or replan; writes video.mp4, trace.json and
              contact_sheet.png and prints where they are.
  rollout     GRPO rollouts (``spiral_rt.rollout``): per goal K plans x G videos from a shared prefix,
              scored by the critic; writes into --out the RolloutBatch (batch.json,
              tensors.safetensors, frames.safetensors), planner.jsonl (plan-level rewards and
              advantages for LLM trainers) and summary.json (per-group reward mean/std, advantages,
              timings, videos/s, peak KV pages), and prints a table of the groups.
  train-grpo  GRPO updates (``spiral_rt.rl.GRPOTrainer``) from rollout directories, one optimizer step
              per batch in turn: step-N/ checkpoints and log.jsonl (per-step statistics) in --out;
              --resume continues from the latest checkpoint there (step counter, adapters, optimizer).

Boundaries: argument parsing, assembly of the pieces from their config dataclasses (``EngineConfig``,
``LoopConfig``, ``EngineGeneratorConfig``, ``RolloutSpec``, ``GRPOTrainerConfig``), progress bars, and
printing. Generation is the engine's (``spiral_rt.engine``), the loop and its outputs are
``spiral_rt.agents``', rollouts ``spiral_rt.rollout``'s, training ``spiral_rt.rl``'s. Exit codes: 0 done,
1 the run stopped on a generator, rollout or training error (generate keeps what was made, rollout
writes nothing, train-grpo keeps the checkpoints already written), 2 bad arguments or a model that
cannot be loaded (one line naming the argument).

A rollout directory records the model that generated it (``stats["model"]`` in batch.json);
train-grpo refuses batches of another model (source, preset, checkpoint, dtype, latent size, and
the weights seed of --random-weights, which it takes from the batches unless --seed is given), since
the trainer must recompute the recorded log-probs with the same weights.

Models for ``generate``, ``rollout`` and ``train-grpo`` (the same options):
  --model world                 the bundled world's trained tiny model (the default; needs its
                                weights file, see ``spiral_rt.world.model.load_world_model``); an
                                action-conditioned world model: ``generate`` starts it from a scene
                                holding the objects the goal names (``scene_for_goal``, laid out by
                                --seed), observed as the first chunk, and the video opens on it
  --model PATH --config PRESET  a DiT checkpoint (file or shard directory) of a preset of
                                ``spiral_rt.models.config.PRESETS``, with --vae PATH and
                                --text-encoder PATH (a UMT5 directory)
  --random-weights              a smoke run: random weights on a preset (default tiny-test), a tiny
                                random VAE and a hashed stand-in text encoder; the output is noise
                                and is labelled as random weights on screen and in the trace
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

import spiral_rt
from spiral_rt.ops import OP_BACKENDS, available_backends, dispatch
from spiral_rt.ops.chunk_attention import cuda_unavailable_reason


def _info(_: argparse.Namespace) -> int:
    native = dispatch.NATIVE
    build = native.build_info() if native is not None else None
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    lines = [
        f"spiral_rt {spiral_rt.__version__}  torch {torch.__version__}  python {sys.version.split()[0]}",
        "native module: " + (
            "not built" if build is None
            else f"CUDA {build['cuda_version']} ({build['cuda_archs']})" if build["cuda"]
            else "CPU-only (no CUDA compiler at build time)"
        ),
        "triton: " + ("installed" if dispatch.TRITON_INSTALLED else "not installed"),
        "devices: " + ", ".join(devices + ([torch.cuda.get_device_name(0)] if torch.cuda.is_available() else [])),
        "ops (backends usable per device; the first is the automatic choice):",
    ]
    for op, backends in OP_BACKENDS.items():
        per_device = []
        for dev in devices[:2]:
            usable = [b for b in available_backends(backends, dev) if not (b == "triton" and dev == "cpu")]
            if op == "chunk_attention" and "cuda" in usable and \
                    cuda_unavailable_reason(128, torch.bfloat16, 1, torch.device(dev)) is not None:
                usable.remove("cuda")  # the CUDA kernel is Hopper-only (compute 9.0, sm_90a build)
            per_device.append(f"{dev}: {'/'.join(usable) or '-'}")
        lines.append(f"  {op:<24} " + "   ".join(per_device))
    print("\n".join(lines))
    return 0


# ------------------------------------------------------------------------------------------ generate

logger = logging.getLogger("spiral_rt.cli")

AGENT_SPEC_HELP = "world (the bundled world's programmatic agent), openai:MODEL[@BASE_URL] or hf:/path/to/local/vlm"
RANDOM_WEIGHTS_LABEL = "RANDOM WEIGHTS: smoke run of the runtime, the video is noise, not a model's output"


TINY_ENGINE_FIELDS = dict(dim=128, num_heads=2, ffn_dim=96, text_dim=24, freq_dim=32, in_channels=16, out_channels=16)
"""--random-weights on "tiny-test": these fields replace the preset's (head_dim 64 for the engine's attention,
16 latent channels like Wan): about 0.3 M parameters, fast on a CPU."""


class UsageError(Exception):
    """A bad argument or an unusable model: printed as one line, exit code 2."""


@dataclass
class ModelSpec:
    """Which model ``generate`` runs and where its parts come from (from --model and friends)."""

    source: str
    """"world" (the bundled model), "checkpoint" (a DiT file or directory) or "random" (random weights)."""
    preset: str | None = None
    """Name in ``spiral_rt.models.config.PRESETS`` (checkpoint and random sources)."""
    checkpoint: str | None = None
    """The DiT checkpoint (file or shard directory) of the checkpoint source."""
    vae: str | None = None
    """Wan VAE checkpoint; None with random weights: a tiny random VAE."""
    text_encoder: str | None = None
    """UMT5 directory; None with random weights: ``HashTextEncoder`` (no language model)."""
    device: str = "cpu"
    """"cpu" or "cuda"."""
    dtype: str = "float32"
    """DiT dtype: "float32" or "bfloat16"."""
    latent_size: tuple[int, int] | None = None
    """Latent (H, W); None: (60, 104) for the Wan presets, else (8, 8) (64 x 64 video), (4, 4) with random weights.
    Set to the engine's value once the engine is built."""
    parameters: int | None = None
    """DiT parameter count, filled in once the model is built (for the trace)."""

    @property
    def random_weights(self) -> bool:
        return self.source == "random"

    def describe(self) -> dict:
        """What the trace records about the model."""
        d = asdict(self)
        d["random_weights"] = self.random_weights
        if self.random_weights:
            d["note"] = RANDOM_WEIGHTS_LABEL
            d["vae"] = self.vae or "tiny random VAE"
            d["text_encoder"] = self.text_encoder or "HashTextEncoder (hashed tokens, no language model)"
        return d


@dataclass
class GenerateSettings:
    """Everything ``spiral-rt generate`` runs with, resolved from the command line."""

    goal: str
    """The goal text."""
    model: ModelSpec
    """The model."""
    planner: str = "world"
    """Planner spec (``AGENT_SPEC_HELP``)."""
    critic: str = "world"
    """Critic spec (``AGENT_SPEC_HELP``)."""
    out_dir: Path = field(default_factory=lambda: Path("spiral_out"))
    """Where video.mp4, trace.json and contact_sheet.png go."""
    fps: int = 16
    """Frame rate of the mp4."""
    warmup: bool = True
    """Run one throwaway chunk while the planner makes the first plan."""
    progress: bool = True
    """Show the tqdm progress bar."""
    agent_timeout_s: float = 60.0
    """Request timeout of LLM/VLM agents (one try)."""


def _number(name: str, kind: type = int, minimum: float = 1, strict: bool = False):
    """An argparse type: ``kind`` (int or float) >= ``minimum`` (> when ``strict``), errors naming ``name``."""
    noun = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {noun}, got {text!r}") from None
        if value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"{name} must be {'>' if strict else '>='} {minimum:g}, got {value}")
        return value
    return parse


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed must be an integer, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"--seed must be in [0, 2**32), got {value}")
    return value


def _agent_spec(name: str):
    def parse(text: str) -> str:
        kind, sep, rest = text.partition(":")
        if text == "world" or (sep and kind in ("openai", "hf") and rest and not rest.startswith("@")):
            return text
        raise argparse.ArgumentTypeError(f"{name} must be {AGENT_SPEC_HELP}, got {text!r}")
    return parse


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].rstrip("-") or "goal"


def _resolve_model(args: argparse.Namespace) -> ModelSpec:
    """The model the options name (--model, --config, --vae, --text-encoder, --random-weights, --device,
    --dtype, --latent-size), checked against each other; UsageError names the argument."""
    from spiral_rt.models.config import PRESETS

    if args.config is not None and args.config not in PRESETS:
        raise UsageError(f"argument --config: {args.config!r} is not a preset; choose one of {sorted(PRESETS)}")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise UsageError("argument --device: cuda requested but torch sees no CUDA device")
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    latent = tuple(args.latent_size) if args.latent_size else None
    if args.random_weights:
        if args.model != "world":
            raise UsageError(f"argument --random-weights: cannot be combined with --model {args.model!r} "
                             "(random weights replace the checkpoint)")
        if args.text_encoder:
            raise UsageError("argument --text-encoder: not used with --random-weights (a hashed stand-in encodes prompts)")
        model = ModelSpec("random", preset=args.config or "tiny-test", vae=args.vae, device=device, dtype=dtype,
                          latent_size=latent)
    elif args.model == "world":
        for name in ("config", "vae", "text_encoder"):
            if getattr(args, name):
                raise UsageError(f"argument --{name.replace('_', '-')}: only used with --model PATH or --random-weights")
        model = ModelSpec("world", device=device, dtype=dtype, latent_size=latent)
    else:
        path = Path(args.model)
        if not path.exists():
            raise UsageError(f"argument --model: {args.model!r} is neither 'world' nor an existing checkpoint file or directory")
        if args.config is None:
            raise UsageError(f"argument --config: required with --model PATH; one of {sorted(PRESETS)}")
        for name in ("vae", "text_encoder"):
            value = getattr(args, name)
            flag = "--" + name.replace("_", "-")
            if value is None:
                raise UsageError(f"argument {flag}: required with --model PATH")
            if not Path(value).exists():
                raise UsageError(f"argument {flag}: {value!r} does not exist")
        if not Path(args.text_encoder).is_dir():
            raise UsageError(f"argument --text-encoder: {args.text_encoder!r} must be a UMT5 directory")
        model = ModelSpec("checkpoint", preset=args.config, checkpoint=str(path), vae=args.vae,
                          text_encoder=args.text_encoder, device=device, dtype=dtype, latent_size=latent)
    if model.vae is not None and not Path(model.vae).exists():
        raise UsageError(f"argument --vae: {model.vae!r} does not exist")
    return model


def _resolve(args: argparse.Namespace) -> GenerateSettings:
    """Check the arguments against each other and build the settings; UsageError names the argument."""
    if not args.goal.strip():
        raise UsageError("argument GOAL is empty")
    model = _resolve_model(args)
    out = Path(args.out) if args.out else Path("spiral_out") / f"{_slug(args.goal)}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and not out.is_dir():
        raise UsageError(f"argument --out: {str(out)!r} exists and is not a directory")
    return GenerateSettings(goal=args.goal.strip(), model=model, planner=args.planner, critic=args.critic, out_dir=out,
                            fps=args.fps, warmup=not args.no_warmup, progress=not args.no_progress,
                            agent_timeout_s=args.agent_timeout)


def _engine_config(args: argparse.Namespace, model_cfg, spec: ModelSpec):
    from spiral_rt.engine import EngineConfig

    latent = spec.latent_size or ((60, 104) if model_cfg.name.startswith("wan2.1")
                                  else (4, 4) if spec.random_weights else (8, 8))
    ph, pw = model_cfg.patch_size[1], model_cfg.patch_size[2]
    if latent[0] % ph or latent[1] % pw:
        raise UsageError(f"argument --latent-size: {latent[0]} {latent[1]} must be multiples of the patch ({ph}, {pw})")
    return EngineConfig(latent_size=latent, seed=args.seed, device=spec.device, recache_on_switch=False,
                        cuda_graphs=False, **_kv_pool(args))


def _kv_pool(args: argparse.Namespace) -> dict:
    """EngineConfig fields of the KV pool: --kv-memory-mb, or train-grpo's small fixed pool (the trainer keeps
    its own K/V; the engine only supplies the model, its config and the text encoder)."""
    if getattr(args, "kv_num_pages", None) is not None:
        return {"kv_num_pages": args.kv_num_pages}
    if getattr(args, "kv_memory_mb", None) is not None:
        return {"kv_memory_bytes": args.kv_memory_mb * 2**20}
    return {}


def _build_engine(args: argparse.Namespace, spec: ModelSpec):
    """The engine for ``spec``; UsageError when the model cannot be had."""
    from spiral_rt.engine import Engine
    from spiral_rt.engine.generator import HashTextEncoder
    from spiral_rt.models.config import WanDiTConfig

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec.dtype]
    if spec.source == "world":
        from spiral_rt.world.model import load_world_model

        try:
            world = load_world_model(device=spec.device, dtype=dtype)
        except FileNotFoundError as exc:
            raise UsageError(f"the bundled world model's weights are not installed in this package yet ({exc}); use "
                             "--model PATH --config PRESET --vae PATH --text-encoder PATH, or --random-weights for a smoke run") from None
        return world.engine(**_kv_pool(args))

    from spiral_rt.ops.chunk_attention import SUPPORTED_HEAD_DIMS

    model_cfg = WanDiTConfig.from_name(spec.preset)
    if spec.random_weights and spec.preset == "tiny-test" and model_cfg.head_dim not in SUPPORTED_HEAD_DIMS:
        # the preset's default head_dim (12) is below what chunk_attention supports: the engine-sized tiny model
        model_cfg = model_cfg.replace(**TINY_ENGINE_FIELDS)
    if model_cfg.head_dim not in SUPPORTED_HEAD_DIMS:
        raise UsageError(f"argument --config: {spec.preset} has head_dim {model_cfg.head_dim}; the engine's "
                         f"attention supports {SUPPORTED_HEAD_DIMS}")
    z_dim = model_cfg.out_channels
    if spec.random_weights:
        from spiral_rt.models.dit import build_dit
        from spiral_rt.models.vae import build_vae_decoder, tiny_vae

        gen = torch.Generator().manual_seed(args.seed)
        model = build_dit(model_cfg)
        _randomize_(model, 0.1, gen)
        model.to(spec.device)
        if dtype != torch.float32:
            model.to_dtype(dtype)
        model.eval()
        if spec.vae:
            vae = _load_vae(spec)
        else:
            vae = _randomize_(build_vae_decoder(tiny_vae(base_dim=8, z_dim=z_dim)), 0.05, gen).to(spec.device).eval()
        text_encoder = HashTextEncoder(model_cfg.text_dim, model_cfg.text_len)
    else:
        from spiral_rt.models.checkpoints import load_dit
        from spiral_rt.models.text import CachedTextEncoder, UMT5TextEncoder

        try:
            model = load_dit(spec.checkpoint, model_cfg, device=spec.device, dtype=dtype if dtype != torch.float32 else None)
        except Exception as exc:  # any loader error (format, shapes, I/O) is the argument's problem
            raise UsageError(f"argument --model: cannot load {spec.checkpoint!r} as {spec.preset}: {exc}") from None
        vae = _load_vae(spec)
        try:
            encoder = UMT5TextEncoder(spec.text_encoder, device=spec.device,
                                      dtype=torch.bfloat16 if torch.device(spec.device).type == "cuda" else None)
        except Exception as exc:  # missing files, wrong model type, transformers errors
            raise UsageError(f"argument --text-encoder: cannot load {spec.text_encoder!r}: {exc}") from None
        if encoder.dim != model_cfg.text_dim:
            raise UsageError(f"argument --text-encoder: embeddings of width {encoder.dim}, the model {spec.preset} "
                             f"expects text_dim={model_cfg.text_dim}")
        text_encoder = CachedTextEncoder(encoder)
    try:
        return Engine(model, vae, _engine_config(args, model_cfg, spec), text_encoder=text_encoder)
    except ValueError as exc:
        raise UsageError(f"the engine cannot run this model: {exc}") from None


def _load_vae(spec: ModelSpec):
    from spiral_rt.models.checkpoints import load_vae
    from spiral_rt.models.vae import WanVAEConfig

    try:
        return load_vae(spec.vae, WanVAEConfig(), device=spec.device)
    except Exception as exc:  # any loader error (format, shapes, I/O) is the argument's problem
        raise UsageError(f"argument --vae: cannot load {spec.vae!r} as the Wan2.1 VAE: {exc}") from None


def _randomize_(module: torch.nn.Module, std: float, gen: torch.Generator) -> torch.nn.Module:
    """Seeded random values for every parameter (norm weights around 1): a smoke-test model."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
            norm = name.endswith(("gamma", "norm_q.weight", "norm_k.weight")) or (".norm" in name and name.endswith("weight"))
            p.copy_(1 + std * noise if norm else std * noise)
    return module


def _build_agents(planner_spec: str, critic_spec: str, timeout_s: float):
    """(planner, critic) from their specs; planner "none" (rollout only) gives no planner."""
    from spiral_rt.agents.factory import agents_from_specs, backend_from_spec
    from spiral_rt.agents.llm import ChatCriticAgent, ChatPlanAgent
    from spiral_rt.world import WorldCritic, WorldPlanner

    p, c, t = planner_spec, critic_spec, timeout_s
    try:
        if p not in ("world", "none") and c != "world":
            return agents_from_specs(p, c, timeout_s=t)
        planner = (None if p == "none" else WorldPlanner() if p == "world"
                   else ChatPlanAgent(backend_from_spec(p, timeout_s=t)))
        critic = WorldCritic() if c == "world" else ChatCriticAgent(backend_from_spec(c, timeout_s=t))
    except (ValueError, ImportError) as exc:
        raise UsageError(f"arguments --planner/--critic: {exc}") from None
    return planner, critic


class _PlanWatcher:
    """Wraps the planner to learn how many steps are planned (for the progress bar's total)."""

    def __init__(self, planner, on_plan):
        self._planner, self._on_plan = planner, on_plan

    def plan(self, goal, memory):
        plan = self._planner.plan(goal, memory)
        self._on_plan("plan", plan)
        return plan

    def replan(self, goal, memory, remaining):
        plan = self._planner.replan(goal, memory, remaining)
        self._on_plan("replan", plan)
        return plan

    def __getattr__(self, name):  # drain_events and anything else the loop looks for
        return getattr(self._planner, name)


class _Progress:
    """A tqdm bar over steps, its postfix the latest attempt; one line per decided attempt."""

    def __init__(self, enabled: bool):
        from tqdm import tqdm

        self._tqdm = tqdm
        self.bar = tqdm(total=None, unit="step", desc="planning", disable=not enabled, dynamic_ncols=True, file=sys.stderr)
        self.enabled = enabled
        self.done = 0

    def on_plan(self, call: str, plan) -> None:
        # A plan may not be valid (the loop then falls back); count only what looks like steps.
        steps = len(getattr(plan, "steps", None) or [])
        if steps:
            self.bar.total = (steps if call == "plan" else self.done + steps)
            self.bar.set_description("steps")
            self.bar.refresh()

    def on_attempt(self, rec) -> None:
        from spiral_rt.agents import trace as tr

        v = rec.verdict
        verdict = f"score {v.score:.2f}" + (f" ({v.failure.value})" if v is not None and v.failure else "") if v else "no verdict"
        line = (f"step {rec.step_index} attempt {rec.attempt}{' (speculative)' if rec.speculative else ''}: "
                f"{rec.decision}, {verdict}, {rec.num_frames} frames in {rec.generate_s:.2f} s")
        if rec.decision in (tr.ACCEPTED, tr.KEPT):
            self.done += 1
            self.bar.update(1)
        self.bar.set_description("steps")
        self.bar.set_postfix_str(f"step {rec.step_index} try {rec.attempt}: {rec.decision}")
        if self.enabled:
            self._tqdm.write(line, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def _world_start(spec: ModelSpec, goal: str, seed: int, generator):
    """The bundled world's start: the scene the goal acts on (``scene_for_goal``, seeded), observed as
    the session's first chunk. Returns ((scene, frames) or None, a note for the trace or None); other
    models start from their own first chunk."""
    if spec.source != "world":
        return None, None
    from spiral_rt.world.goals import scene_for_goal
    from spiral_rt.world.model.loader import scene_latents

    try:
        scene = scene_for_goal(goal, seed=seed)
    except ValueError as exc:
        return None, f"no start scene derived from the goal ({exc}); the world model starts from its own first chunk"
    frames = generator.observe(scene.describe(), scene_latents(generator.engine.vae, scene))
    return (scene, frames), None


def _generate(args: argparse.Namespace) -> int:
    try:
        settings = _resolve(args)
        spec = settings.model
        if spec.random_weights:
            print(f"spiral-rt generate: {RANDOM_WEIGHTS_LABEL} (preset {spec.preset})", flush=True)
        engine = _build_engine(args, spec)
        spec.latent_size = tuple(engine.config.latent_size)
        spec.parameters = sum(p.numel() for p in engine.model.parameters())
        if args.fp8:
            from spiral_rt.models.fp8 import apply_fp8_linears

            apply_fp8_linears(engine.model)
        planner, critic = _build_agents(settings.planner, settings.critic, settings.agent_timeout_s)
        from spiral_rt.agents.loop import ClosedLoop, LoopConfig
        from spiral_rt.engine.generator import EngineGenerator, EngineGeneratorConfig

        loop_cfg = LoopConfig(max_retries=args.max_retries, max_replans=args.max_replans, seed=args.seed,
                              speculate=not args.no_speculate, max_span_chunks=args.max_span_chunks,
                              critic_timeout_s=args.critic_timeout, planner_timeout_s=args.critic_timeout)
        loop_cfg.validate()
        generator = EngineGenerator(engine, EngineGeneratorConfig(recache=bool(args.recache)))
    except (UsageError, ValueError) as exc:  # ValueError: a config dataclass refused a value
        print(f"spiral-rt generate: error: {exc}", file=sys.stderr)
        return 2
    try:
        start, start_note = _world_start(spec, settings.goal, args.seed, generator)
    except Exception as exc:  # the engine could not take the observed scene (e.g. a KV pool too small)
        generator.close()
        print(f"spiral-rt generate: error: showing the start scene to the model failed: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 1

    from spiral_rt.agents.outputs import write_outputs

    progress = _Progress(settings.progress)
    loop = ClosedLoop(generator, _PlanWatcher(planner, progress.on_plan), critic, loop_cfg)

    def warmup() -> None:
        try:
            generator.warmup(settings.goal, seed=args.seed)
        except Exception as exc:  # the loop's first generate meets the same problem and records it
            logger.warning("warm-up chunk failed: %s: %s", type(exc).__name__, exc)

    t0 = time.perf_counter()
    memory = None
    if start is not None:
        from spiral_rt.agents.types import WorldMemory

        memory = WorldMemory(key_frames=[start[1][-1]])
    try:
        result = loop.run(settings.goal, warmup=warmup if settings.warmup else None, memory=memory,
                          progress=progress.on_attempt)
    finally:
        progress.close()
        generator.close()
    if spec.random_weights:
        result.trace.warn(RANDOM_WEIGHTS_LABEL)
    if start_note:
        result.trace.warn(start_note)
    if start is not None and result.video.shape[0] > 0:  # the video opens on the observed start scene
        result.video = np.concatenate([start[1], result.video])
    paths = write_outputs(result, settings.out_dir, fps=settings.fps)
    # the model (and the world's start scene) go into the trace next to the loop's record
    data = json.loads(paths.trace.read_text())
    data["model"] = spec.describe()
    if start is not None:
        data["start_scene"] = {"description": start[0].describe(), "scene": start[0].to_dict(),
                               "observed_frames": int(start[1].shape[0])}
    paths.trace.write_text(json.dumps(data, indent=2) + "\n")

    t = result.trace
    print(f"goal: {settings.goal!r}: {len(t.executed_steps)} step(s) kept, {len(t.attempts)} attempt(s), "
          f"{t.counters['retries']} retr{'y' if t.counters['retries'] == 1 else 'ies'}, {t.counters['replans']} replan(s), "
          f"{result.video.shape[0]} frames in {time.perf_counter() - t0:.1f} s"
          + (" [random weights]" if spec.random_weights else ""))
    print(f"video:         {paths.video if paths.video else 'none (no frames kept)'}")
    print(f"trace:         {paths.trace}")
    print(f"contact sheet: {paths.contact_sheet if paths.contact_sheet else 'none (see the trace warnings)'}")
    if t.error is not None:
        print(f"spiral-rt generate: the run stopped early: {t.error}", file=sys.stderr)
        return 1
    return 0


class _HelpFormatter(argparse.HelpFormatter):
    """Appends '(default: X)' where a default is set and the help text does not already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def _add_model_options(p: argparse.ArgumentParser, *, kv_pool: bool = True):
    """The model options of generate, rollout and train-grpo (resolved by ``_resolve_model``); returns the group."""
    m = p.add_argument_group("model")
    m.add_argument("--model", default="world",
                   help="'world' (the bundled world's trained tiny model) or a DiT checkpoint file/directory")
    m.add_argument("--config", default=None, help="model preset of a checkpoint or of --random-weights "
                                                  "(spiral_rt.models.config.PRESETS; random weights: tiny-test)")
    m.add_argument("--vae", default=None, help="Wan2.1 VAE checkpoint (required with --model PATH)")
    m.add_argument("--text-encoder", default=None, help="UMT5 directory (required with --model PATH)")
    m.add_argument("--random-weights", action="store_true",
                   help="smoke run: random weights on --config (tiny-test), tiny random VAE, hashed text encoder")
    m.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the model runs")
    m.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="DiT dtype (default: bfloat16 on cuda, float32 on cpu)")
    m.add_argument("--latent-size", type=_number("--latent-size"), nargs=2, metavar=("H", "W"), default=None,
                   help="latent frame size (default: 60 104 for the Wan presets, 4 4 with --random-weights, else 8 8)")
    if kv_pool:
        m.add_argument("--kv-memory-mb", type=_number("--kv-memory-mb"), default=None,
                       help="KV cache pool size (default: 40%% of free GPU memory, 256 MiB on cpu)")
    return m


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate", help="run the closed loop on a goal and write video, trace and contact sheet",
        description="Plan the goal, generate each step with the streaming engine, judge it, regenerate or replan; "
                    "write video.mp4, trace.json and contact_sheet.png.",
        formatter_class=_HelpFormatter)
    p.add_argument("goal", metavar="GOAL", help='the goal, e.g. "move the red circle left, then make it blue"')
    m = _add_model_options(p)
    m.add_argument("--recache", action="store_true", help="LongLive re-cache of the context at each step's prompt switch")
    m.add_argument("--fp8", action="store_true",
                   help="e4m3 DiT block linears (spiral_rt.models.fp8; torch._scaled_mm on sm_89+ GPUs, emulated elsewhere)")
    a = p.add_argument_group("agents and loop")
    a.add_argument("--planner", type=_agent_spec("--planner"), default="world", help=AGENT_SPEC_HELP)
    a.add_argument("--critic", type=_agent_spec("--critic"), default="world", help=AGENT_SPEC_HELP)
    a.add_argument("--seed", type=_seed, default=0, help="base seed (each step and attempt derives its own)")
    a.add_argument("--max-retries", type=_number("--max-retries", minimum=0), default=2,
                   help="regenerations of a rejected step before replanning")
    a.add_argument("--max-replans", type=_number("--max-replans", minimum=0), default=2, help="replans per run")
    a.add_argument("--max-span-chunks", type=_number("--max-span-chunks"), default=None,
                   help="clamp each planned step to this many chunks")
    a.add_argument("--no-speculate", action="store_true",
                   help="do not generate the next step while the critic judges the current one")
    a.add_argument("--critic-timeout", type=_number("--critic-timeout", float, 0, strict=True), default=120.0,
                   help="longest wait in seconds for a verdict or a plan before falling back")
    a.add_argument("--agent-timeout", type=_number("--agent-timeout", float, 0, strict=True), default=60.0,
                   help="request timeout in seconds of LLM/VLM agents")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, help="output directory (default: spiral_out/<goal>-<time>)")
    o.add_argument("--fps", type=_number("--fps"), default=16, help="frame rate of the mp4")
    o.add_argument("--no-warmup", action="store_true", help="skip the warm-up chunk that overlaps the first plan")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    p.set_defaults(func=_generate)


# ------------------------------------------------------------------------------------------ rollout

ROLLOUT_FIELD_FLAGS = {"goals": "GOAL", "num_plans": "--plans", "group_size": "--group-size", "num_chunks": "--chunks",
                       "fork_chunk": "--fork-chunk", "train_chunks": "--train-chunks", "train_steps": "--train-steps",
                       "noise": "--noise", "seed": "--seed"}
"""RolloutSpec field -> the rollout option that sets it (for error messages)."""


def _spec_error(exc: ValueError) -> UsageError:
    """A RolloutSpec ValueError as a UsageError naming the option of the field it names."""
    text = str(exc)
    for name, flag in ROLLOUT_FIELD_FLAGS.items():
        if f"'{name}" in text:
            return UsageError(f"argument {flag}: {text.removeprefix('RolloutSpec: ')}")
    return UsageError(text)


def _rollout_goals(args: argparse.Namespace) -> list[str]:
    if args.goals_file is not None and args.goal:
        raise UsageError("argument --goals: give goals as GOAL arguments or in --goals FILE, not both")
    if args.goals_file is None:
        if not args.goal:
            raise UsageError("argument GOAL: no goals; give GOAL [GOAL ...] or --goals FILE")
        for i, g in enumerate(args.goal):
            if not g.strip():
                raise UsageError(f"argument GOAL: goal {i + 1} is empty")
        return [g.strip() for g in args.goal]
    try:
        lines = Path(args.goals_file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"argument --goals: cannot read {args.goals_file!r}: {exc}") from None
    goals = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not goals:
        raise UsageError(f"argument --goals: {args.goals_file!r} holds no goals (one per line; '#' starts a comment)")
    return goals


def _rollout_out(args: argparse.Namespace) -> Path:
    out = Path(args.out) if args.out else Path("spiral_out") / f"rollout-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and not out.is_dir():
        raise UsageError(f"argument --out: {str(out)!r} exists and is not a directory")
    if (out / "batch.json").exists():
        raise UsageError(f"argument --out: {str(out)!r} already holds a rollout (batch.json); choose a new directory")
    return out


def _model_record(spec: ModelSpec, weights_seed: int) -> dict:
    """What a batch records about the model that generated it (train-grpo checks it)."""
    d = spec.describe()
    if spec.random_weights:
        d["weights_seed"] = weights_seed
    return d


def _rollout_summary(batch, spec, out: Path, model: dict, files: dict) -> dict:
    """summary.json: per-group rewards, advantages, timings, throughput, peak KV memory."""
    st = batch.stats
    rewards = batch.rewards
    groups = []
    for grp, plan in enumerate(batch.plans()):
        sel = batch.group_index == grp
        r = rewards[sel]
        groups.append({
            "group": grp, "goal_index": grp // spec.num_plans, "goal": plan.goal.text, "plan_index": grp % spec.num_plans,
            "plan": [s.prompt for s in plan.steps], "rewards": r.tolist(),
            "reward_mean": float(r.mean()), "reward_std": float(r.std(unbiased=False)),
            "reward_min": float(r.min()), "reward_max": float(r.max()),
            "advantages": batch.advantages[sel].tolist(),
            "plan_reward": float(batch.plan_rewards[grp]), "plan_advantage": float(batch.plan_advantages[grp]),
        })
    return {
        "out": str(out), "files": files, "model": model,
        "rollout": {"goals": [g if isinstance(g, str) else g.text for g in spec.goals], "num_plans": spec.num_plans,
                    "group_size": spec.group_size, "num_chunks": spec.num_chunks, "fork_chunk": spec.fork_chunk,
                    "trained_chunks": batch.chunk.unique().tolist(), "trained_steps": batch.step.unique().tolist(),
                    "noise": spec.noise, "seed": spec.seed, "schedule": st["schedule"]},
        "videos": batch.num_members, "transitions_per_video": batch.num_transitions,
        "frames_per_video": int(batch.frames.shape[1]) if batch.frames is not None else None,
        "rewards": {"mean": float(rewards.mean()), "std": float(rewards.std(unbiased=False)),
                    "min": float(rewards.min()), "max": float(rewards.max())},
        "advantages": batch.advantages.tolist(),
        "groups": groups,
        "timings": {"seconds": st["seconds"], "generate_seconds": st["generate_seconds"],
                    "critic_wait_seconds": st["seconds"] - st["generate_seconds"]},
        "videos_per_s": st["videos_per_s"], "engine_steps": st["engine_steps"],
        "peak_kv_pages": st["peak_kv_pages"], "peak_kv_bytes": st["peak_kv_bytes"], "page_bytes": st["page_bytes"],
    }


def _print_rollout_table(summary: dict) -> None:
    rows = [("group", "goal", "plan", "reward", "std", "min", "max", "plan adv")]
    for g in summary["groups"]:
        goal = g["goal"] if len(g["goal"]) <= 36 else g["goal"][:35] + "~"
        rows.append((str(g["group"]), goal, str(g["plan_index"]), f"{g['reward_mean']:.3f}", f"{g['reward_std']:.3f}",
                     f"{g['reward_min']:.3f}", f"{g['reward_max']:.3f}", f"{g['plan_advantage']:+.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) if i == 1 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    t = summary["timings"]
    print(f"{summary['videos']} videos ({summary['transitions_per_video']} trained transitions each) in "
          f"{t['seconds']:.2f} s ({t['generate_seconds']:.2f} s generating): {summary['videos_per_s']:.3f} videos/s; "
          f"reward {summary['rewards']['mean']:.3f} +- {summary['rewards']['std']:.3f}; peak KV "
          f"{summary['peak_kv_pages']} pages ({summary['peak_kv_bytes'] / 2**20:.2f} MiB)")


def _rollout(args: argparse.Namespace) -> int:
    from spiral_rt.rollout import RolloutRunner, RolloutSpec

    prog = "spiral-rt rollout"
    try:
        goals = _rollout_goals(args)
        out = _rollout_out(args)
        model = _resolve_model(args)
        spec = RolloutSpec(goals=goals, num_plans=args.plans, group_size=args.group_size, num_chunks=args.chunks,
                           fork_chunk=args.fork_chunk, train_chunks=tuple(args.train_chunks) if args.train_chunks else None,
                           train_steps=tuple(args.train_steps) if args.train_steps else None, noise=args.noise,
                           seed=args.seed, keep_frames=not args.no_frames, progress=not args.no_progress)
        try:
            spec.validate()
        except ValueError as exc:
            raise _spec_error(exc) from None
        if model.random_weights:
            print(f"{prog}: {RANDOM_WEIGHTS_LABEL} (preset {model.preset})", flush=True)
        engine = _build_engine(args, model)
        model.latent_size = tuple(engine.config.latent_size)
        model.parameters = sum(p.numel() for p in engine.model.parameters())
        try:
            spec.trained_steps(engine.config.schedule)
        except ValueError as exc:
            raise _spec_error(exc) from None
        planner, critic = _build_agents(args.planner, args.critic, args.agent_timeout)
        spec.planner = planner
        try:
            spec.plans = spec.resolved_plans()  # planned once here, so a goal the planner cannot read is a usage error
        except ValueError as exc:
            raise UsageError(f"argument GOAL: the planner cannot plan it: {exc} (--planner none uses each goal as "
                             "its own prompt)") from None
        spec.planner = None
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2

    try:
        batch = RolloutRunner(engine, critic).run(spec, schedule=args.schedule)
    except Exception as exc:  # generation or critic failure: nothing is written
        print(f"{prog}: the rollout failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    record = _model_record(model, args.seed)
    batch.stats["model"] = record
    batch.save(out)
    jsonl = RolloutRunner.write_planner_jsonl(batch, out / "planner.jsonl")
    files = {"batch": str(out), "planner_jsonl": str(jsonl), "summary": str(out / "summary.json")}
    summary = _rollout_summary(batch, spec, out, record, files)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    _print_rollout_table(summary)
    print(f"batch:   {out}" + (" [random weights]" if model.random_weights else ""))
    print(f"planner: {jsonl}")
    print(f"summary: {out / 'summary.json'}")
    return 0


# ------------------------------------------------------------------------------------------ train-grpo

MODEL_RECORD_KEYS = ("source", "preset", "checkpoint", "dtype", "latent_size", "weights_seed")
"""What must agree between the model that generated a batch and the one train-grpo trains."""


def _checkpoints(out: Path) -> list[Path]:
    """``step-NNNNNNNN`` checkpoint directories of ``out`` (with trainer.json), oldest first."""
    if not out.is_dir():
        return []
    found = [d for d in out.iterdir() if d.is_dir() and re.fullmatch(r"step-\d+", d.name) and (d / "trainer.json").is_file()]
    return sorted(found, key=lambda d: int(d.name.split("-")[1]))


def _load_batches(args: argparse.Namespace) -> list:
    from spiral_rt.rollout import RolloutBatch

    batches = []
    for d in args.batches:
        if not (Path(d) / "batch.json").is_file():
            raise UsageError(f"argument --batches: {d!r} holds no rollout (batch.json); write one with spiral-rt rollout")
        try:
            b = RolloutBatch.load(d)
        except Exception as exc:  # format version, missing or corrupt tensor files
            raise UsageError(f"argument --batches: cannot load {d!r}: {exc}") from None
        if b.advantages is None:
            raise UsageError(f"argument --batches: {d!r} has no rewards or advantages (the rollout ran without a critic)")
        batches.append(b)
    return batches


def _check_batch_model(args: argparse.Namespace, batches: list, model: ModelSpec) -> None:
    """Random weights take the batches' weight seed unless --seed is given; every batch must come from the model."""
    recorded = [b.stats.get("model") for b in batches]
    if model.random_weights and args.seed is None:
        seeds = {r.get("weights_seed") for r in recorded if r}
        args.seed = seeds.pop() if len(seeds) == 1 and None not in seeds else 0
    if args.seed is None:
        args.seed = 0
    mine = _model_record(model, args.seed)
    for d, r in zip(args.batches, recorded):
        if not r:
            continue  # written without the CLI: nothing to check against
        diff = [k for k in MODEL_RECORD_KEYS if k in r and k in mine and r[k] is not None and mine[k] is not None
                and (list(r[k]) if isinstance(r[k], (list, tuple)) else r[k])
                != (list(mine[k]) if isinstance(mine[k], (list, tuple)) else mine[k])]
        if diff:
            have = ", ".join(f"{k}={mine[k]!r}" for k in diff)
            want = ", ".join(f"{k}={r[k]!r}" for k in diff)
            raise UsageError(f"argument --batches: {d!r} was generated with {want}; these options give {have} "
                             "(pass the rollout's model options)")


def _train_grpo(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from spiral_rt.rl import GRPOLossConfig, GRPOTrainer, GRPOTrainerConfig
    from spiral_rt.rl.launch import join_from_env

    prog = "spiral-rt train-grpo"
    out = Path(args.out)
    try:
        if out.exists() and not out.is_dir():
            raise UsageError(f"argument --out: {str(out)!r} exists and is not a directory")
        existing = _checkpoints(out)
        if args.resume and not existing:
            raise UsageError(f"argument --resume: no checkpoint (step-N/trainer.json) in --out {str(out)!r}")
        if existing and not args.resume:
            raise UsageError(f"argument --out: {str(out)!r} already holds checkpoints (latest {existing[-1].name}); "
                             "pass --resume to continue from it or choose another directory")
        batches = _load_batches(args)
        model = _resolve_model(args)
        _check_batch_model(args, batches, model)
        launch = join_from_env(model.device)  # under torchrun: this rank's device and the process group
        model.device = launch.device
        if launch.world_size > len(batches):
            raise UsageError(f"argument --batches: {len(batches)} batch(es) for {launch.world_size} ranks; every rank "
                             "trains on its own rollout batch, so give at least one per rank")
        if model.random_weights and launch.rank == 0:
            print(f"{prog}: {RANDOM_WEIGHTS_LABEL} (preset {model.preset}, weights seed {args.seed})", flush=True)
        args.kv_num_pages = 4  # the engine supplies model, config and text encoder; training keeps its own K/V
        engine = _build_engine(args, model)
        config = GRPOTrainerConfig(
            lr=args.lr, lora_rank=args.lora_rank or None, lora_alpha=args.lora_alpha or float(args.lora_rank or 16),
            micro_batch_size=args.micro_batch_size, gradient_checkpointing=args.gradient_checkpointing,
            loss=GRPOLossConfig(clip_range=args.clip_range, kl_coef=args.kl_coef, kl=args.kl,
                                convention=args.convention, ratio_norm=args.ratio_norm))
        try:
            trainer = GRPOTrainer(engine.model, config, engine.text_encoder, engine_config=engine.config)
        except ValueError as exc:
            raise UsageError(f"the trainer cannot train this model: {exc}") from None
        if args.resume:
            try:
                trainer.load(existing[-1])
            except ValueError as exc:
                raise UsageError(f"argument --resume: {exc}") from None
    except (UsageError, ValueError) as exc:  # ValueError: a config dataclass refused a value
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2

    log_path = out / "log.jsonl"
    first = trainer.step
    rank, ranks = launch.rank, launch.world_size
    steps = args.steps if args.steps is not None else len(batches) // ranks
    bar = tqdm(total=steps, unit="step", desc="train-grpo", disable=args.no_progress or rank != 0, dynamic_ncols=True,
               file=sys.stderr)
    t0 = time.perf_counter()
    last_saved, stats = None, {}
    try:
        for _ in range(steps):
            # batches in turn, continued across --resume; with R ranks, step s trains batches s*R .. s*R+R-1
            i = (trainer.step * ranks + rank) % len(batches)
            ts = time.perf_counter()
            try:
                stats = trainer.train_step(batches[i])
            except ValueError as exc:  # the batch does not fit the model or the loss options
                if trainer.step == first:  # nothing written yet: a usage error
                    print(f"{prog}: error: argument --batches: {args.batches[i]!r}: {exc}", file=sys.stderr)
                    return 2
                raise
            stats.update(batch=args.batches[i], seconds=time.perf_counter() - ts, rank=rank)
            if rank == 0:
                out.mkdir(parents=True, exist_ok=True)
                with log_path.open("a", encoding="utf-8") as log:
                    log.write(json.dumps(stats) + "\n")
            bar.update(1)
            bar.set_postfix_str(f"step {trainer.step} loss {stats['loss']:.4g} ratio {stats['ratio_mean']:.4f} "
                                f"kl {stats['kl']:.3g}")
            if args.save_every and trainer.step % args.save_every == 0:
                last_saved = trainer.save(out / f"step-{trainer.step:08d}")
    except Exception as exc:  # a failed step: the checkpoints and log lines already written stay
        print(f"{prog}: training stopped at step {trainer.step}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        bar.close()
    if last_saved is None or last_saved.name != f"step-{trainer.step:08d}":
        last_saved = trainer.save(out / f"step-{trainer.step:08d}")
    launch.leave()
    if rank != 0:
        return 0
    print(f"trained steps {first + 1}..{trainer.step} on {len(batches)} batch(es) in {time.perf_counter() - t0:.1f} s"
          + (f": loss {stats['loss']:.4g}, ratio {stats['ratio_mean']:.4f}, kl {stats['kl']:.3g}, grad norm "
             f"{stats['grad_norm']:.3g}" if stats else "")
          + (" [random weights]" if model.random_weights else ""))
    print(f"checkpoint: {last_saved}")
    print(f"log:        {log_path}")
    return 0


def _add_rollout(sub) -> None:
    from spiral_rt.rollout import NOISE_POLICIES, SCHEDULES

    p = sub.add_parser(
        "rollout", help="GRPO rollouts: K plans x G videos per goal, scored; writes a RolloutBatch and a summary",
        description="Generate hierarchical GRPO groups (K plans per goal, G continuations per plan from a shared "
                    "prefix), record the trained transitions, score every video with the critic, and write the "
                    "RolloutBatch, planner.jsonl (plan-level rewards for LLM trainers) and summary.json into --out.",
        formatter_class=_HelpFormatter)
    p.add_argument("goal", metavar="GOAL", nargs="*", help="goals (or --goals FILE)")
    p.add_argument("--goals", dest="goals_file", metavar="FILE", default=None,
                   help="a file of goals, one per line ('#' starts a comment line)")
    _add_model_options(p)
    r = p.add_argument_group("rollout")
    r.add_argument("--plans", type=_number("--plans"), default=1, metavar="K", help="plans per goal")
    r.add_argument("--group-size", type=_number("--group-size"), default=4, metavar="G", help="videos per plan")
    r.add_argument("--chunks", type=_number("--chunks"), default=7, metavar="N", help="chunks per video")
    r.add_argument("--fork-chunk", type=_number("--fork-chunk", minimum=0), default=2, metavar="F",
                   help="chunks of the shared prefix before the G-way fork")
    r.add_argument("--train-chunks", type=_number("--train-chunks", minimum=0), nargs="+", default=None, metavar="C",
                   help="trained chunks counted from the fork (default: every chunk after the fork)")
    r.add_argument("--train-steps", type=_number("--train-steps", minimum=0), nargs="+", default=None, metavar="S",
                   help="trained denoising steps (default: every stochastic step)")
    r.add_argument("--noise", choices=NOISE_POLICIES, default="independent", help="noise sharing within a group")
    r.add_argument("--seed", type=_seed, default=0, help="Philox seed of the rollout (and of --random-weights)")
    r.add_argument("--schedule", choices=SCHEDULES, default="batched",
                   help="batched (members in one batch), or the baselines prefix_once and naive")
    a = p.add_argument_group("agents")
    a.add_argument("--planner", type=_planner_spec, default="world",
                   help=AGENT_SPEC_HELP + ", or none (each goal is the prompt of every chunk)")
    a.add_argument("--critic", type=_agent_spec("--critic"), default="world", help=AGENT_SPEC_HELP)
    a.add_argument("--agent-timeout", type=_number("--agent-timeout", float, 0, strict=True), default=60.0,
                   help="request timeout in seconds of LLM/VLM agents")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, help="output directory (default: spiral_out/rollout-<time>)")
    o.add_argument("--no-frames", action="store_true", help="do not store the decoded frames in the batch")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    o.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    p.set_defaults(func=_rollout)


def _clip_range(text: str) -> float:
    value = _number("--clip-range", float, 0, strict=True)(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"--clip-range must be < 1, got {value}")
    return value


def _planner_spec(text: str) -> str:
    return text if text == "none" else _agent_spec("--planner")(text)


def _add_train_grpo(sub) -> None:
    p = sub.add_parser(
        "train-grpo", help="GRPO updates of the DiT from rollout batches; checkpoints and a JSONL log",
        description="Train the model on RolloutBatch directories written by spiral-rt rollout (batches in turn, one "
                    "optimizer step each), writing step-N checkpoints and log.jsonl (per-step statistics) into --out.",
        formatter_class=_HelpFormatter)
    p.add_argument("--batches", nargs="+", required=True, metavar="DIR", help="rollout directories (spiral-rt rollout --out)")
    p.add_argument("--out", required=True, metavar="CKPT_DIR", help="checkpoint directory (step-N/ and log.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    _add_model_options(p, kv_pool=False)
    p.add_argument("--seed", type=_seed, default=None,
                   help="seed of --random-weights (default: the one recorded in the batches)")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=_number("--steps"), default=None, metavar="N",
                   help="optimizer steps to run now (default: one per batch)")
    t.add_argument("--lr", type=_number("--lr", float, 0, strict=True), default=1e-5, help="AdamW learning rate")
    t.add_argument("--lora-rank", type=_number("--lora-rank", minimum=0), default=16, metavar="R",
                   help="LoRA rank; 0: full fine-tuning")
    t.add_argument("--lora-alpha", type=_number("--lora-alpha", float, 0, strict=True), default=None,
                   help="LoRA alpha (default: the rank, i.e. scale 1)")
    t.add_argument("--kl-coef", type=_number("--kl-coef", float, 0), default=0.0, help="weight of the KL to the reference")
    t.add_argument("--kl", choices=("gaussian", "velocity_mse"), default="gaussian",
                   help="KL estimate: the step policy's Gaussian KL or TempAct's velocity MSE")
    t.add_argument("--clip-range", type=_clip_range, default=0.2, help="PPO ratio clip, in (0, 1)")
    t.add_argument("--convention", choices=("sum", "mean"), default="mean",
                   help="log-probs summed over a transition's elements or averaged per element")
    t.add_argument("--ratio-norm", action="store_true", help="TempAct's ratio normalisation")
    t.add_argument("--micro-batch-size", type=_number("--micro-batch-size"), default=4,
                   help="members per forward / backward")
    t.add_argument("--gradient-checkpointing", action="store_true", help="recompute each DiT block in the backward")
    t.add_argument("--save-every", type=_number("--save-every", minimum=0), default=0, metavar="N",
                   help="also checkpoint every N steps (0: at the end only)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    p.set_defaults(func=_train_grpo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spiral-rt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, native build and op backends").set_defaults(func=_info)
    _add_generate(sub)
    _add_rollout(sub)
    _add_train_grpo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.INFO if getattr(args, "verbose", False) else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
