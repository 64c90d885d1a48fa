"""The OpenAI-compatible backend and the chat agents against a local canned server."""

import base64
import json
import io
import socket

import numpy as np
import pytest

pytest.importorskip("openai")
from PIL import Image  # noqa: E402

from spiral_rt.agents import trace as tr  # noqa: E402
from spiral_rt.agents.backends import BackendError  # noqa: E402
from spiral_rt.agents.backends.openai_chat import OpenAIChatBackend, OpenAIChatConfig  # noqa: E402
from spiral_rt.agents.llm import AgentOutputError, ChatCriticAgent, ChatPlanAgent  # noqa: E402
from spiral_rt.agents.loop import ClosedLoop, LoopConfig  # noqa: E402
from spiral_rt.agents.testing import FakeGenerator  # noqa: E402
from spiral_rt.agents.types import FailureKind, Goal, Step, Verdict, WorldMemory  # noqa: E402

from .chat_server import CannedChatServer  # noqa: E402

PLAN = {"rationale": "two moves", "steps": [
    {"prompt": "the red square slides to the left", "span_chunks": 2, "success_criteria": ["square at the left edge"]},
    {"prompt": "the red square turns green", "span_chunks": 1, "success_criteria": ["square is green"]}]}
ACCEPT = {"score": 0.9, "completed": True, "failure": None, "feedback": "done", "refined_prompt": None, "plan_is_wrong": False}
REJECT = {"score": 0.2, "completed": False, "failure": "incomplete_action", "feedback": "it stops halfway",
          "refined_prompt": "the red square slides all the way to the left edge", "plan_is_wrong": False}


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("SPIRAL_TEST_KEY", "sk-test")


def backend(server, **kw):
    cfg = dict(model="test-vlm", base_url=server.base_url if server else "http://127.0.0.1:9/v1", api_key_env="SPIRAL_TEST_KEY",
               timeout_s=5.0, max_retries=2, backoff_s=0.01, backoff_max_s=0.05)
    cfg.update(kw)
    return OpenAIChatBackend(OpenAIChatConfig(**cfg))


def test_planner_request_is_schema_constrained_and_parsed():
    with CannedChatServer([PLAN]) as server:
        plan = ChatPlanAgent(backend(server)).plan(Goal("move the square left, then make it green"), WorldMemory())
    assert [s.prompt for s in plan.steps] == [s["prompt"] for s in PLAN["steps"]]
    assert [s.span_chunks for s in plan.steps] == [2, 1] and plan.steps[0].success_criteria == ["square at the left edge"]
    (body,) = server.requests
    assert server.paths == ["/v1/chat/completions"] and body["model"] == "test-vlm" and body["temperature"] == 0.0
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "plan" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["schema"]["properties"]["steps"]["items"]["required"] == ["prompt", "span_chunks", "success_criteria"]
    assert body["messages"][0]["role"] == "system" and "move the square left" in body["messages"][1]["content"]


def test_critic_sends_sampled_frames_as_png_images():
    frames = np.stack([np.full((30, 40, 3), 10 * k, np.uint8) for k in range(10)])
    memory = WorldMemory()
    memory.record(Step("before", 1), Verdict(1.0, True), np.full((30, 40, 3), 200, np.uint8))
    with CannedChatServer([REJECT]) as server:
        verdict = ChatCriticAgent(backend(server), num_frames=4).judge(frames, Step("slide left", 2, ["at the left"]), memory)
    assert not verdict.completed and verdict.failure is FailureKind.INCOMPLETE_ACTION
    assert verdict.refined_prompt == REJECT["refined_prompt"]
    parts = server.requests[0]["messages"][1]["content"]
    urls = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
    assert len(urls) == 5  # the reference key frame + 4 sampled frames
    images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1])))) for u in urls]
    assert all(u.startswith("data:image/png;base64,") for u in urls)
    assert [int(im[0, 0, 0]) for im in images] == [200, 0, 30, 60, 90]  # frames 0, 3, 6, 9 after the reference
    assert images[1].shape == (30, 40, 3)
    text = " ".join(p["text"] for p in parts if p["type"] == "text")
    assert "slide left" in text and "at the left" in text and "before" in text


def test_large_frames_are_downscaled():
    frames = np.zeros((2, 600, 1000, 3), np.uint8)
    with CannedChatServer([ACCEPT]) as server:
        ChatCriticAgent(backend(server, image_max_side=100), num_frames=1).judge(frames, Step("x", 1), WorldMemory())
    url = next(p["image_url"]["url"] for p in server.requests[0]["messages"][1]["content"] if p["type"] == "image_url")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (100, 60)


def test_garbage_then_repair():
    with CannedChatServer(["Sure! Here is my verdict: it looks great", "```json\n" + json.dumps(ACCEPT) + "\n```"]) as server:
        critic = ChatCriticAgent(backend(server), num_frames=1)
        verdict = critic.judge(np.zeros((2, 8, 8, 3), np.uint8), Step("x", 1), WorldMemory())
    assert verdict.completed and verdict.score == 0.9
    assert len(server.requests) == 2
    repair_turns = server.requests[1]["messages"][-2:]
    assert repair_turns[0] == {"role": "assistant", "content": "Sure! Here is my verdict: it looks great"}
    assert "could not be used" in repair_turns[1]["content"] and "plan_is_wrong" in repair_turns[1]["content"]
    events = [e["event"] for e in critic.drain_events()]
    assert "repair" in events and "repaired" in events and critic.drain_events() == []


def test_garbage_twice_raises_agent_output_error():
    with CannedChatServer(["nope", {"score": 3, "completed": True}]) as server:
        with pytest.raises(AgentOutputError, match="after one repair"):
            ChatCriticAgent(backend(server), num_frames=1).judge(np.zeros((1, 8, 8, 3), np.uint8), Step("x", 1), WorldMemory())
    assert len(server.requests) == 2


def test_retries_server_errors_with_backoff():
    with CannedChatServer([503, 500, PLAN]) as server:
        b = backend(server, max_retries=2)
        plan = ChatPlanAgent(b).plan(Goal("g"), WorldMemory())
    assert len(plan.steps) == 2 and len(server.requests) == 3
    assert [e["event"] for e in b.drain_events()] == ["retry", "retry", "request"]


def test_gives_up_after_max_retries():
    with CannedChatServer([503] * 10, max_requests=10) as server:
        with pytest.raises(BackendError, match="after 3 request"):
            ChatPlanAgent(backend(server, max_retries=2)).plan(Goal("g"), WorldMemory())
    assert len(server.requests) == 3


def test_client_errors_are_not_retried():
    with CannedChatServer([401, PLAN]) as server:
        with pytest.raises(BackendError):
            ChatPlanAgent(backend(server)).plan(Goal("g"), WorldMemory())
    assert len(server.requests) == 1


def test_schema_rejection_downgrades_to_json_object():
    rejection = ("status", 400, "response_format json_schema is not supported by this server")
    with CannedChatServer([rejection, PLAN, PLAN]) as server:
        b = backend(server)
        planner = ChatPlanAgent(b)
        planner.plan(Goal("g"), WorldMemory())
        planner.plan(Goal("g"), WorldMemory())  # the downgrade sticks
    assert [r.get("response_format", {}).get("type") for r in server.requests] == ["json_schema", "json_object", "json_object"]
    assert "schema_downgrade" in [e["event"] for e in planner.drain_events()]
    # the prompt still carries the structure the schema asked for
    assert "span_chunks" in server.requests[1]["messages"][0]["content"]


def test_other_bad_requests_are_raised_at_once():
    with CannedChatServer([("status", 400, "max_tokens is too large"), PLAN]) as server:
        with pytest.raises(BackendError, match="rejected the request"):
            ChatPlanAgent(backend(server)).plan(Goal("g"), WorldMemory())
    assert len(server.requests) == 1


def test_timeout_is_retried_then_fails():
    with CannedChatServer([("sleep", 1.0, PLAN), ("sleep", 1.0, PLAN)]) as server:
        with pytest.raises(BackendError, match="Timeout"):
            ChatPlanAgent(backend(server, timeout_s=0.2, max_retries=1)).plan(Goal("g"), WorldMemory())
    assert len(server.requests) == 2


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_endpoint_down_raises_backend_error():
    b = backend(None, base_url=f"http://127.0.0.1:{_closed_port()}/v1", max_retries=1)
    with pytest.raises(BackendError, match="Connection"):
        ChatPlanAgent(b).plan(Goal("g"), WorldMemory())


def test_closed_loop_over_the_endpoint_with_fallbacks():
    """Planner and critic on the canned server: a rejection, a repair, and a critic outage that falls back."""
    script = [PLAN,                                 # plan
              REJECT,                               # step 0 attempt 1: rejected
              "garbage", ACCEPT,                    # step 0 attempt 2: repaired, accepted
              503, 503, 503]                        # step 1: endpoint fails every retry -> accept with warning
    with CannedChatServer(script, max_requests=len(script)) as server:
        b = backend(server, max_retries=2)
        loop = ClosedLoop(FakeGenerator(), ChatPlanAgent(b), ChatCriticAgent(b, num_frames=2), LoopConfig(max_retries=2))
        result = loop.run(Goal("move the square left, then make it green"))
    t = result.trace
    assert len(server.requests) == len(script)
    assert [(a.step_index, a.attempt, a.decision) for a in t.attempts] == [
        (0, 1, tr.RETRY), (1, 1, tr.DROPPED), (0, 2, tr.ACCEPTED), (1, 1, tr.ACCEPTED)]
    assert t.attempts[2].prompt == REJECT["refined_prompt"]
    assert t.attempts[3].critic_fallback and [f.reason for f in t.fallbacks] == ["error"]
    events = [e["event"] for e in t.agent_events]
    assert "repair" in events and "repaired" in events and events.count("retry") == 2
    assert result.video.shape[0] == 3 * 4
