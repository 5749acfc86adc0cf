"""Test problems with known answers, shared by several test modules."""

import jax


def duopoly_contexts(sessions, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {
        "a": jax.random.uniform(k1, (sessions,), minval=8.0, maxval=12.0),
        "b": jax.random.uniform(k2, (sessions,), minval=0.5, maxval=2.0),
        "c": jax.random.uniform(k3, (sessions,), minval=1.0, maxval=3.0),
    }


def _profit(quantity, total, market):
    return quantity * (market["a"] - market["b"] * total - market["c"])


def duopoly_follower(q_follower, q_leader, market):
    return _profit(q_follower[0], q_follower[0] + q_leader, market)


def duopoly_leader(q_follower, q_leader, market):
    return _profit(q_leader, q_follower[0] + q_leader, market)


def duopoly_truth(market):
    """Stackelberg duopoly with linear demand: leader (a-c)/(2b), follower (a-c)/(4b)."""
    leader = (market["a"] - market["c"]) / (2 * market["b"])
    return leader, leader / 2
