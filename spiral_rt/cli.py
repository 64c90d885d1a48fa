"""The ``spiral-rt`` command.

Subcommands:
  info      what this installation can run: versions, devices, the native build, and which
            backend each op would use on each device.
  generate  SPIRAL's closed loop on one goal: plan, generate each step's segment with the streaming
            engine, judge it, regenerate or replan; writes video.mp4, trace.json and
            contact_sheet.png and prints where they are.

Boundaries: argument parsing, assembly of the pieces from their config dataclasses (``EngineConfig``,
``LoopConfig``, ``EngineGeneratorConfig``), a progress bar, and printing. Generation is the engine's
(``spiral_rt.engine``), the loop and its outputs are ``spiral_rt.agents``'. Exit codes: 0 done,
1 the run stopped on a generator error (what was kept is still written), 2 bad arguments or a model
that cannot be loaded.

Models for ``generate``:
  --model world                 the bundled world's trained tiny model (the default; needs its
                                weights file, see ``spiral_rt.world.model.load_world_model``)
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

import torch

import spiral_rt
from spiral_rt.ops import OP_BACKENDS, available_backends, dispatch


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


def _resolve(args: argparse.Namespace) -> GenerateSettings:
    """Check the arguments against each other and build the settings; UsageError names the argument."""
    from spiral_rt.models.config import PRESETS

    if not args.goal.strip():
        raise UsageError("argument GOAL is empty")
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
    kw = {}
    if args.kv_memory_mb is not None:
        kw["kv_memory_bytes"] = args.kv_memory_mb * 2**20
    return EngineConfig(latent_size=latent, seed=args.seed, device=spec.device, recache_on_switch=False,
                        cuda_graphs=False, **kw)


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
        return world.engine()

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
                                      dtype=torch.bfloat16 if spec.device == "cuda" else None)
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


def _build_agents(settings: GenerateSettings):
    from spiral_rt.agents.factory import agents_from_specs, backend_from_spec
    from spiral_rt.agents.llm import ChatCriticAgent, ChatPlanAgent
    from spiral_rt.world import WorldCritic, WorldPlanner

    p, c, t = settings.planner, settings.critic, settings.agent_timeout_s
    try:
        if p != "world" and c != "world":
            return agents_from_specs(p, c, timeout_s=t)
        planner = WorldPlanner() if p == "world" else ChatPlanAgent(backend_from_spec(p, timeout_s=t))
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


def _generate(args: argparse.Namespace) -> int:
    try:
        settings = _resolve(args)
        spec = settings.model
        if spec.random_weights:
            print(f"spiral-rt generate: {RANDOM_WEIGHTS_LABEL} (preset {spec.preset})", flush=True)
        engine = _build_engine(args, spec)
        spec.latent_size = tuple(engine.config.latent_size)
        spec.parameters = sum(p.numel() for p in engine.model.parameters())
        planner, critic = _build_agents(settings)
        from spiral_rt.agents.loop import ClosedLoop, LoopConfig
        from spiral_rt.engine.generator import EngineGenerator, EngineGeneratorConfig

        loop_cfg = LoopConfig(max_retries=args.max_retries, max_replans=args.max_replans, seed=args.seed,
                              speculate=not args.no_speculate, max_span_chunks=args.max_span_chunks,
                              critic_timeout_s=args.critic_timeout, planner_timeout_s=args.critic_timeout)
        loop_cfg.validate()
        generator = EngineGenerator(engine, EngineGeneratorConfig(recache=bool(args.recache)))
    except UsageError as exc:
        print(f"spiral-rt generate: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a config dataclass refused a value
        print(f"spiral-rt generate: error: {exc}", file=sys.stderr)
        return 2

    from spiral_rt.agents.outputs import write_outputs

    progress = _Progress(settings.progress)
    loop = ClosedLoop(generator, _PlanWatcher(planner, progress.on_plan), critic, loop_cfg)

    def warmup() -> None:
        try:
            generator.warmup(settings.goal, seed=args.seed)
        except Exception as exc:  # the loop's first generate meets the same problem and records it
            logger.warning("warm-up chunk failed: %s: %s", type(exc).__name__, exc)

    t0 = time.perf_counter()
    try:
        result = loop.run(settings.goal, warmup=warmup if settings.warmup else None, progress=progress.on_attempt)
    finally:
        progress.close()
        generator.close()
    if spec.random_weights:
        result.trace.warn(RANDOM_WEIGHTS_LABEL)
    paths = write_outputs(result, settings.out_dir, fps=settings.fps)
    # the model goes into the trace next to the loop's record
    data = json.loads(paths.trace.read_text())
    data["model"] = spec.describe()
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


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate", help="run the closed loop on a goal and write video, trace and contact sheet",
        description="Plan the goal, generate each step with the streaming engine, judge it, regenerate or replan; "
                    "write video.mp4, trace.json and contact_sheet.png.",
        formatter_class=_HelpFormatter)
    p.add_argument("goal", metavar="GOAL", help='the goal, e.g. "move the red circle left, then make it blue"')
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
    m.add_argument("--kv-memory-mb", type=_number("--kv-memory-mb"), default=None,
                   help="KV cache pool size (default: 40%% of free GPU memory, 256 MiB on cpu)")
    m.add_argument("--recache", action="store_true", help="LongLive re-cache of the context at each step's prompt switch")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spiral-rt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, native build and op backends").set_defaults(func=_info)
    _add_generate(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.INFO if getattr(args, "verbose", False) else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
