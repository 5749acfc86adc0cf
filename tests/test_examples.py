"""Every example runs, on small sizes, so none of them rots."""

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-api"

SMALL_ARGS = {
    "quickstart.py": ["--sessions", "64"],
    "custom_model.py": ["--features", "6", "--folds", "3", "--rows", "12"],
    "calibrate_real_logs.py": ["--data-dir", str(REAL), "--steps", "100", "--exams", "1", "--plot", ""],
    "govern_openai_agent.py": ["--sessions", "2", "--turns", "2"],
}
# What each example prints that shows it did its job.
EXPECTED = {
    "quickstart.py": "converged                True",
    "custom_model.py": "every inner fit converged              True",
    "calibrate_real_logs.py": "| token_r2_cell |",
    "govern_openai_agent.py": "every call logged to governed_calls.jsonl",
}


def test_every_example_is_covered():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(SMALL_ARGS)


@pytest.mark.parametrize("name", sorted(SMALL_ARGS))
def test_example_runs(name, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)  # examples write their logs and plots where they run
    monkeypatch.setattr(sys, "argv", [name, *SMALL_ARGS[name]])
    if name == "calibrate_real_logs.py" and not REAL.exists():
        pytest.skip("../shared/data/real-api not present")
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    assert EXPECTED[name] in capsys.readouterr().out
