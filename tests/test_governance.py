"""The governance game: semantics, utilities, rollouts, training, inverse optimisation, the CLI."""

import json
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from conftest import run_on_simulated_devices

import stackjax as sj
from stackjax import cli as cli_module
from stackjax.cli import main as cli
from stackjax.governance import actions, calibrate, data, demo, game, inverse, response, session

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-api"
needs_real_data = pytest.mark.skipif(not (REAL / "concise_cot_calls.csv").exists(), reason="no real-api data")
CONFIG = game.DEFAULT_CONFIG


@pytest.fixture(scope="module")
def model():
    return response.calibrated()


@pytest.fixture(scope="module")
def states():
    return session.sample_sessions(jax.random.PRNGKey(11), 64)


# ---------------------------------------------------------------- semantics and validation
def test_action_semantics():
    np.testing.assert_array_equal(
        actions.verbosity_level([0.0, 0.16, 0.17, 0.5, 0.84, 1.0]), [0, 0, 1, 2, 3, 3]
    )
    assert actions.completion_cap(0.4) == actions.COMPLETION_CAPS[1]
    assert actions.kept_messages(0.5, 7) == 4 and actions.kept_messages(0.0, 7) == 0
    assert actions.tool_calls_allowed(0.5, 4) == 2 and actions.tool_calls_allowed(0.0, 4) == 0
    with pytest.raises(ValueError, match="u: tool budget"):
        actions.tool_calls_allowed(1.2, 4)
    with pytest.raises(ValueError, match="c: context"):
        actions.kept_messages(-0.1, 3)


def test_subsidy_smoothing_matches_the_papers_rule():
    previous = jnp.array([0.0, 0.5, 0.9, 1.0])
    raw = jnp.array([1.0, 0.6, 0.0, 1.0])
    out = actions.smooth_subsidy(raw, previous, inertia=0.5, max_change=0.2)
    # blend 0.5/0.5, then at most 0.2 away from the previous value, then [0, 1].
    np.testing.assert_allclose(out, [0.2, 0.55, 0.7, 1.0], atol=1e-7)


def test_config_and_state_validation():
    with pytest.raises(ValueError, match="target_range"):
        game.GameConfig(target_range=(0.9, 0.5))
    with pytest.raises(ValueError, match="cost_weight"):
        game.GameConfig(cost_weight=-1.0)
    with pytest.raises(ValueError, match="task"):
        game.SessionState.create("poetry", 0.5, 0.5, 100.0, 1000.0)
    with pytest.raises(ValueError, match="complexity"):
        game.SessionState.create("simple_qa", 0.5, 1.5, 100.0, 1000.0)
    with pytest.raises(ValueError, match="budget_tokens"):
        game.SessionState.create("simple_qa", 0.5, 0.5, 100.0, 0.0)
    state = game.SessionState.create(
        ["simple_qa", "code_generation"], [0.0, 1.0], 0.3, [200.0, 900.0], 5000.0
    )
    assert state.scalar_features().shape == (2, 9)
    assert state.task_features().shape == (2, 14)
    np.testing.assert_array_equal(state.task_features()[:, 8:].argmax(-1), [1, 3])


def test_smoothed_hinge_and_clip_stay_within_their_bounds():
    z = jnp.linspace(-1, 1, 201)
    t = 0.02
    gap = game.soft_hinge(z, t) - jnp.maximum(z, 0.0)
    assert float(gap.min()) >= -1e-6 and float(gap.max()) <= t * np.log(2) + 1e-6
    clipped = game.soft_clip(3 * z, -1.0, 1.0, t)
    assert float(jnp.max(jnp.abs(clipped - jnp.clip(3 * z, -1.0, 1.0)))) <= 2 * t * np.log(2) + 1e-6


# ---------------------------------------------------------------- the follower's problem
def test_follower_best_response_is_a_strict_local_maximum(model, states):
    contexts = jax.vmap(lambda s: game.turn_context(model, s))(states)
    leaders = jnp.stack([jnp.linspace(0.5, 0.99, 64), jnp.linspace(0.0, 1.0, 64)], axis=1)

    def solve(leader, context):
        utility = lambda a, lead, ctx: game.follower_utility(a, lead, ctx, model, CONFIG)  # noqa: E731
        box = {"lower": jnp.zeros(3), "upper": jnp.ones(3)}
        action, info = sj.best_response(utility, leader, context, **box, return_info=True)
        hessian = jax.hessian(utility)(action, leader, context)
        return action, info, jnp.linalg.eigvalsh(hessian)

    actions_, info, eigenvalues = jax.jit(jax.vmap(solve))(leaders, contexts)
    assert bool(jnp.all(info.converged))
    interior = jnp.all((actions_ > 1e-4) & (actions_ < 1 - 1e-4), axis=1)
    # Where the solution is interior, the Hessian must be negative definite there.
    assert float(jnp.max(jnp.where(interior, eigenvalues[:, -1], -1.0))) < 0.0


def test_rollout_gradient_matches_finite_differences(model, states):
    with jax.enable_x64(True):
        model64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), model)
        few = jax.tree_util.tree_map(
            lambda a: jnp.asarray(a[:8], jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a[:8],
            states,
        )
        policy = session.LeaderPolicy(jax.random.PRNGKey(3), CONFIG)
        policy = jax.tree_util.tree_map(
            lambda a: jnp.asarray(a, jnp.float64) if eqx.is_inexact_array(a) else a, policy
        )
        bias = policy.mlp.layers[-1].bias

        def loss(b):
            p = eqx.tree_at(lambda m: m.mlp.layers[-1].bias, policy, b)
            return session.training_loss(p, model64, few, 2, CONFIG)[0]

        grad = jax.jit(jax.grad(loss))(bias)
        loss = jax.jit(loss)
        h = 1e-6
        fd = [(loss(bias.at[i].add(h)) - loss(bias.at[i].add(-h))) / (2 * h) for i in range(2)]
        np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-9)


def test_fixed_action_rollout_follows_the_state_transitions(model, states):
    action = jnp.asarray(game.CONSERVATIVE_ACTION)
    record, final = session.rollout(session.FixedAction(action), model, states, 2, config=CONFIG)
    first = jax.vmap(lambda s: model.tokens(action, s.covariates()))(states)
    np.testing.assert_allclose(record.tokens[:, 0], first, rtol=1e-6)
    spent = record.tokens.sum(axis=1) / states.budget_tokens
    np.testing.assert_allclose(final.budget, 1.0 - spent, rtol=1e-5)
    np.testing.assert_allclose(final.turn, 2.0)
    np.testing.assert_allclose(final.avg_cost, record.tokens.mean(axis=1), rtol=1e-5)


def test_training_is_deterministic_and_checkpoints_round_trip(model, tmp_path):
    start = session.LeaderPolicy(jax.random.PRNGKey(0), CONFIG, width=8, depth=1)
    kwargs = {"steps": 3, "sessions": 16, "seed": 5, "progress": False}
    first, losses_a = session.train_policy(start, model, checkpoint=tmp_path / "policy.eqx", **kwargs)
    second, losses_b = session.train_policy(start, model, **kwargs)
    np.testing.assert_array_equal(losses_a, losses_b)
    for a, b in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(second), strict=True):
        np.testing.assert_array_equal(a, b)
    loaded = session.load_policy(tmp_path / "policy.eqx", start)
    state = session.sample_sessions(jax.random.PRNGKey(1), 1)
    one = jax.tree_util.tree_map(lambda a: a[0], state)
    np.testing.assert_array_equal(loaded(one), first(one))


SHARDED_TRAINING = """
import equinox as eqx, jax, numpy as np, optax
from stackjax.governance import game, response, session

assert jax.device_count() == 4
model = response.calibrated()
start = session.LeaderPolicy(jax.random.PRNGKey(0), width=8, depth=1)
kwargs = dict(steps=2, sessions=16, turns=2, seed=3, progress=False)
one, losses_one = session.train_policy(start, model, **kwargs)
four, losses_four = session.train_policy(start, model, devices=jax.devices(), **kwargs)
np.testing.assert_allclose(losses_four, losses_one, rtol=1e-5)
for a, b in zip(jax.tree_util.tree_leaves(eqx.filter(four, eqx.is_inexact_array)),
                jax.tree_util.tree_leaves(eqx.filter(one, eqx.is_inexact_array)), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
# The compiled step really is split four ways, with reductions across devices.
params, static = eqx.partition(start, eqx.is_inexact_array)
spread = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("sessions",)),
                                    jax.sharding.PartitionSpec("sessions"))
args = (params, static, optax.adam(3e-3).init(params), jax.random.PRNGKey(1), model, game.DEFAULT_CONFIG,
        3e-3, 16, 2, spread)
text = session._train_step.lower(*args).compile().compiled.as_text()
assert "num_partitions=4" in text and "all-reduce" in text
print("sharded training ok")
"""


def test_training_split_across_devices_matches_one_device(tmp_path):
    """`train_policy(devices=...)` on 4 simulated CPU devices: the step compiles into 4
    partitions, and losses and parameters equal the one-device run."""
    assert "sharded training ok" in run_on_simulated_devices(SHARDED_TRAINING, tmp_path)
    with pytest.raises(ValueError, match="devices: expected a non-empty list"):
        session.train_policy(session.LeaderPolicy(jax.random.PRNGKey(0)), response.calibrated(), devices=[])


def test_inverse_optimisation_recovers_known_follower_weights(model):
    states = session.sample_sessions(jax.random.PRNGKey(5), 120)
    contexts = jax.vmap(lambda s: game.turn_context(model, s))(states)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(6), 3)
    leaders = jnp.stack(
        [jax.random.uniform(k1, (120,), minval=0.5, maxval=0.99), jax.random.uniform(k2, (120,))], 1
    )
    truth = game.FollowerWeights(jnp.asarray(2.5), jnp.asarray(4.5), jnp.asarray(6.0))
    observed = inverse.predicted_actions(truth, model, leaders, contexts, CONFIG)
    observed = jnp.clip(observed + 0.01 * jax.random.normal(k3, observed.shape), 0.0, 1.0)
    fitted, losses = inverse.fit_follower_weights(model, leaders, contexts, observed, steps=40)
    np.testing.assert_allclose([fitted.quality, fitted.cost, fitted.target], [2.5, 4.5, 6.0], rtol=0.05)
    assert losses[-1] < 0.02 * losses[0]
    with pytest.raises(ValueError, match="observed_actions"):
        inverse.fit_follower_weights(model, leaders, contexts, observed[:, :2])


# ---------------------------------------------------------------- what it must show
@pytest.fixture(scope="module")
def trained_demo():
    return demo.run(train_sessions=256, steps=150, eval_sessions=700, turns=3, seed=0, progress=False)


def test_trained_policy_cuts_tokens_at_non_inferior_quality(trained_demo):
    policy = trained_demo.results["stackjax policy"]
    assert policy.tokens.size >= 2000  # fresh simulated turns
    assert trained_demo.token_change("stackjax policy") <= -0.20
    test = trained_demo.noninferiority("stackjax policy")
    assert test.non_inferior and test.p_value < 0.05
    assert policy.converged == 1.0


def test_training_improves_the_leader_on_fresh_sessions(trained_demo, model):
    fresh = session.sample_sessions(jax.random.PRNGKey(99), 500)
    start = session.LeaderPolicy(jax.random.split(jax.random.PRNGKey(0), 3)[0], CONFIG)
    before = -session.training_loss(start, model, fresh, 3, CONFIG)[0]
    after = -session.training_loss(trained_demo.policy, model, fresh, 3, CONFIG)[0]
    assert float(after) > float(before) + 0.01


def test_demo_table_and_plot(trained_demo, tmp_path):
    table = demo.format_table(trained_demo)
    assert "| stackjax policy |" in table and "| conservative |" in table
    demo.plot(trained_demo, tmp_path / "demo.png")
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"


def test_welch_noninferiority_matches_scipy():
    rng = np.random.default_rng(0)
    treatment, control = rng.normal(0.90, 0.1, 400), rng.normal(0.91, 0.12, 300)
    result = sj.welch_noninferiority(treatment, control, margin=0.02)
    reference = scipy.stats.ttest_ind(treatment + 0.02, control, equal_var=False, alternative="greater")
    np.testing.assert_allclose(result.p_value, reference.pvalue, rtol=1e-10)
    assert result.non_inferior == (reference.pvalue < 0.05)
    with pytest.raises(ValueError, match="margin"):
        sj.welch_noninferiority(treatment, control, margin=0.0)


# ---------------------------------------------------------------- the shipped model and the CLI
@needs_real_data
def test_shipped_calibrated_model_is_reproduced_by_a_fresh_fit(model):
    records = data.load([REAL / "concise_cot_calls.csv", REAL / "fewshot_addition_calls_gpt35.csv"])
    fresh = calibrate.fit_response_model(records)
    grid = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (50, 3)), jnp.float32)
    x = jnp.asarray(records.covariates[::250][:50], jnp.float32)
    t_ship, q_ship = jax.vmap(model)(grid, x)
    t_new, q_new = jax.vmap(fresh)(grid, x)
    np.testing.assert_allclose(t_new, t_ship, rtol=1e-2)
    np.testing.assert_allclose(q_new, q_ship, atol=2e-3)


@needs_real_data
def test_calibrate_cli_on_held_out_exam(tmp_path, capsys):
    lines = (REAL / "concise_cot_calls.csv").read_text().splitlines()
    header, rows = lines[0], lines[1:]
    held = [r for r in rows if ",sat-en-100," in r]
    train = [r for r in rows if ",sat-en-100," not in r]
    (tmp_path / "train.csv").write_text("\n".join([header, *train]) + "\n")
    (tmp_path / "eval.csv").write_text("\n".join([header, *held]) + "\n")
    out = tmp_path / "figures.json"
    code = cli(
        ["calibrate", "--data", str(tmp_path / "train.csv"), "--eval", str(tmp_path / "eval.csv"),
         "--json", str(out), "--out", str(tmp_path / "model.eqx"), "--steps", "200"]
    )  # fmt: skip
    assert code == 0
    figures = json.loads(out.read_text())
    for key in cli_module.REPORT_KEYS:
        assert key in figures
    unseen = [r for r in held if ",baseline," not in r and not r.endswith(",1")]  # error rows are skipped
    assert figures["n_calls"] == len(unseen)  # the answer-only calls anchor, the rest are predicted
    assert figures["token_r2_cell"] > 0.8
    assert figures["by_group"]["sat-en-100"]["quality_mae_cell"] == figures["quality_mae_cell"]
    assert response.load(tmp_path / "model.eqx").tokens(jnp.ones(3) / 2, jnp.zeros(9)) > 0
    assert "token_r2_cell" in capsys.readouterr().out


def test_calibrate_cli_reports_unreadable_input(tmp_path, capsys):
    (tmp_path / "empty.csv").write_text("")
    assert cli(["calibrate", "--data", str(tmp_path / "empty.csv")]) == 2
    assert "empty" in capsys.readouterr().err
    assert cli(["calibrate", "--data", str(tmp_path / "empty.csv"), "--verbosity-prior", "maths=1"]) == 2
    assert "unknown task type 'maths'" in capsys.readouterr().err
    assert (
        cli(["calibrate", "--data", str(tmp_path / "empty.csv"), "--verbosity-prior", "data_analysis"]) == 2
    )
    assert "expected TASK=NUMBER" in capsys.readouterr().err
