import jax
import pytest


@pytest.fixture(scope="module")
def x64():
    """float64 for the tests whose truth needs it (finite differences, tight closed forms)."""
    with jax.enable_x64(True):
        yield
