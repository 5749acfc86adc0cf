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
