"""Every example runs, on small sizes, so none of them rots."""

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

SMALL_ARGS = {
    "quickstart.py": ["--sessions", "64"],
    "custom_model.py": ["--features", "6", "--folds", "3", "--rows", "12"],
}


def test_every_example_is_covered():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(SMALL_ARGS)


@pytest.mark.parametrize("name", sorted(SMALL_ARGS))
def test_example_runs(name, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [name, *SMALL_ARGS[name]])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    out = capsys.readouterr().out
    assert "True" in out  # each example prints whether everything converged
