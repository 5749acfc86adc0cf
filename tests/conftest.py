import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest


@pytest.fixture(scope="module")
def x64():
    """float64 for the tests whose truth needs it (finite differences, tight closed forms)."""
    with jax.enable_x64(True):
        yield


def run_on_simulated_devices(script: str, tmp_path: Path, devices: int = 4) -> str:
    """Run `script` in a fresh Python whose CPU shows up as `devices` devices (JAX fixes the
    device count when it starts, so this needs its own process); return its stdout."""
    path = tmp_path / "on_devices.py"
    path.write_text(script)
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(Path(__file__).parent),
    }
    run = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout
