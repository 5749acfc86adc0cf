"""solve_leader against textbook closed forms and a published bilevel test problem."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import run_on_simulated_devices
from problems import duopoly_contexts, duopoly_follower, duopoly_leader, duopoly_truth

import stackjax as sj

pytestmark = pytest.mark.usefixtures("x64")

SESSIONS = 1200


@pytest.fixture(scope="module")
def markets(x64):
    return duopoly_contexts(SESSIONS)


def _solve_duopoly(markets, **kwargs):
    options = {"lower": jnp.zeros(1), "per_session": True, "leader_lower": 0.0} | kwargs
    return sj.solve_leader(duopoly_leader, duopoly_follower, jnp.ones(SESSIONS), markets, **options)


def test_stackelberg_duopoly_per_session_matches_textbook(markets):
    sol = _solve_duopoly(markets)
    leader_true, follower_true = duopoly_truth(markets)
    assert bool(sol.converged)
    assert sol.actions.shape == (SESSIONS, 1)
    np.testing.assert_allclose(sol.leader, leader_true, rtol=1e-4)
    np.testing.assert_allclose(sol.actions[:, 0], follower_true, rtol=1e-4)
    # Leader profit at the optimum: (a - c)^2 / (8 b).
    profit = (markets["a"] - markets["c"]) ** 2 / (8 * markets["b"])
    np.testing.assert_allclose(sol.session_values, profit, rtol=1e-8)
    np.testing.assert_allclose(sol.value, np.mean(profit), rtol=1e-8)
    assert sol.history[0] < sol.history[-1]
    np.testing.assert_allclose(sol.history[-1], sol.value, rtol=1e-10)
    assert len(sol.history) == int(sol.steps) + 1


@pytest.mark.parametrize("optimizer", [optax.lbfgs(), optax.adam(0.05)], ids=["lbfgs", "adam"])
def test_duopoly_with_optax_optimizers(markets, optimizer):
    sol = _solve_duopoly(markets, optimizer=optimizer, steps=3000)
    leader_true, _ = duopoly_truth(markets)
    assert bool(sol.converged)
    np.testing.assert_allclose(sol.leader, leader_true, rtol=1e-4)


def test_shared_commitment_matches_closed_form(markets):
    # One quantity for every market with a common slope b: maximise mean q (a - c - b q) / 2,
    # so q = mean(a - c) / (2 b); every follower stays interior since min(a - c) > mean(a - c) / 2.
    markets = markets | {"b": jnp.full(SESSIONS, 1.3)}
    sol = sj.solve_leader(duopoly_leader, duopoly_follower, jnp.asarray(1.0), markets, lower=jnp.zeros(1))
    expected = np.mean(markets["a"] - markets["c"]) / (2 * 1.3)
    assert bool(sol.converged)
    assert float(jnp.min(sol.actions)) > 0
    np.testing.assert_allclose(sol.leader, expected, rtol=1e-6)


def test_leader_box_is_enforced_and_stationarity_is_projected(markets):
    sol = sj.solve_leader(
        duopoly_leader, duopoly_follower, jnp.asarray(0.5), markets, lower=jnp.zeros(1), leader_upper=1.0
    )
    assert float(sol.leader) == 1.0
    assert bool(sol.leader_converged) and bool(sol.converged)
    # The follower answers the clamped commitment: (a - c - b) / (2 b).
    expected = (markets["a"] - markets["c"] - markets["b"]) / (2 * markets["b"])
    np.testing.assert_allclose(sol.actions[:, 0], expected, rtol=1e-8)


def test_bolib_lampariello_sagratella_2017_ex32():
    # Leader min x^2 + y^2, follower min (x + y - 1)^2; BOLIB: x = y = 0.5, F = 0.5, from (1, 1).
    def leader(y, x, _):
        return -(x**2 + y[0] ** 2)

    def follower(y, x, _):
        return -((x + y[0] - 1.0) ** 2)

    sol = sj.solve_leader(leader, follower, jnp.asarray(1.0), jnp.zeros((1,)), init=jnp.ones(1))
    assert bool(sol.converged)
    np.testing.assert_allclose(sol.leader, 0.5, atol=1e-8)
    np.testing.assert_allclose(sol.actions, [[0.5]], atol=1e-8)
    np.testing.assert_allclose(-sol.value, 0.5, atol=1e-12)


class LinearPolicy(eqx.Module):
    weights: jax.Array

    def __call__(self, x):
        return self.weights[0] * x + self.weights[1]


def _policy_follower(a, commitment, x):
    return -((a[0] - commitment * x) ** 2)


def _policy_leader(a, commitment, x):
    return -((a[0] - 1.0) ** 2)


def test_contextual_policy_matches_least_squares():
    # a* = l(x) x with l(x) = w0 x + w1; the leader wants a* = 1, so (w0, w1) is the
    # least-squares fit of 1 on the features (x^2, x).
    x = jnp.linspace(0.5, 2.0, 64)
    sol = sj.solve_leader(_policy_leader, _policy_follower, LinearPolicy(jnp.zeros(2)), x, init=jnp.zeros(1))
    features = np.stack([np.asarray(x) ** 2, np.asarray(x)], axis=1)
    expected, *_ = np.linalg.lstsq(features, np.ones(64), rcond=None)
    assert isinstance(sol.leader, LinearPolicy)
    assert bool(sol.converged)
    np.testing.assert_allclose(sol.leader.weights, expected, rtol=1e-6)


def test_policy_outputs_are_projected_onto_the_leader_box():
    x = jnp.linspace(0.5, 2.0, 16)
    sol = sj.solve_leader(
        _policy_leader,
        _policy_follower,
        LinearPolicy(jnp.array([0.0, 5.0])),
        x,
        init=jnp.zeros(1),
        leader_upper=1.2,
        steps=5,
    )
    assert float(jnp.max(sol.actions[:, 0] / x)) <= 1.2 + 1e-12


def test_nan_session_is_reported(markets):
    bad = markets | {"a": markets["a"].at[7].set(jnp.nan)}
    sol = sj.solve_leader(duopoly_leader, duopoly_follower, jnp.asarray(1.0), bad, lower=jnp.zeros(1))
    assert not bool(sol.converged)
    assert bool(sol.follower_info.nonfinite[7])
    assert int(jnp.sum(sol.follower_info.nonfinite)) == 1


class _CountingFollower:
    def __init__(self):
        self.traces = 0

    def __call__(self, q, lead, market):
        self.traces += 1
        return duopoly_follower(q, lead, market)


def test_solve_leader_compiles_once_per_shape():
    follower = _CountingFollower()
    first = duopoly_contexts(50, seed=1)
    sj.solve_leader(duopoly_leader, follower, jnp.asarray(1.0), first, lower=jnp.zeros(1))
    traces = follower.traces
    sol = sj.solve_leader(
        duopoly_leader, follower, jnp.asarray(2.0), duopoly_contexts(50, seed=2), lower=jnp.zeros(1)
    )
    assert follower.traces == traces
    assert bool(sol.converged)
    sj.solve_leader(
        duopoly_leader, follower, jnp.asarray(2.0), duopoly_contexts(60, seed=2), lower=jnp.zeros(1)
    )
    assert follower.traces > traces


def test_bad_input_raises(markets):
    args = (duopoly_leader, duopoly_follower)
    with pytest.raises(ValueError, match="contexts"):
        sj.solve_leader(
            *args, 1.0, {"a": jnp.ones(3), "b": jnp.ones(4), "c": jnp.ones(3)}, lower=jnp.zeros(1)
        )
    with pytest.raises(ValueError, match="contexts"):
        sj.solve_leader(*args, 1.0, {"a": 1.0}, lower=jnp.zeros(1))
    with pytest.raises(ValueError, match="leader_init"):
        sj.solve_leader(*args, jnp.ones(3), markets, lower=jnp.zeros(1), per_session=True)
    with pytest.raises(ValueError, match="leader_lower"):
        sj.solve_leader(*args, 1.0, markets, lower=jnp.zeros(1), leader_lower=2.0, leader_upper=1.0)
    with pytest.raises(TypeError, match="leader_utility"):
        sj.solve_leader(None, duopoly_follower, 1.0, markets, lower=jnp.zeros(1))
    with pytest.raises(ValueError, match="leader_utility"):
        sj.solve_leader(lambda a, lead, c: a, duopoly_follower, 1.0, markets, lower=jnp.zeros(1))
    with pytest.raises(ValueError, match="per_session"):
        sj.solve_leader(*args, LinearPolicy(jnp.zeros(2)), markets, lower=jnp.zeros(1), per_session=True)
    with pytest.raises(TypeError, match="optimizer"):
        sj.solve_leader(*args, 1.0, markets, lower=jnp.zeros(1), optimizer="adam")
    with pytest.raises(ValueError, match="steps"):
        sj.solve_leader(*args, 1.0, markets, lower=jnp.zeros(1), steps=0)
    with pytest.raises(ValueError, match="lower must be <= upper"):
        sj.solve_leader(*args, 1.0, markets, lower=jnp.ones(1), upper=jnp.zeros(1))


SHARDED_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from conftest import run_on_simulated_devices
from problems import duopoly_contexts, duopoly_follower, duopoly_leader, duopoly_truth
import stackjax as sj

assert jax.device_count() == 4
n = 4 * 300
markets = duopoly_contexts(n)
spread = NamedSharding(Mesh(np.array(jax.devices()), ("sessions",)), PartitionSpec("sessions"))
sharded = jax.device_put(markets, spread)
options = dict(lower=jnp.zeros(1), per_session=True, leader_lower=0.0)
one = sj.solve_leader(duopoly_leader, duopoly_follower, jnp.ones(n), markets, **options)
start = jax.device_put(jnp.ones(n), spread)
four = sj.solve_leader(duopoly_leader, duopoly_follower, start, sharded, **options)
assert bool(four.converged)
assert four.actions.sharding.spec == PartitionSpec("sessions") and len(four.actions.sharding.device_set) == 4
leader_true, follower_true = duopoly_truth(markets)
np.testing.assert_allclose(four.leader, leader_true, rtol=1e-6)
np.testing.assert_allclose(four.actions[:, 0], follower_true, rtol=1e-6)
np.testing.assert_allclose(four.leader, one.leader, rtol=1e-9)

def mean_profit(q_leader, contexts):
    follow = jax.vmap(lambda m: sj.best_response(duopoly_follower, q_leader, m, lower=jnp.zeros(1)))(contexts)
    return jnp.mean(jax.vmap(duopoly_leader, in_axes=(0, None, 0))(follow, q_leader, contexts))

grad_one = jax.jit(jax.grad(mean_profit))(2.0, markets)
grad_four = jax.jit(jax.grad(mean_profit))(2.0, sharded)
np.testing.assert_allclose(grad_four, grad_one, rtol=1e-9)
print("sharded ok")
"""


def test_sessions_sharded_across_devices_give_the_same_answers(tmp_path):
    """Contexts placed on a 4-device mesh along the session axis: jit partitions the
    solve, the answers stay sharded and equal the one-device answers and the textbook."""
    assert "sharded ok" in run_on_simulated_devices(SHARDED_SCRIPT, tmp_path)
