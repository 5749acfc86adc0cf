"""Quick start: a Stackelberg game in a few lines, solved for many sessions at once.

A controller (leader) sets a quality target q and a cost subsidy s for an agent
(follower). Each session's agent picks how much context to keep and how verbose
to be, a in [0, 1]^2, to maximise its own utility; the controller chooses (q, s)
to maximise quality minus token cost over all sessions, differentiating through
every agent's best response.

    python examples/quickstart.py --sessions 2000
"""

import argparse
import time

import jax
import jax.numpy as jnp

import stackjax as sj


def quality(action, session):
    return 1.0 - jnp.exp(-session["gain"] @ action)


def tokens(action, session):
    # Thousands of tokens: a base cost plus what context and verbosity add.
    return session["base"] + session["price"] @ action + 0.5 * action @ action


def agent(action, leader, session):
    """The follower: quality, a hinge-like push towards the target, tokens at a subsidised price."""
    target, subsidy = leader
    shortfall = jax.nn.softplus(20.0 * (target - quality(action, session))) / 20.0
    return quality(action, session) - 2.0 * shortfall - (1.0 - subsidy) * 0.2 * tokens(action, session)


def controller(action, leader, session):
    """The leader: quality is worth more to it than the tokens it pays for."""
    return 4.0 * quality(action, session) - 0.5 * tokens(action, session)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(args.seed), 3)
    sessions = {
        "gain": jax.random.uniform(k1, (args.sessions, 2), minval=0.5, maxval=1.5),
        "price": jax.random.uniform(k2, (args.sessions, 2), minval=0.2, maxval=1.5),
        "base": jax.random.uniform(k3, (args.sessions,), minval=0.2, maxval=1.0),
    }

    start = time.perf_counter()
    solution = sj.solve_leader(
        controller,
        agent,
        jnp.array([0.5, 0.5]),  # initial (target, subsidy)
        sessions,
        lower=jnp.zeros(2),
        upper=jnp.ones(2),
        leader_lower=jnp.array([0.0, 0.0]),
        leader_upper=jnp.array([0.99, 1.0]),
    )
    seconds = time.perf_counter() - start

    target, subsidy = (float(v) for v in solution.leader)
    actions = solution.actions
    print(f"sessions                 {args.sessions}")
    print(f"leader commitment        target q = {target:.4f}, subsidy s = {subsidy:.4f}")
    print(
        f"mean follower action     context = {float(actions[:, 0].mean()):.3f}, "
        f"verbosity = {float(actions[:, 1].mean()):.3f}"
    )
    print(f"leader utility           {float(solution.history[0]):.4f} -> {float(solution.value):.4f}")
    print(
        f"converged                {bool(solution.converged)} "
        f"(leader residual {float(solution.leader_residual):.1e}, "
        f"{int(solution.follower_info.converged.sum())}/{args.sessions} followers)"
    )
    print(f"leader steps             {int(solution.steps)}")
    print(f"wall time (incl. compile) {seconds:.2f} s")
    return solution


if __name__ == "__main__":
    main()
