"""Training benchmark: implicit hypergradients vs a policy-gradient trainer, same simulator and policy.

Both train the same task-aware MLP leader policy on sessions simulated from the
calibrated response model (3 turns each, fresh sessions every step):

  implicit   exact gradient of the mean leader utility through every follower's
             implicit best response and the state transitions (stackjax);
  REINFORCE  what the paper did (policy gradient): Gaussian exploration around the
             policy's output, reward-to-go with a per-turn batch-mean baseline, the
             follower treated as part of the environment.

Progress is measured on a fixed set of evaluation sessions (the deterministic policy,
expected outcomes); evaluation solves are not counted as training cost. "99%" means
reaching 99% of the way from the initial policy's utility to the best utility either
method reached. Then training on 10,000 sessions x 3 turns: wall time per step and
peak memory.

    python benchmarks/bench_training.py            # full run
    python benchmarks/bench_training.py --quick    # small sizes
"""

import argparse
import resource
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import stackjax as sj
from stackjax.governance import game, response, session

TURNS = 3


def progress(message):
    print(f"[bench_training] {message}", file=sys.stderr, flush=True)


def evaluator(model, config, sessions, seed=123):
    states = session.sample_sessions(jax.random.PRNGKey(seed), sessions, turns=TURNS)

    @eqx.filter_jit
    def value(policy):
        return -session.training_loss(policy, model, states, TURNS, config)[0]

    return value


def train_implicit(policy, model, config, *, steps, batch, lr, evaluate, every):
    params, static = eqx.partition(policy, eqx.is_inexact_array)
    optimizer = optax.adam(lr)
    state = optimizer.init(params)

    @eqx.filter_jit
    def update(params, opt_state, key):
        states = session.sample_sessions(key, batch, turns=TURNS)
        loss = lambda p: session.training_loss(eqx.combine(p, static), model, states, TURNS, config)[0]  # noqa: E731
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return _loop(update, params, static, state, steps, batch, evaluate, every, seed=1)


def train_reinforce(policy, model, config, *, steps, batch, lr, sigma, evaluate, every):
    params, static = eqx.partition(policy, eqx.is_inexact_array)
    optimizer = optax.adam(lr)
    state = optimizer.init(params)
    lower, upper = config.leader_lower, config.leader_upper

    @eqx.filter_jit
    def update(params, opt_state, key):
        k_states, k_noise = jax.random.split(key)
        states = session.sample_sessions(k_states, batch, turns=TURNS)
        noise = sigma * jax.random.normal(k_noise, (batch, TURNS, 2))
        policy = eqx.combine(params, static)

        # Roll out with sampled signals: the follower answers each (no gradient through it).
        def step(state, eps):
            raw = jnp.clip(policy(state) + eps * (upper - lower), lower, upper)
            signal = session.smooth_signal(raw, state, config)
            context = game.turn_context(model, state)
            action = sj.best_response(
                lambda a, lead, ctx: game.follower_utility(a, lead, ctx, model, config),
                signal,
                context,
                lower=jnp.zeros(3),
                upper=jnp.ones(3),
            )
            reward = game.leader_utility(action, signal, context, model, config)
            new_state, _ = session._step(session.FixedAction(action), model, config, False, state, None)
            new_state = eqx.tree_at(lambda s: s.previous_leader, new_state, signal)
            return new_state, (reward, state, raw)

        def one(state, eps):
            _, (rewards, visited, signals) = jax.lax.scan(step, state, eps)
            return rewards, visited, signals

        rewards, visited, signals = jax.vmap(one)(states, noise)
        rewards, signals = jax.lax.stop_gradient((rewards, signals))
        to_go = jnp.cumsum(rewards[:, ::-1], axis=1)[:, ::-1]
        advantage = to_go - to_go.mean(axis=0, keepdims=True)

        def surrogate(p):
            pol = eqx.combine(p, static)
            means = jax.vmap(jax.vmap(pol))(visited)
            z = (signals - means) / (sigma * (upper - lower))
            log_prob = -0.5 * jnp.sum(z**2, axis=-1)
            return -jnp.mean(jax.lax.stop_gradient(advantage) * log_prob)

        grads = jax.grad(surrogate)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, jnp.mean(rewards)

    return _loop(update, params, static, state, steps, batch, evaluate, every, seed=2)


def _loop(update, params, static, state, steps, batch, evaluate, every, seed):
    keys = jax.random.split(jax.random.PRNGKey(seed), steps)
    curve = [(0, 0.0, float(evaluate(eqx.combine(params, static))))]
    start = time.perf_counter()
    compile_time = None
    for i in range(steps):
        t0 = time.perf_counter()
        params, state, _ = update(params, state, keys[i])
        if i == 0:
            jax.block_until_ready(params)
            compile_time = time.perf_counter() - t0
            start += compile_time  # report run time without the one-off compile
        if i == steps - 1:
            jax.block_until_ready(params)
        if (i + 1) % every == 0 or i == steps - 1:
            value = float(evaluate(eqx.combine(params, static)))
            curve.append(((i + 1) * batch * TURNS, time.perf_counter() - start, value))
    return np.asarray(curve), compile_time


def first_reaching(curve, threshold):
    hits = np.flatnonzero(curve[:, 2] >= threshold)
    return (curve[hits[0], 0], curve[hits[0], 1]) if hits.size else (np.nan, np.nan)


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    quick = args.quick
    model, config = response.calibrated(), game.DEFAULT_CONFIG
    batch = 128 if quick else 256
    evaluate = evaluator(model, config, 256 if quick else 1000)
    init = session.LeaderPolicy(jax.random.PRNGKey(0), config)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}; ", end="")
    print(f"batch {batch} sessions x {TURNS} turns per step\n")

    progress("implicit-gradient training")
    implicit, c_implicit = train_implicit(
        init, model, config, steps=60 if quick else 300, batch=batch, lr=3e-3, evaluate=evaluate, every=5
    )
    runs = {"implicit (stackjax), Adam lr 3e-3": (implicit, c_implicit)}
    # Policy gradients are sensitive to the step size: give REINFORCE a small sweep.
    for lr in (3e-3, 1e-3, 3e-4):
        progress(f"REINFORCE training, lr {lr:g}")
        steps = 300 if quick else 3000
        runs[f"REINFORCE, Adam lr {lr:g}"] = train_reinforce(
            init, model, config, steps=steps, batch=batch, lr=lr, sigma=0.1, evaluate=evaluate, every=25
        )
    start_value = implicit[0, 2]
    best = max(curve[:, 2].max() for curve, _ in runs.values())
    threshold = start_value + 0.99 * (best - start_value)
    print(
        f"leader utility: initial {start_value:.4f}, best reached {best:.4f}, 99% threshold {threshold:.4f}\n"
    )
    header = ("trainer", "follower solves to 99%", "wall s to 99%", "steps run", "final utility",
              "best utility", "compile s")  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    solves = {}
    for name, (curve, compile_s) in runs.items():
        n, t = first_reaching(curve, threshold)
        solves[name] = n
        steps_run = int(curve[-1, 0] / (batch * TURNS))
        reached = f"{n:,.0f}" if np.isfinite(n) else f"not reached in {curve[-1, 0]:,.0f}"
        wall = f"{t:.1f}" if np.isfinite(t) else "-"
        cells = (name, reached, wall, str(steps_run), f"{curve[-1, 2]:.4f}", f"{curve[:, 2].max():.4f}",
                 f"{compile_s:.1f}")  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    ours = solves.pop(next(iter(runs)))
    theirs = [v for v in solves.values() if np.isfinite(v)]
    most = max(curve[-1, 0] for name, (curve, _) in runs.items() if name.startswith("REINFORCE"))
    if np.isfinite(ours) and theirs:
        ratio = min(theirs) / ours
        print(f"\nThe best REINFORCE run needed {ratio:.1f}x the follower solves of implicit training.")
    elif np.isfinite(ours):
        print(f"\nNo REINFORCE run reached the threshold within {most:,.0f} solves ", end="")
        print(f"({most / ours:.1f}x implicit's {ours:,.0f}).")

    big = 1000 if quick else 10_000
    progress(f"training on {big:,} sessions x {TURNS} turns")
    rss_before = peak_rss_mib()
    curve, compile_s = train_implicit(
        init, model, config, steps=4, batch=big, lr=3e-3, evaluate=lambda p: 0.0, every=4
    )
    steady = curve[-1, 1] / 3  # steps 2-4; the first step carried the compile
    print(
        f"\nTraining on {big:,} sessions x {TURNS} turns per step ({big * TURNS:,} follower solves per step):"
    )
    rate = big * TURNS / steady
    print(
        f"  compile + first step {compile_s:.1f} s; then {steady:.2f} s per step "
        f"({rate:,.0f} solves/s with gradients)"
    )
    print(f"  peak resident memory of the process: {peak_rss_mib():,.0f} MiB (before: {rss_before:,.0f} MiB)")


if __name__ == "__main__":
    main()
