"""Bring your own model: tune per-feature ridge penalties through the inner fit.

The inner problem (the "follower") is a ridge regression fitted on one training
fold; the outer problem (the "leader") picks one log-penalty per feature to
minimise the validation error averaged over all folds. `stackjax.best_response`
solves each fit and differentiates it implicitly, so the penalties get exact
hypergradients; `jax.vmap` runs all folds at once and `solve_leader` does the
outer optimisation compiled end to end.

    python examples/custom_model.py --features 20 --folds 8
"""

import argparse
import time

import jax
import jax.numpy as jnp

import stackjax as sj


def neg_training_loss(weights, log_penalty, fold):
    """Follower utility: minus the penalised training loss of one fold."""
    residual = fold["x_train"] @ weights - fold["y_train"]
    return -(jnp.mean(residual**2) + jnp.sum(jnp.exp(log_penalty) * weights**2))


def neg_validation_loss(weights, log_penalty, fold):
    """Leader utility: minus the validation loss of the fitted weights."""
    return -jnp.mean((fold["x_valid"] @ weights - fold["y_valid"]) ** 2)


def make_folds(key, features, folds, rows):
    """Synthetic data where only the first quarter of the features matter."""
    k_w, k_x, k_e = jax.random.split(key, 3)
    informative = max(1, features // 4)
    w_true = jnp.zeros(features).at[:informative].set(jax.random.normal(k_w, (informative,)) * 2)
    x = jax.random.normal(k_x, (folds, 2 * rows, features))
    y = x @ w_true + 0.5 * jax.random.normal(k_e, (folds, 2 * rows))
    return {"x_train": x[:, :rows], "y_train": y[:, :rows], "x_valid": x[:, rows:], "y_valid": y[:, rows:]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=20)
    parser.add_argument("--folds", type=int, default=8)
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    folds = make_folds(jax.random.PRNGKey(args.seed), args.features, args.folds, args.rows)
    log_penalty = jnp.full(args.features, -2.0)

    # One hypergradient by hand: jit(grad(vmap(best_response))).
    @jax.jit
    def validation_loss(log_penalty):
        fit = lambda fold: sj.best_response(  # noqa: E731
            neg_training_loss, log_penalty, fold, init=jnp.zeros(args.features)
        )
        weights = jax.vmap(fit)(folds)
        return -jnp.mean(jax.vmap(neg_validation_loss, in_axes=(0, None, 0))(weights, log_penalty, folds))

    loss, grad = jax.value_and_grad(validation_loss)(log_penalty)
    print(f"validation loss at a uniform penalty   {float(loss):.4f}")
    print(f"hypergradient norm                     {float(jnp.linalg.norm(grad)):.4f}")

    # The whole outer optimisation, compiled.
    start = time.perf_counter()
    solution = sj.solve_leader(
        neg_validation_loss,
        neg_training_loss,
        log_penalty,
        folds,
        init=jnp.zeros(args.features),
        leader_lower=-8.0,
        leader_upper=4.0,
        steps=100,
    )
    seconds = time.perf_counter() - start
    informative = max(1, args.features // 4)
    penalties = solution.leader
    print(f"validation loss after tuning           {float(-solution.value):.4f}")
    print(f"mean log-penalty, informative features {float(penalties[:informative].mean()):+.2f}")
    print(f"mean log-penalty, noise features       {float(penalties[informative:].mean()):+.2f}")
    print(f"outer steps / wall time                {int(solution.steps)} / {seconds:.2f} s")
    print(f"every inner fit converged              {bool(jnp.all(solution.follower_info.converged))}")
    return solution


if __name__ == "__main__":
    main()
