"""Reply parsing, repair, prompt building, and the local transformers backend with test doubles (no download)."""

import json

import numpy as np
import pytest
import torch

from spiral_rt.agents.backends import BackendError
from spiral_rt.agents.backends.transformers_vlm import TransformersVLMBackend, TransformersVLMConfig, to_hf_messages
from spiral_rt.agents.llm import (AgentOutputError, ChatCriticAgent, ChatPlanAgent, PlannerSettings, extract_json,
                                  last_rejection, parse_plan, parse_verdict)
from spiral_rt.agents.prompts import critic as critic_prompts
from spiral_rt.agents.prompts import planner as planner_prompts
from spiral_rt.agents.types import LAST_REJECTION, FailureKind, Goal, Step, Verdict, WorldMemory

VERDICT = {"score": 0.4, "completed": False, "failure": "physics", "feedback": "the ball floats",
           "refined_prompt": None, "plan_is_wrong": False}


@pytest.mark.parametrize("text", [
    json.dumps(VERDICT),
    "```json\n" + json.dumps(VERDICT) + "\n```",
    "Here you go:\n" + json.dumps(VERDICT) + "\nHope this helps {really}",
    "<think>hmm</think>```\n" + json.dumps(VERDICT, indent=2) + "```",
])
def test_extract_json_finds_the_object(text):
    assert extract_json(text) == VERDICT


@pytest.mark.parametrize("text", ["", "   ", "no json here", "{\"score\": 0.5,"])
def test_extract_json_rejects_garbage(text):
    with pytest.raises(ValueError):
        extract_json(text)


def test_parse_plan_clamps_spans_and_limits_steps():
    data = {"rationale": "r", "steps": [{"prompt": " a ", "span_chunks": 40, "success_criteria": "one"},
                                        {"prompt": "b", "span_chunks": 2.0, "success_criteria": []},
                                        {"prompt": "c", "span_chunks": 1, "success_criteria": []}]}
    plan = parse_plan(data, Goal("g"), max_span_chunks=6, max_steps=2)
    assert [(s.prompt, s.span_chunks, s.success_criteria, s.index) for s in plan.steps] == [("a", 6, ["one"], 0), ("b", 2, [], 1)]


@pytest.mark.parametrize("data, match", [
    ([], "object"), ({"steps": []}, "steps"), ({"steps": [{"prompt": "", "span_chunks": 1}]}, "prompt"),
    ({"steps": [{"prompt": "x", "span_chunks": "two"}]}, "span_chunks"), ({"refusal": "no"}, "refused"),
])
def test_parse_plan_errors(data, match):
    with pytest.raises(ValueError, match=match):
        parse_plan(data, Goal("g"), 8, 8)


def test_parse_verdict():
    v = parse_verdict(VERDICT)
    assert v.failure is FailureKind.PHYSICS and v.score == 0.4 and not v.completed
    assert parse_verdict({"score": 1, "completed": True, "failure": "none"}).failure is None
    for bad in ({"score": 0.5}, {"score": 2, "completed": True}, {"score": 0.5, "completed": False, "failure": "lava"}):
        with pytest.raises(ValueError):
            parse_verdict(bad)


class ScriptedBackend:
    def __init__(self, replies):
        self.replies, self.calls = list(replies), []

    def complete(self, messages, schema, schema_name):
        self.calls.append((messages, schema, schema_name))
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply


def test_planner_repairs_once_and_renders_replan_context():
    plan_json = json.dumps({"rationale": "", "steps": [{"prompt": "p", "span_chunks": 3, "success_criteria": []}]})
    backend = ScriptedBackend(["{bad", plan_json])
    agent = ChatPlanAgent(backend, PlannerSettings(max_span_chunks=5, max_steps=4, chunk_seconds=0.5))
    memory = WorldMemory()
    memory.record(Step("the ball rolls", 2), Verdict(0.9, True, feedback="ok"))
    memory.summary += f"\n{LAST_REJECTION}step 'bounce' (score 0.10, physics): the ball sinks into the floor"
    plan = agent.replan(Goal("roll then bounce"), memory, [Step("bounce", 2, ["ball in the air"], 1), Step("stop", 1)])
    assert [s.span_chunks for s in plan.steps] == [3]
    first, repair = backend.calls[0][0], backend.calls[1][0]
    assert "1 to 5" in first[0]["content"] and "0.5 s" in first[0]["content"] and "at most 4 steps" in first[0]["content"]
    user = first[1]["content"]
    assert "the ball sinks into the floor" in user and "the ball rolls" in user and "- stop [1 chunks" in user
    assert repair[-2]["role"] == "assistant" and repair[-2]["content"] == "{bad"
    assert last_rejection(memory).endswith("the ball sinks into the floor")
    assert backend.calls[0][1]["properties"]["steps"]["maxItems"] == 4
    assert [e["event"] for e in agent.drain_events()] == ["repair", "repaired"]


def test_backend_errors_propagate_for_the_loop_to_handle():
    agent = ChatCriticAgent(ScriptedBackend([BackendError("down")]))
    with pytest.raises(BackendError):
        agent.judge(np.zeros((1, 4, 4, 3), np.uint8), Step("x", 1), WorldMemory())
    agent = ChatCriticAgent(ScriptedBackend(["?", "??"]))
    with pytest.raises(AgentOutputError):
        agent.judge(np.zeros((1, 4, 4, 3), np.uint8), Step("x", 1), WorldMemory())


def test_critic_rejects_bad_frames_and_arguments():
    with pytest.raises(ValueError, match="num_frames"):
        ChatCriticAgent(ScriptedBackend([]), num_frames=0)
    with pytest.raises(ValueError, match="frames"):
        ChatCriticAgent(ScriptedBackend([])).judge(np.zeros((1, 4, 4, 3), np.float32), Step("x", 1), WorldMemory())


def test_sample_indices_spread_and_include_last():
    assert critic_prompts.sample_indices(10, 4) == [0, 3, 6, 9]
    assert critic_prompts.sample_indices(3, 8) == [0, 1, 2]
    assert critic_prompts.sample_indices(1, 1) == [0]
    with pytest.raises(ValueError, match="num_frames"):
        critic_prompts.sample_indices(0, 2)


def test_schemas_are_strict_compatible():
    for schema in (planner_prompts.schema(4, 3), critic_prompts.schema(), planner_prompts.schema(4, 3)["properties"]["steps"]["items"]):
        assert schema["additionalProperties"] is False and set(schema["required"]) == set(schema["properties"])


# ------------------------------------------------------------------------- transformers backend
class FakeProcessor:
    def __init__(self, reply):
        self.reply, self.conversations = reply, []

    def apply_chat_template(self, conversation, add_generation_prompt, tokenize, return_dict, return_tensors):
        assert add_generation_prompt and tokenize and return_dict and return_tensors == "pt"
        self.conversations.append(conversation)
        return {"input_ids": torch.ones((1, 7), dtype=torch.long), "attention_mask": torch.ones((1, 7), dtype=torch.long)}

    def batch_decode(self, ids, skip_special_tokens):
        assert ids.shape == (1, 3)  # only the new tokens are decoded
        return [self.reply]


class FakeModel:
    def __init__(self):
        self.kwargs = None

    def generate(self, **kwargs):
        self.kwargs = kwargs
        return torch.cat([kwargs["input_ids"], torch.full((1, 3), 5)], dim=1)


def test_transformers_backend_builds_qwen_messages_and_parses_the_reply():
    processor, model = FakeProcessor("```json\n" + json.dumps(VERDICT) + "\n```"), FakeModel()
    backend = TransformersVLMBackend(TransformersVLMConfig("/nonexistent/qwen", image_max_side=16, max_new_tokens=99),
                                     processor=processor, model=model)
    memory = WorldMemory()
    memory.record(Step("before", 1), Verdict(1.0, True), np.zeros((32, 64, 3), np.uint8))
    frames = np.random.default_rng(0).integers(0, 255, (5, 32, 64, 3), dtype=np.uint8)
    verdict = ChatCriticAgent(backend, num_frames=3).judge(frames, Step("jump", 1), memory)
    assert verdict.failure is FailureKind.PHYSICS
    (conv,) = processor.conversations
    assert [m["role"] for m in conv] == ["system", "user"]
    assert conv[0]["content"][0]["type"] == "text" and "critic" in conv[0]["content"][0]["text"]
    images = [p["image"] for p in conv[1]["content"] if p["type"] == "image"]
    assert len(images) == 4 and all(im.size == (16, 8) for im in images)  # reference + 3 frames, downscaled
    assert "JSON schema" in conv[1]["content"][-1]["text"] and "plan_is_wrong" in conv[1]["content"][-1]["text"]
    assert model.kwargs["max_new_tokens"] == 99 and model.kwargs["do_sample"] is False
    assert backend.drain_events() == [{"event": "local_generate", "new_tokens": 3}]


def test_transformers_backend_reports_a_missing_model_directory(tmp_path):
    backend = TransformersVLMBackend(TransformersVLMConfig(str(tmp_path / "missing")))
    with pytest.raises(BackendError, match="not a directory"):
        backend.complete([{"role": "user", "content": "hi"}], {}, "x")


def test_to_hf_messages_needs_a_user_turn():
    with pytest.raises(ValueError, match="user"):
        to_hf_messages([{"role": "system", "content": "s"}], {"type": "object"}, None)
    with pytest.raises(ValueError, match="model_path"):
        TransformersVLMConfig("").validate()


def test_agents_from_specs_share_one_backend():
    from spiral_rt.agents.backends.openai_chat import OpenAIChatBackend
    from spiral_rt.agents.factory import agents_from_specs, backend_from_spec

    planner, critic = agents_from_specs("hf:/models/qwen", "hf:/models/qwen")
    assert planner.backend is critic.backend and isinstance(planner.backend, TransformersVLMBackend)
    b = backend_from_spec("openai:qwen2.5-vl@http://127.0.0.1:8000/v1")
    assert isinstance(b, OpenAIChatBackend) and b.config.model == "qwen2.5-vl" and b.config.base_url == "http://127.0.0.1:8000/v1"
    for bad in ("qwen", "grpc:x", "openai:", "hf:"):
        with pytest.raises(ValueError, match="spec"):
            backend_from_spec(bad)
