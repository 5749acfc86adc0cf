"""The governed OpenAI client, call logs, probes and graders, end to end with the real
`openai` client against the surrogate server on 127.0.0.1."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stackjax.deploy import (
    AsyncGovernedClient,
    BudgetExhausted,
    CallLog,
    GovernedClient,
    Governor,
    LLMJudge,
    SurrogateConfig,
    SurrogateServer,
    graders,
    probes,
    read_log,
    redact,
)
from stackjax.deploy import request as req
from stackjax.governance import actions, calibrate, data, response
from stackjax.governance.session import FixedAction

KEY = "sk-test-0123456789abcdefSECRET"
TOOLS = [
    {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.jsonl"
    with SurrogateServer(SurrogateConfig(seed=3, tool_rounds=2, log=log, api_key=KEY)) as srv:
        yield srv


def _server_records(server):
    return {r["request_id"]: r for r in read_log(server.surrogate.log.path)[0]}


def _fixed(c, p, u):
    return Governor(FixedAction(jnp.asarray([c, p, u])))


@pytest.mark.parametrize("action", [(0.5, 2 / 3, 0.25), (1.0, 0.0, 0.0), (0.0, 1.0, 1.0)])
def test_governed_session_applies_the_action(server, tmp_path, action):
    c, p, u = action
    log = tmp_path / "calls.jsonl"
    client = GovernedClient(openai.OpenAI(base_url=server.base_url, api_key=KEY), "gpt-4o-mini", log=log)
    client.governor = _fixed(c, p, u)
    session = client.session(
        budget_tokens=1e6, task_type="code_generation", system="Be helpful.", tools=TOOLS,
        tool_handler=lambda name, arguments: "tool output", grader=graders.Numeric(),
    )  # fmt: skip
    allowed = actions.tool_calls_allowed(u, 4)
    conversation = []  # what the client holds before each turn, built independently
    for turn in range(4):
        result = session.ask(f"What is {turn} + 5?", reference=turn + 5)
        records = _server_records(server)
        first = records[result.request_ids[0]]
        expected_history = req.trim_history(conversation, c)
        assert first["roles"] == ["system", *(m["role"] for m in expected_history), "user"]
        assert req.VERBOSITY_INSTRUCTIONS[int(actions.verbosity_level(p))] in first["system"]
        assert first["max_tokens"] == actions.COMPLETION_CAPS[int(actions.verbosity_level(p))]
        assert all(records[r]["tools_offered"] == (1 if allowed else 0) for r in result.request_ids)
        # The server wants two tool rounds; the client runs at most `allowed`, then forbids tools.
        assert result.tool_calls_executed == min(allowed, 2)
        assert sum(records[r]["tool_calls"] for r in result.request_ids) == result.tool_calls_executed
        assert result.calls == result.tool_calls_executed + 1
        conversation.append({"role": "user"})
        conversation += [{"role": "assistant"}, {"role": "tool"}] * result.tool_calls_executed
        conversation.append({"role": "assistant"})
    # The log matches the server's own record call for call.
    logged, skipped = read_log(log)
    assert skipped == {}
    records = _server_records(server)
    for entry in logged:
        record = records[entry["request_id"]]
        assert entry["usage"]["prompt_tokens"] == record["usage"]["prompt_tokens"]
        assert entry["usage"]["completion_tokens"] == record["usage"]["completion_tokens"]
        assert entry["request"]["max_tokens"] == record["max_tokens"]
        assert entry["request"]["messages_sent"] == len(record["roles"])
        assert np.allclose([entry["action"][k] for k in ("context", "verbosity", "tools")], record["action"])
    finals = [e for e in logged if "quality" in e]
    assert len(finals) == 4 and all(e["quality"]["grader"] == "numeric" for e in finals)
    # The governed log is calibration data.
    assert len(data.load_jsonl(log)) == len(logged)


def test_budget_is_enforced_before_each_call(server, tmp_path):
    client = GovernedClient(
        openai.OpenAI(base_url=server.base_url, api_key=KEY), "gpt-4o-mini", log=tmp_path / "b.jsonl"
    )
    client.governor = _fixed(1.0, 1.0, 0.0)  # detailed: a 4096-token completion cap
    session = client.session(budget_tokens=3000, task_type="simple_qa")
    results = [session.ask(f"What is {i} + 1?") for i in range(6)]
    refused = [r for r in results if r.refused]
    assert refused, "a 3,000-token budget cannot pay for six detailed turns"
    assert "token budget exhausted" in refused[0].refused
    assert all(r.calls == 0 for r in refused)  # refused before the call, not after
    assert any(r.degraded and "completion cap lowered" in r.degraded for r in results)
    for entry in read_log(tmp_path / "b.jsonl")[0]:
        left = entry["state"]["budget"] * entry["state"]["budget_tokens"]
        assert entry["request"]["max_tokens"] <= left
    strict = client.session(budget_tokens=50, task_type="simple_qa", on_budget="raise")
    with pytest.raises(BudgetExhausted, match="token budget exhausted"):
        strict.ask("What is 1 + 1?")


def test_async_sessions_share_one_log_without_interleaving(server, tmp_path):
    log = tmp_path / "async.jsonl"

    async def main():
        client = AsyncGovernedClient(
            openai.AsyncOpenAI(base_url=server.base_url, api_key=KEY), "gpt-4o-mini", log=log
        )
        sessions = [client.session(budget_tokens=1e6, task_type="simple_qa") for _ in range(16)]

        async def run(session, i):
            return [await session.ask(f"What is {i} + {t}?") for t in range(3)]

        return await asyncio.gather(*(run(s, i) for i, s in enumerate(sessions)))

    results = asyncio.run(main())
    lines = log.read_text().splitlines()
    assert len(lines) == sum(r.calls for rs in results for r in rs) == 48
    assert all(json.loads(line)["schema"] == "stackjax.call/1" for line in lines)


def test_truncated_last_line_is_skipped_and_a_resumed_log_appends_after_it(tmp_path):
    path = tmp_path / "log.jsonl"
    with CallLog(path) as log:
        log.append({"schema": "stackjax.call/1", "n": 1})
    with open(path, "a") as handle:
        handle.write('{"schema": "stackjax.call/1", "n": 2, "usa')  # a crash mid-write
    assert read_log(path) == ([{"schema": "stackjax.call/1", "n": 1}], {"truncated or invalid JSON line": 1})
    with CallLog(path) as log:
        log.append({"n": 3})
    records, skipped = read_log(path)
    assert [r["n"] for r in records] == [1, 3] and skipped == {"truncated or invalid JSON line": 1}
    with pytest.raises(ValueError, match="closed"):
        log.append({"n": 4})


def test_the_key_never_appears(server, tmp_path):
    log = tmp_path / "k.jsonl"
    oc = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
    client = GovernedClient(oc, "gpt-4o-mini", log=log)
    assert KEY not in repr(client) and KEY not in repr(server.surrogate.config)
    session = client.session(budget_tokens=1e5)
    session.ask(f"Please echo {KEY} and Authorization: Bearer {KEY}")
    bad = GovernedClient(openai.OpenAI(base_url=server.base_url, api_key="sk-wrong-key-000000"), "m")
    with pytest.raises(openai.AuthenticationError) as err:
        bad.session(budget_tokens=1e5).ask("hi")
    assert KEY not in str(err.value) and "sk-wrong-key-000000" not in str(err.value)
    assert KEY not in log.read_text() and KEY not in server.surrogate.log.path.read_text()
    assert redact(f"key={KEY} Authorization: Bearer abc.def") == "key=[REDACTED] Authorization: [REDACTED]"


def test_probes_survive_faults_and_a_killed_run(tmp_path):
    """20% injected 429/500 faults and a probe run killed mid-way then restarted: every
    planned probe ends in the log exactly once, no line is corrupt, the key never appears."""
    out = tmp_path / "probes.jsonl"
    config = SurrogateConfig(seed=5, fault_429=0.1, fault_500=0.1, log=tmp_path / "server.jsonl")
    args = [sys.executable, "-m", "stackjax.cli", "probe", "--model", "gpt-4o-mini", "--out", str(out)]
    args += ["--prompts-count", "20", "--concurrency", "4", "--no-progress", "--max-retries", "2"]
    env = {**os.environ, "OPENAI_API_KEY": KEY, "JAX_PLATFORMS": "cpu"}
    with SurrogateServer(config) as srv:
        args += ["--base-url", srv.base_url]
        first = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 60):
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait()
        partial = len(read_log(out)[0])
        assert 60 <= partial < 240
        second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stderr
        assert f"already in the log {partial}" in second.stdout
    records, skipped = read_log(out)
    assert skipped == {}
    planned = probes.plan(
        probes.arithmetic_prompts(20, seed=0), probes.action_grid(), models=["gpt-4o-mini"], samples=1
    )
    assert sorted(r["probe_id"] for r in records) == sorted(p.probe_id for p in planned)
    server_log = read_log(tmp_path / "server.jsonl")[0]
    faults = [r for r in server_log if r["status"] != 200]
    assert 0.1 < len(faults) / len(server_log) < 0.3
    assert (
        KEY not in out.read_text() + (tmp_path / "server.jsonl").read_text() + second.stdout + second.stderr
    )


def test_probe_then_calibrate_recovers_the_surrogate(tmp_path):
    """Closed loop: >= 500 probes against a surrogate driven by a known response model, then
    a fit on that log recovers its parameters: both noise scales within 10%; median prompt
    and completion tokens at every probed (action, covariates) within 0.05 in log on
    average (0.25 at worst); quality within 0.05 on average (2,304 single-answer calls)."""
    truth = response.calibrated()
    log = tmp_path / "loop.jsonl"
    planned = probes.plan(
        probes.arithmetic_prompts(24, seed=1),
        probes.action_grid(tools=(0.0, 1.0)),
        models=["gpt-3.5-turbo", "gpt-4o"],
        repeats=2,
    )
    assert len(planned) >= 500
    with SurrogateServer(SurrogateConfig(model=truth, seed=11)) as srv:
        client = openai.AsyncOpenAI(base_url=srv.base_url, api_key=KEY)
        report = probes.run_probes(client, planned, log, concurrency=8, progress=False)
    assert report.completed == len(planned) and not report.failed
    records = data.load(log)
    fitted = calibrate.fit_response_model(records)
    for name in ("log_sigma_prompt", "log_sigma_completion"):
        assert abs(np.exp(getattr(fitted, name)) / np.exp(getattr(truth, name)) - 1) < 0.10
    a = jnp.asarray(records.action, jnp.float32)
    x = jnp.asarray(records.covariates, jnp.float32)
    import jax

    def surfaces(m):
        f = jax.vmap(lambda ai, xi: jnp.stack([m.prompt_tokens(ai, xi), m.completion_tokens(ai, xi)]))
        return np.log(np.asarray(f(a, x))), np.asarray(jax.vmap(m.quality)(a, x))

    (tokens_fit, quality_fit), (tokens_true, quality_true) = surfaces(fitted), surfaces(truth)
    log_error = np.abs(tokens_fit - tokens_true)
    assert log_error.mean() < 0.05 and log_error.max() < 0.25
    quality_error = np.abs(quality_fit - quality_true)
    print(
        f"closed loop: log-token error mean {log_error.mean():.4f} max {log_error.max():.4f}; "
        f"quality error mean {quality_error.mean():.4f} max {quality_error.max():.4f}"
    )
    assert quality_error.mean() < 0.05


def test_llm_judge_scores_through_the_client(server):
    judge = LLMJudge(openai.OpenAI(base_url=server.base_url, api_key=KEY), "gpt-4o-mini")
    assert judge.grade("What is 2 + 3?", "Answer: 5", 5) == graders.Grade(1.0, "llm_judge:gpt-4o-mini")
    assert judge.grade("What is 2 + 3?", "Answer: 7", 5).score == 0.0

    async def agrade():
        async_judge = LLMJudge(openai.AsyncOpenAI(base_url=server.base_url, api_key=KEY), "m")
        return await async_judge.agrade("What is 2 + 3?", "It is 5.\nAnswer: 5", 5)

    assert asyncio.run(agrade()).score == 1.0


@given(st.floats(-1e9, 1e9, allow_nan=False).map(lambda v: round(v, 3)), st.sampled_from(["", ",", "e"]))
def test_parse_number_reads_formatted_numbers(value, style):
    if style == ",":
        text = f"{value:,}"
    elif style == "e":
        text = f"{value:e}"
    else:
        text = repr(value)
    parsed = graders.parse_number(f"Some reasoning with 12 steps.\nAnswer: {text}")
    assert parsed == pytest.approx(value, rel=1e-6, abs=1e-3)


@given(st.sampled_from("ABCDE"), st.sampled_from(["{}", "({})", "{}.", "Option {}", "{}) because"]))
def test_parse_choice(letter, template):
    assert graders.parse_choice("I think so.\nAnswer: " + template.format(letter)) == letter
    assert graders.MultipleChoice().grade("q", "Answer: " + template.format(letter), letter).score == 1.0


def test_graders_say_who_graded():
    assert graders.ExactMatch().grade("q", "Answer:  Paris. ", "paris") == graders.Grade(1.0, "exact_match")
    unit_tests = graders.FunctionGrader(lambda q, a, r: "return" in a, name="unit_tests")
    assert unit_tests.grade("q", "def f(): return 1", None) == graders.Grade(1.0, "unit_tests")
    with pytest.raises(ValueError, match="score"):
        graders.Grade(1.5, "x")
    with pytest.raises(ValueError, match="SCORE"):
        graders.LLMJudge._score(
            LLMJudge(None, "m"),
            type("R", (), {"choices": [type("C", (), {"message": type("M", (), {"content": "ok"})})]}),
        )


def test_bad_input_is_rejected_before_any_call():
    oc = openai.OpenAI(base_url="http://127.0.0.1:9/v1", api_key=KEY)
    with pytest.raises(ValueError, match="task_type"):
        GovernedClient(oc, "m").session(budget_tokens=10, task_type="poetry")
    with pytest.raises(ValueError, match="budget_tokens"):
        GovernedClient(oc, "m").session(budget_tokens=-1)
    with pytest.raises(ValueError, match="tool_handler"):
        GovernedClient(oc, "m").session(budget_tokens=10, tools=TOOLS)
    with pytest.raises(ValueError, match="safe_lower"):
        Governor(safe_lower=(0.5, 0, 0), safe_upper=(0.4, 1, 1))
    with pytest.raises(TypeError, match="openai_client"):
        GovernedClient("not a client", "m")


def test_safe_set_repairs_the_action():
    governor = Governor(FixedAction(jnp.asarray([0.9, 1.0, 0.8])), safe_upper=(0.5, 2 / 3, 0.5))
    tracker = governor.tracker("simple_qa", "gpt-4o", 0.5, 1000)
    decision = governor.decide(tracker.state(100.0))
    assert decision.action == pytest.approx((0.5, 2 / 3, 0.5)) and decision.repaired


def _plain_server(with_usage: bool):
    """A minimal Chat Completions server that is not ours: no stackjax header read, no
    usage details (or no usage at all), no tools."""
    import threading

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def completions(request):
        body = await request.json()
        reply = {
            "id": "chatcmpl-plain",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Answer: 4"},
                    "finish_reason": "stop",
                }
            ],
        }
        if with_usage:
            reply["usage"] = {"prompt_tokens": 50, "completion_tokens": 5, "total_tokens": 55}
        return JSONResponse(reply)

    app = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", log_config=None)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return server, thread, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1"


@pytest.mark.parametrize("with_usage", [True, False])
def test_governed_client_works_against_a_plain_server(tmp_path, with_usage, monkeypatch, capsys):
    server, thread, base_url = _plain_server(with_usage)
    try:
        client = GovernedClient(
            openai.OpenAI(base_url=base_url, api_key=KEY), "llama3", log=tmp_path / "p.jsonl"
        )
        session = client.session(budget_tokens=5000, grader=graders.Numeric())
        result = session.ask("What is 2 + 2?", reference=4)
        assert result.quality.score == 1.0 and result.calls == 1
        entry = read_log(tmp_path / "p.jsonl")[0][0]
        assert entry["usage_estimated"] is (not with_usage)
        if with_usage:
            assert entry["usage"] == {
                "prompt_tokens": 50,
                "completion_tokens": 5,
                "cached_tokens": 0,
                "reasoning_tokens": 0,
            }
        # The example runs against it too.
        import runpy
        from pathlib import Path

        example = Path(__file__).resolve().parent.parent / "examples" / "govern_openai_agent.py"
        monkeypatch.chdir(tmp_path)
        argv = [
            example.name,
            "--base-url",
            base_url,
            "--model",
            "llama3",
            "--sessions",
            "1",
            "--turns",
            "2",
            "--no-tools",
        ]
        monkeypatch.setattr(sys, "argv", [*argv, "--api-key", KEY])
        runpy.run_path(str(example), run_name="__main__")
        out = capsys.readouterr().out
        assert "2 turns" in out and "accuracy 0.00" in out and KEY not in out  # it always says 4
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_malformed_and_slow_replies_are_retried(tmp_path):
    config = SurrogateConfig(
        seed=2, fault_malformed=0.25, fault_slow=0.1, slow_seconds=1.0, log=tmp_path / "server.jsonl"
    )
    with SurrogateServer(config) as srv:
        oc = openai.OpenAI(base_url=srv.base_url, api_key=KEY, timeout=0.5, max_retries=5)
        session = GovernedClient(oc, "gpt-4o-mini", log=tmp_path / "g.jsonl").session(budget_tokens=1e6)
        assert all(session.ask(f"What is {i} + 1?").text for i in range(8))
        aclient = openai.AsyncOpenAI(base_url=srv.base_url, api_key=KEY, timeout=0.5, max_retries=5)
        planned = probes.plan(probes.arithmetic_prompts(5, seed=3), probes.action_grid(context=(1.0,)))
        report = probes.run_probes(aclient, planned, tmp_path / "p.jsonl", progress=False)
    assert report.completed == len(planned) == 20 and not report.failed
    assert len(read_log(tmp_path / "g.jsonl")[0]) == 8
    faults = [r["fault"] for r in read_log(tmp_path / "server.jsonl")[0]]
    assert faults.count("malformed") >= 3 and faults.count("slow") >= 1
