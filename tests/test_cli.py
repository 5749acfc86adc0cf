import subprocess
import sys
from pathlib import Path

import pytest

import stackjax
from stackjax.cli import main


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"stackjax {stackjax.__version__}"


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "stackjax"
    out = subprocess.run([str(script), "info"], capture_output=True, text=True, check=True).stdout
    assert f"stackjax {stackjax.__version__}" in out and "jax" in out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: stackjax" in capsys.readouterr().out


def test_serve_runs_a_simulated_openai_api(tmp_path):
    import socket
    import time

    import openai

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "server.jsonl"
    script = Path(sys.executable).parent / "stackjax"
    server = subprocess.Popen(
        [str(script), "serve", "--port", str(port), "--seed", "1", "--log", str(log)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-local", max_retries=0)
        deadline = time.monotonic() + 60
        while True:
            try:
                reply = client.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "What is 20 + 22?"}], n=3
                )
                break
            except openai.APIConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert len(reply.choices) == 3 and reply.usage.completion_tokens > 0
        assert all(c.message.content.startswith("Answer: ") for c in reply.choices)
        assert log.read_text().count('"status":200') == 1
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=30)
    assert "SIMULATED" in out


def test_serve_rejects_bad_fault_rates(capsys):
    assert main(["serve", "--fault-429", "0.8", "--fault-500", "0.5"]) == 2
    assert "fault rates" in capsys.readouterr().err
