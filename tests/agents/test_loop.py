"""The closed loop on CPU with the fake generator and scripted agents: every branch and every fallback."""

import threading
import time

import numpy as np
import pytest

from spiral_rt.agents import trace as tr
from spiral_rt.agents.loop import ClosedLoop, LoopConfig
from spiral_rt.agents.testing import FakeGenerator, ScriptedCritic, ScriptedPlanner, accept, reject
from spiral_rt.agents.types import FailureKind, Goal, Plan, Step, Verdict

STEPS = [Step("a circle moves left", 2, ["circle at the left"]), Step("the circle turns blue", 1),
         Step("the circle grows", 2)]


def run(critic=None, planner=None, config=None, generator=None, **kw):
    gen = generator or FakeGenerator()
    planner = planner or ScriptedPlanner([list(STEPS)])
    critic = critic or ScriptedCritic()
    result = ClosedLoop(gen, planner, critic, config or LoopConfig()).run(Goal("circle left, blue, big"), **kw)
    return gen, planner, critic, result


def decisions(result):
    return [(a.step_index, a.attempt, a.decision) for a in result.trace.attempts]


def test_all_accepted_commits_every_speculation_and_keeps_the_whole_video():
    gen, _, critic, result = run()
    t = result.trace
    assert t.completed and t.error is None and not t.fallbacks
    assert decisions(result) == [(0, 1, tr.ACCEPTED), (1, 1, tr.ACCEPTED), (2, 1, tr.ACCEPTED)]
    assert [a.speculative for a in t.attempts] == [False, True, True]
    assert gen.counts["speculations"] == gen.counts["commits"] == 2 and gen.counts["drops"] == 0
    assert gen.counts["rollbacks"] == 0 and gen.live_snapshots == 0
    # the returned video is exactly the generator's state: nothing lost, nothing extra
    assert result.video.shape == (5 * gen.frames_per_chunk, gen.height, gen.width, 3)
    np.testing.assert_array_equal(result.video, gen.video())
    assert [c[1] for c in critic.calls] == [0, 1, 2]
    assert [e.step.prompt for e in result.memory.executed] == [s.prompt for s in STEPS]
    assert len(result.memory.key_frames) == 3
    np.testing.assert_array_equal(result.memory.key_frames[-1], result.video[-1])
    assert [a.video_start_frame for a in t.attempts] == [0, 8, 12]
    assert all(a.critic_latency_s is not None for a in t.attempts)


def test_critic_sees_memory_of_accepted_steps_only():
    _, _, critic, _ = run()
    assert [len(m.executed) for m in critic.memories] == [0, 1, 2]


def test_rejection_rolls_back_and_regenerates_with_refined_prompt_and_new_seed():
    critic = ScriptedCritic({"the circle turns blue": [reject("it stays red", FailureKind.WRONG_ACTION),
                                                       reject("still red", refined_prompt="the red circle changes colour to blue")]})
    gen, _, _, result = run(critic=critic)
    t = result.trace
    assert decisions(result) == [(0, 1, tr.ACCEPTED), (1, 1, tr.RETRY), (2, 1, tr.DROPPED), (1, 2, tr.RETRY),
                                 (2, 1, tr.DROPPED), (1, 3, tr.ACCEPTED), (2, 1, tr.ACCEPTED)]
    step1 = [a for a in t.attempts if a.step_index == 1]
    assert step1[0].prompt == "the circle turns blue"
    assert step1[1].prompt == "the circle turns blue. it stays red"  # feedback appended
    assert step1[2].prompt == "the red circle changes colour to blue"  # refined prompt wins
    assert len({a.seed for a in step1}) == 3
    assert gen.counts["rollbacks"] == t.counters["rollbacks"] == 2 and t.counters["retries"] == 2
    assert gen.counts["drops"] == t.counters["speculations_dropped"] == 2 and gen.counts["dropped_chunks"] == 4
    assert gen.live_snapshots == 0
    np.testing.assert_array_equal(result.video, gen.video())
    assert result.video.shape[0] == 5 * gen.frames_per_chunk
    assert result.memory.executed[1].attempts == 3 and result.memory.executed[1].prompt_used == step1[2].prompt
    # the kept segment of step 1 is the third attempt's: seeded by it, not the first
    kept = gen.render_chunk(step1[2].prompt, step1[2].seed, 2)
    np.testing.assert_array_equal(result.video[8:12], kept)


def test_exhausted_retries_trigger_a_replan_from_memory():
    new_steps = [Step("a blue circle appears", 1), Step("it grows", 1), Step("it stops", 1)]
    planner = ScriptedPlanner([list(STEPS)], [new_steps])
    critic = ScriptedCritic({"the circle turns blue": [reject("no", score=0.1)] * 2})
    gen, planner, _, result = run(critic=critic, planner=planner, config=LoopConfig(max_retries=1))
    t = result.trace
    assert [d for d in decisions(result) if d[2] != tr.DROPPED] == [
        (0, 1, tr.ACCEPTED), (1, 1, tr.RETRY), (1, 2, tr.REPLAN), (3, 1, tr.ACCEPTED), (4, 1, tr.ACCEPTED), (5, 1, tr.ACCEPTED)]
    assert len(t.replans) == 1 and t.replans[0].reason == "retries_exhausted" and not t.replans[0].fallback
    assert [s.prompt for s in t.replans[0].old_steps] == ["the circle turns blue", "the circle grows"]
    assert [s.index for s in t.replans[0].new_steps] == [3, 4, 5]
    kind, _, memory, remaining = planner.calls[1]
    assert kind == "replan" and len(memory.executed) == 1 and remaining[0].prompt == "the circle turns blue"
    assert "Last rejection" in memory.summary and "no" in memory.summary
    assert [s.prompt for s in t.executed_steps] == ["a circle moves left"] + [s.prompt for s in new_steps]
    assert gen.live_snapshots == 0
    np.testing.assert_array_equal(result.video, gen.video())
    assert result.video.shape[0] == 5 * gen.frames_per_chunk


def test_plan_is_wrong_replans_without_retrying():
    planner = ScriptedPlanner([list(STEPS)], [[Step("make a circle", 1)]])
    critic = ScriptedCritic({"the circle turns blue": [reject("there is no circle", plan_is_wrong=True)]})
    _, _, _, result = run(critic=critic, planner=planner)
    assert [d for d in decisions(result) if d[2] != tr.DROPPED] == [(0, 1, tr.ACCEPTED), (1, 1, tr.REPLAN), (3, 1, tr.ACCEPTED)]
    assert result.trace.replans[0].reason == "plan_is_wrong" and result.trace.counters["retries"] == 0


def test_no_replans_left_keeps_the_last_attempt():
    critic = ScriptedCritic({"the circle turns blue": [reject()] * 10})
    gen, _, _, result = run(critic=critic, config=LoopConfig(max_retries=1, max_replans=0))
    assert decisions(result) == [(0, 1, tr.ACCEPTED), (1, 1, tr.RETRY), (2, 1, tr.DROPPED), (1, 2, tr.KEPT),
                                 (2, 1, tr.ACCEPTED)]
    assert gen.counts["drops"] == 1 and gen.counts["commits"] == 2  # the kept segment's speculation is committed
    assert result.trace.completed and len(result.trace.executed_steps) == 3
    assert any("kept the last attempt" in w for w in result.trace.warnings)
    assert not result.memory.executed[1].verdict.completed
    np.testing.assert_array_equal(result.video, gen.video())


def test_replans_are_bounded():
    critic = ScriptedCritic(default=reject("never good"))
    planner = ScriptedPlanner([list(STEPS)])  # replan returns the remaining steps unchanged
    gen, _, _, result = run(critic=critic, planner=planner, config=LoopConfig(max_retries=1, max_replans=2))
    t = result.trace
    assert t.counters["replans"] == 2 and t.completed
    assert sum(a.decision == tr.KEPT for a in t.attempts) == 3
    assert gen.live_snapshots == 0


def test_without_speculation_nothing_is_dropped_and_the_video_is_the_same():
    critic = ScriptedCritic({"the circle turns blue": [reject()]})
    gen_a, _, _, spec = run(critic=critic)
    gen_b, _, _, plain = run(critic=ScriptedCritic({"the circle turns blue": [reject()]}), config=LoopConfig(speculate=False))
    assert gen_b.counts["speculations"] == 0 and gen_b.counts["chunks_generated"] == 6
    assert gen_a.counts["chunks_generated"] == 8  # one dropped speculative segment of 2 chunks
    np.testing.assert_array_equal(spec.video, plain.video)  # same seeds: speculation changes timing only


def test_critic_runs_on_a_worker_while_the_next_segment_is_generated():
    seen = set()

    def slow_accept(frames, step, memory):
        seen.add(threading.get_ident())
        time.sleep(0.2)
        return accept()

    # Margins are tenths of a second so a loaded 2-core CI machine cannot flip the result.
    gen = FakeGenerator(chunk_time_s=0.1)  # 4 chunks = 400 ms per segment, twice the critic's 200 ms
    steps = [Step(f"step {k}", 4) for k in range(4)]
    t0 = time.perf_counter()
    _, _, _, result = run(critic=ScriptedCritic(default=slow_accept), planner=ScriptedPlanner([steps]), generator=gen)
    wall = time.perf_counter() - t0
    assert threading.get_ident() not in seen and gen.thread_ids == {threading.get_ident()}
    # back to back would be generation + 4 judgements; overlapped, only the last judgement shows.
    # Compare with the generation time actually measured (a loaded machine slows the fake generator).
    serial = result.trace.timings["generate_s"] + 4 * 0.2
    assert wall < serial - 0.3, (wall, result.trace.timings)
    waits = [a.critic_wait_s for a in result.trace.attempts]
    assert max(waits[:-1]) < 0.1 and waits[-1] > 0.1  # hidden, except behind the last segment


def test_first_plan_overlaps_with_warmup():
    planner = ScriptedPlanner([list(STEPS)], delay_s=0.3)
    warm = []
    t0 = time.perf_counter()
    _, _, _, result = run(planner=planner, warmup=lambda: (time.sleep(0.3), warm.append(True)))
    assert warm == [True]
    timings = result.trace.timings
    assert timings["warmup_s"] >= 0.29 and timings["first_plan_s"] < 0.5
    assert timings["plan_wait_s"] < 0.1
    assert time.perf_counter() - t0 < 0.9


@pytest.mark.parametrize("failure, reason", [
    (ConnectionError("endpoint down"), "error"),
    ("garbage", "invalid_output"),
    (lambda g, m, r: time.sleep(0.5), "timeout"),
])
def test_planner_failure_falls_back_to_a_one_step_plan(failure, reason):
    planner = ScriptedPlanner([failure])
    gen, _, _, result = run(planner=planner, config=LoopConfig(planner_timeout_s=0.1, fallback_span_chunks=2))
    t = result.trace
    assert t.completed and [s.prompt for s in t.executed_steps] == ["circle left, blue, big"]
    assert t.initial_plan.steps[0].span_chunks == 2 and "fallback" in t.initial_plan.rationale
    assert len(t.fallbacks) == 1 and t.fallbacks[0].agent == "planner" and t.fallbacks[0].reason == reason
    assert "one-step plan" in t.fallbacks[0].action and t.warnings
    assert result.video.shape[0] == 2 * gen.frames_per_chunk


def test_replan_failure_keeps_the_remaining_steps():
    planner = ScriptedPlanner([list(STEPS)], [RuntimeError("503 from the planner")])
    critic = ScriptedCritic({"the circle turns blue": [reject(plan_is_wrong=True)]})
    _, _, _, result = run(critic=critic, planner=planner)
    t = result.trace
    assert t.replans[0].fallback and [s.prompt for s in t.replans[0].new_steps] == ["the circle turns blue", "the circle grows"]
    assert t.fallbacks[0].call == "replan" and t.fallbacks[0].step_index == 1
    assert [s.prompt for s in t.executed_steps] == [s.prompt for s in STEPS]


@pytest.mark.parametrize("answer, reason", [
    (ConnectionRefusedError("endpoint down"), "error"),
    (TimeoutError("read timed out"), "timeout"),  # the critic's own request timed out
    (lambda f, s, m: "not a verdict", "invalid_output"),
    (0.6, "timeout"),  # sleeps 0.6 s, the loop waits 0.1 s
])
def test_critic_failure_accepts_with_a_warning(answer, reason):
    critic = ScriptedCritic({"the circle turns blue": [answer]})
    gen, _, _, result = run(critic=critic, config=LoopConfig(critic_timeout_s=0.1, fallback_score=0.5))
    t = result.trace
    assert t.completed and len(t.executed_steps) == 3
    (fb,) = t.fallbacks
    assert (fb.agent, fb.call, fb.reason, fb.step_index, fb.attempt) == ("critic", "judge", reason, 1, 1)
    a = t.attempts[1]
    assert a.critic_fallback and a.decision == tr.ACCEPTED and a.verdict.score == 0.5
    assert "critic unavailable" in a.verdict.feedback
    np.testing.assert_array_equal(result.video, gen.video())


def test_generator_failure_stops_but_keeps_accepted_segments():
    class Failing(FakeGenerator):
        def generate(self, prompt, span_chunks, seed):
            if prompt == "the circle grows":
                raise RuntimeError("CUDA error: device lost")
            return super().generate(prompt, span_chunks, seed)

    gen = Failing()
    _, _, _, result = run(generator=gen)
    t = result.trace
    assert not t.completed and "device lost" in t.error
    assert result.video.shape[0] == 2 * gen.frames_per_chunk  # step 0 only: step 1 was still unjudged
    assert t.attempts[-1].decision == tr.ABORTED
    assert all(a.decision for a in t.attempts)


def test_spans_are_clamped_and_steps_renumbered():
    planner = ScriptedPlanner([Plan(Goal("g"), [Step("long", 9, index=7), Step("short", 1, index=7)])])
    _, _, _, result = run(planner=planner, config=LoopConfig(max_span_chunks=4))
    assert [(s.index, s.span_chunks) for s in result.trace.initial_plan.steps] == [(0, 4), (1, 1)]
    assert any("clamped" in w for w in result.trace.warnings)


def test_accept_score_threshold_rejects_low_scores():
    critic = ScriptedCritic({"a circle moves left": [Verdict(0.3, True)]})
    _, _, _, result = run(critic=critic, config=LoopConfig(accept_score=0.5))
    assert result.trace.attempts[0].decision == tr.RETRY


@pytest.mark.parametrize("field, value", [("max_retries", -1), ("accept_score", 2.0), ("critic_timeout_s", 0),
                                          ("refine_template", "{prompt}"), ("agent_workers", 0)])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ClosedLoop(FakeGenerator(), ScriptedPlanner(), ScriptedCritic(), LoopConfig(**{field: value}))


def test_missing_protocol_methods_are_reported():
    with pytest.raises(ValueError, match="'generator'.*rollback"):
        ClosedLoop(type("G", (), {"generate": lambda *a: None})(), ScriptedPlanner(), ScriptedCritic())
