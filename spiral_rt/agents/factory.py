"""Agents from short spec strings, for the CLI and scripts.

Boundaries: parsing and construction only. Specs:

- ``openai:MODEL`` or ``openai:MODEL@BASE_URL``: an OpenAI-compatible endpoint (vLLM, SGLang, Ollama,
  hosted); the key comes from $OPENAI_API_KEY, the base URL from the spec or $OPENAI_BASE_URL;
- ``hf:/path/to/local/model``: a local transformers VLM (Qwen2.5-VL, Qwen3-VL), loaded on first use.

Programmatic agents (the bundled world's) are built by their own package. When the planner and the
critic name the same backend, they share one backend object (one local model in memory).
"""

from __future__ import annotations

from .backends import ChatBackend
from .llm import ChatCriticAgent, ChatPlanAgent, PlannerSettings

SPEC_HELP = "openai:MODEL[@BASE_URL] or hf:/path/to/local/vlm"


def backend_from_spec(spec: str, *, timeout_s: float = 60.0, max_retries: int = 3) -> ChatBackend:
    """The chat backend a spec string names (see the module docstring)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"backend_from_spec: argument 'spec' must look like {SPEC_HELP}, got {spec!r}")
    kind, _, rest = spec.partition(":")
    if kind == "openai":
        from .backends.openai_chat import OpenAIChatBackend, OpenAIChatConfig

        model, _, base_url = rest.partition("@")
        if not model:
            raise ValueError(f"backend_from_spec: argument 'spec' names no model: {spec!r} (expected {SPEC_HELP})")
        return OpenAIChatBackend(OpenAIChatConfig(model=model, base_url=base_url or None, timeout_s=timeout_s,
                                                  max_retries=max_retries))
    if kind == "hf":
        from .backends.transformers_vlm import TransformersVLMBackend, TransformersVLMConfig

        if not rest:
            raise ValueError(f"backend_from_spec: argument 'spec' names no model directory: {spec!r}")
        return TransformersVLMBackend(TransformersVLMConfig(model_path=rest))
    raise ValueError(f"backend_from_spec: unknown backend kind {kind!r} in {spec!r} (expected {SPEC_HELP})")


def agents_from_specs(planner_spec: str, critic_spec: str, *, planner_settings: PlannerSettings | None = None,
                      critic_frames: int = 6, timeout_s: float = 60.0, max_retries: int = 3) -> tuple[ChatPlanAgent, ChatCriticAgent]:
    """A (planner, critic) pair; one shared backend when both specs are equal."""
    planner_backend = backend_from_spec(planner_spec, timeout_s=timeout_s, max_retries=max_retries)
    critic_backend = planner_backend if critic_spec == planner_spec else backend_from_spec(
        critic_spec, timeout_s=timeout_s, max_retries=max_retries)
    return ChatPlanAgent(planner_backend, planner_settings), ChatCriticAgent(critic_backend, num_frames=critic_frames)
