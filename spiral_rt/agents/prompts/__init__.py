"""Prompt templates of the LLM/VLM agents, one module per agent (``planner``, ``critic``).

Each module holds the system prompt, the user-message builders and the JSON schema of the answer.
Messages use a backend-neutral form: ``{"role": ..., "content": str | list[part]}`` with parts
``{"type": "text", "text": str}`` and ``{"type": "image", "image": (H, W, 3) uint8 array}``; each
backend converts them (data-URL PNGs for OpenAI-compatible endpoints, PIL images for transformers).
"""

REPAIR_TEMPLATE = (
    "Your previous reply could not be used: {error}\n"
    "Reply again with only one JSON object that matches this JSON schema, no prose and no code fences:\n{schema}"
)
"""The one repair turn sent after a malformed answer ({error}, {schema})."""
