"""Call-log loaders and the response-model fit, on real API data and on synthetic truth."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stackjax.governance import actions, calibrate, data, features
from stackjax.governance.response import ResponseModel, load, save

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-api"
CONCISE = REAL / "concise_cot_calls.csv"
FEWSHOT = REAL / "fewshot_addition_calls_gpt35.csv"
needs_real_data = pytest.mark.skipif(not CONCISE.exists(), reason="../shared/data/real-api not present")


@pytest.fixture(scope="module")
def real_records():
    return data.load([CONCISE, FEWSHOT])


@pytest.fixture(scope="module")
def real_fit(real_records):
    return calibrate.fit_response_model(real_records)


@needs_real_data
def test_real_logs_load_with_errors_counted(real_records):
    assert len(real_records) == 6366 + 6300
    assert real_records.skipped == {"api error": 34}
    assert real_records.covariates.shape == (12666, features.N_COVARIATES)
    # The few-shot axis lands on c = shots / 16, the prompt styles on the four p levels.
    fewshot = real_records.group == "fewshot-addition"
    np.testing.assert_allclose(
        np.unique(real_records.action[fewshot, 0]), [1 / 16, 2 / 16, 4 / 16, 8 / 16, 1.0]
    )
    np.testing.assert_allclose(np.unique(real_records.action[~fewshot, 1]), actions.VERBOSITY_P)
    # Completion tokens are per answer: gpt-4 answer-only calls drew 10 samples of ~8 tokens.
    gpt4_short = (real_records.model == "gpt-4") & (real_records.action[:, 1] == 0) & ~fewshot
    assert 5 < real_records.completion_tokens[gpt4_short].mean() < 12


@needs_real_data
def test_fit_reproduces_real_cells_in_sample(real_records, real_fit):
    report = calibrate.calibration_report(real_records, calibrate.predict(real_fit, real_records))
    assert report["token_r2_cell"] > 0.95
    assert report["token_r2_call"] > 0.9
    assert report["quality_mae_cell"] < 0.07
    assert report["verbosity_effect_mae"] < 0.06
    # The real data's signature: verbosity multiplies tokens and helps maths, hurts reading.
    x_math = jnp.asarray(real_records.covariates[real_records.group == "aqua-rat-100"][0])
    x_read = jnp.asarray(real_records.covariates[real_records.group == "sat-en-100"][0])
    short, verbose = jnp.array([0.0, 0.0, 0.0]), jnp.array([0.0, 2 / 3, 0.0])  # answer-only vs CoT
    assert real_fit.tokens(verbose, x_math) > 5 * real_fit.tokens(short, x_math)
    assert real_fit.quality(verbose, x_math) > real_fit.quality(short, x_math) + 0.04
    assert real_fit.quality(verbose, x_read) < real_fit.quality(short, x_read) - 0.02


@needs_real_data
def test_leave_one_exam_out_with_anchor(real_records):
    report, predictions = calibrate.leave_one_group_out(real_records, anchor_level="answer_only")
    assert report["n_cells"] == 48  # 8 exams x 2 models x 3 unseen verbosity levels
    assert report["token_r2_cell"] > 0.9
    assert report["quality_mae_cell"] < 0.08
    # The per-exam breakdown partitions the pooled cells: its cell-weighted mean is the pooled MAE.
    by_group = report["by_group"]
    assert sorted(by_group) == sorted(set(real_records.group) - {"fewshot-addition"})
    cells = np.array([f["n_cells"] for f in by_group.values()])
    assert cells.sum() == 48
    for key in ("quality_mae_cell", "verbosity_effect_mae"):
        weighted = np.dot(cells, [f[key] for f in by_group.values()]) / cells.sum()
        assert abs(weighted - report[key]) < 1e-9
    fewshot = real_records.group == "fewshot-addition"
    assert np.isnan(predictions.tokens[fewshot]).all()  # never held out


def _synthetic_truth() -> ResponseModel:
    truth = ResponseModel.prior()
    rng = np.random.default_rng(3)
    noise = lambda a, s: jnp.asarray(np.asarray(a) + s * rng.normal(size=np.shape(a)), jnp.float32)  # noqa: E731
    return jax.tree_util.tree_map(lambda a: noise(a, 0.3), truth)


def _sample_records(truth: ResponseModel, n: int, seed: int) -> data.CallRecords:
    rng = np.random.default_rng(seed)
    task = rng.integers(0, len(features.TASK_TYPES), n)
    cov = features.covariates(task, rng.uniform(0, 1, n), rng.uniform(0, 4000, n), rng.uniform(0, 1, n))
    action = rng.uniform(0, 1, (n, 3))
    a, x = jnp.asarray(action, jnp.float32), jnp.asarray(cov, jnp.float32)
    p_med = np.asarray(jax.vmap(truth.prompt_tokens)(a, x))
    c_med = np.asarray(jax.vmap(truth.completion_tokens)(a, x))
    q = np.asarray(jax.vmap(truth.quality)(a, x))
    sp, sc = float(jnp.exp(truth.log_sigma_prompt)), float(jnp.exp(truth.log_sigma_completion))
    trials = np.full(n, 10.0)
    return data.CallRecords(
        action=action,
        covariates=cov,
        prompt_tokens=np.expm1(np.log1p(p_med) + sp * rng.normal(size=n)),
        completion_tokens=np.expm1(np.log1p(c_med) + sc * rng.normal(size=n)),
        trials=trials,
        successes=rng.binomial(10, q).astype(float),
        group=np.array([features.TASK_TYPES[t] for t in task]),
        model=np.full(n, "synthetic"),
        grader=np.full(n, "synthetic"),
    )


def test_fit_recovers_a_known_model_from_its_own_samples():
    truth = _synthetic_truth()
    fitted = calibrate.fit_response_model(_sample_records(truth, 6000, seed=0), steps=600, task_shrinkage=0.0)
    test = _sample_records(truth, 2000, seed=1)
    a, x = jnp.asarray(test.action, jnp.float32), jnp.asarray(test.covariates, jnp.float32)
    t_true, q_true = jax.vmap(truth)(a, x)
    t_fit, q_fit = jax.vmap(fitted)(a, x)
    assert float(jnp.median(jnp.abs(t_fit / t_true - 1))) < 0.05
    assert float(jnp.mean(jnp.abs(q_fit - q_true))) < 0.02
    np.testing.assert_allclose(jnp.exp(fitted.log_sigma_prompt), jnp.exp(truth.log_sigma_prompt), rtol=0.05)


def test_anchor_matches_the_anchor_calls_log_tokens_and_successes():
    truth = _synthetic_truth()
    records = _sample_records(truth, 500, seed=2)
    shifted = calibrate.anchor_to(ResponseModel.prior(), records)
    a, x = jnp.asarray(records.action, jnp.float32), jnp.asarray(records.covariates, jnp.float32)
    log_prompt = np.log1p(np.asarray(jax.vmap(shifted.prompt_tokens)(a, x)))
    assert abs(np.mean(np.log1p(records.prompt_tokens)) - np.mean(log_prompt)) < 0.05
    quality = np.asarray(jax.vmap(shifted.quality)(a, x))
    np.testing.assert_allclose(np.sum(10 * quality), records.successes.sum(), rtol=1e-4)


def test_linear_token_correction_recovers_the_papers_coefficients():
    rng = np.random.default_rng(0)
    simulated = rng.uniform(200, 2000, 630)
    real = 0.3167 * simulated + 85.4 + rng.normal(0, 5, 630)
    slope, intercept = calibrate.fit_linear_correction(simulated, real)
    assert abs(slope - 0.3167) < 0.005 and abs(intercept - 85.4) < 5
    with pytest.raises(ValueError, match="simulated"):
        calibrate.fit_linear_correction(np.ones(5), np.arange(5.0))


def test_response_model_round_trips_through_a_file(tmp_path):
    model = _synthetic_truth()
    path = tmp_path / "model.eqx"
    save(model, path)
    loaded = load(path)
    x = jnp.zeros(features.N_COVARIATES)
    np.testing.assert_array_equal(loaded.tokens(jnp.ones(3) * 0.5, x), model.tokens(jnp.ones(3) * 0.5, x))


def test_response_model_is_monotone_in_tokens():
    model = _synthetic_truth()
    x = jnp.asarray(features.covariates(np.array([2]), 0.5, 800.0, 0.5)[0], jnp.float32)
    for coordinate in range(3):
        grads = jax.vmap(lambda a: jax.grad(model.tokens)(a, x))(
            jax.random.uniform(jax.random.PRNGKey(0), (200, 3))
        )
        assert float(jnp.min(grads[:, coordinate])) >= 0.0


def test_verbosity_prior_sets_the_stated_logit_change_for_its_task_only():
    model = ResponseModel.prior({"data_analysis": 1.2})
    logit_gain = lambda task: float(  # noqa: E731
        model.quality_logit(jnp.array([0.0, 2 / 3, 0.0]), x := jnp.asarray(features.covariates(
            np.array([features.TASK_TYPES.index(task)]), 0.5, 500.0, 0.5)[0], jnp.float32))
        - model.quality_logit(jnp.zeros(3), x)
    )  # fmt: skip

    # Half the gain on each of the first two level steps, through the smooth ramps
    # t [softplus(z / t) - softplus((z - 1) / t)] with z = 3p - k and t = 0.05.
    def ramps(p):
        t, z = 0.05, 3 * p - np.arange(2)
        return t * (np.logaddexp(0, z / t) - np.logaddexp(0, (z - 1) / t))

    steps = ramps(2 / 3).sum() - ramps(0.0).sum()
    assert abs(logit_gain("data_analysis") - 0.6 * steps) < 1e-5
    assert steps > 1.92  # i.e. within 4% of the stated 1.2 at chain of thought
    assert abs(logit_gain("text_writing")) < 1e-3
    with pytest.raises(ValueError, match="verbosity_quality: unknown task type 'maths'"):
        ResponseModel.prior({"maths": 1.0})
    with pytest.raises(ValueError, match="must be finite"):
        ResponseModel.prior({"data_analysis": float("nan")})


@needs_real_data
def test_verbosity_prior_moves_an_uncovered_task_towards_it(real_records):
    """With the maths exam held out, no record varies verbosity on maths: the prior is
    all the fit has, so a stated gain raises the predicted effect; the other exams'
    fit is the data's either way."""
    kwargs = dict(groups=["aqua-rat-100"], anchor_level="answer_only", steps=200)
    plain, _ = calibrate.leave_one_group_out(real_records, **kwargs)
    informed, _ = calibrate.leave_one_group_out(
        real_records, prior=ResponseModel.prior({"data_analysis": 1.0}), **kwargs
    )
    assert informed["verbosity_effect_mae"] < plain["verbosity_effect_mae"] - 0.1


# ---------------------------------------------------------------- bad logs
def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


HEADER = "model,prompt_style,exam,topic,problem_id,problem_chars,prompt_tokens,completion_tokens,samples,sample_accuracy,majority_correct,error\n"  # noqa: E501
GOOD = "gpt-4,concise,sat-en-100,English,1,300,400,600,10,0.8,1,0\n"


def test_bad_csv_rows_are_skipped_with_reasons(tmp_path):
    rows = [
        GOOD,
        "gpt-4,concise,sat-en-100,English,2,300,abc,600,10,0.8,1,0\n",
        "gpt-4,concise,sat-en-100,English,3,300,-5,600,10,0.8,1,0\n",
        "gpt-4,concise,sat-en-100,English,4,300,nan,600,10,0.8,1,0\n",
        "gpt-4,concise,sat-en-100,English,5,300,,600,10,0.8,1,1\n",
        "gpt-4,concise,sat-en-100,English,6,300,400\n",
    ]
    records = data.load(_write(tmp_path, "calls.csv", HEADER + "".join(rows)))
    assert len(records) == 1
    assert records.skipped == {
        "non-numeric prompt_tokens": 1,
        "negative prompt_tokens": 1,
        "non-finite prompt_tokens": 1,
        "api error": 1,
        "truncated row": 1,
    }


def test_unreadable_logs_raise_naming_the_file(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        data.load(_write(tmp_path, "empty.csv", ""))
    with pytest.raises(ValueError, match="lacks columns"):
        data.load(_write(tmp_path, "other.csv", "a,b\n1,2\n"))
    with pytest.raises(ValueError, match="no usable rows"):
        data.load(
            _write(
                tmp_path, "bad.csv", HEADER + "gpt-4,concise,sat-en-100,English,2,300,abc,600,10,0.8,1,0\n"
            )
        )
    with pytest.raises(ValueError, match="no such file"):
        data.load(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match=r"expected a \.csv or \.jsonl"):
        data.load(_write(tmp_path, "calls.txt", "x"))


def _call(**overrides):
    call = {
        "schema": data.CALL_SCHEMA,
        "request_id": "r1",
        "model": "gpt-4o-mini",
        "action": {"context": 0.5, "verbosity": 0.2, "tools": 0.0},
        "state": {"task_type": "code_generation", "context_tokens": 900, "complexity": 0.7},
        "usage": {"prompt_tokens": 812, "completion_tokens": 190, "cached_tokens": 0, "reasoning_tokens": 0},
        "quality": {"score": 1.0, "grader": "unit_tests"},
    }
    call.update(overrides)
    return call


def test_jsonl_truncated_last_line_is_skipped_and_counted(tmp_path):
    lines = [json.dumps(_call(request_id=str(i))) for i in range(3)]
    text = "\n".join(lines) + "\n" + json.dumps(_call())[:40]
    records = data.load(_write(tmp_path, "calls.jsonl", text))
    assert len(records) == 3
    assert records.skipped == {"truncated last line": 1}
    assert records.grader.tolist() == ["unit_tests"] * 3
    np.testing.assert_allclose(records.tokens, 1002.0)


def test_jsonl_bad_records_are_skipped_with_reasons(tmp_path):
    lines = [
        _call(),
        _call(action={"context": 1.5, "verbosity": 0.2, "tools": 0.0}),
        _call(usage={"prompt_tokens": -1, "completion_tokens": 3}),
        _call(state={"task_type": "poetry"}),
        {"model": "x"},
        _call(quality={"score": 2.0, "grader": "judge"}),
    ]
    text = "\n".join(json.dumps(obj) for obj in lines) + "\n{not json}\n" + json.dumps(_call()) + "\n"
    records = data.load(_write(tmp_path, "calls.jsonl", text))
    assert len(records) == 2
    assert records.skipped == {
        "action outside [0, 1]": 1,
        "negative or non-finite tokens": 1,
        "unknown task_type": 1,
        "missing or malformed field": 1,
        "quality outside [0, 1]": 1,
        "invalid JSON line": 1,
    }


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    calls=st.lists(
        st.fixed_dictionaries(
            {
                "c": st.floats(0, 1),
                "p": st.floats(0, 1),
                "u": st.floats(0, 1),
                "prompt": st.integers(0, 100_000),
                "completion": st.integers(0, 100_000),
                "task": st.sampled_from(features.TASK_TYPES),
                "score": st.one_of(st.none(), st.floats(0, 1)),
            }
        ),
        min_size=1,
        max_size=8,
    ),
    garbage=st.lists(st.text(max_size=30), max_size=3),
)
def test_jsonl_parser_property(tmp_path_factory, calls, garbage):
    """Valid calls always come back exactly; garbage lines are skipped, never fitted."""
    lines = []
    for call in calls:
        obj = _call(
            action={"context": call["c"], "verbosity": call["p"], "tools": call["u"]},
            usage={"prompt_tokens": call["prompt"], "completion_tokens": call["completion"]},
            state={"task_type": call["task"]},
        )
        obj.pop("quality")
        if call["score"] is not None:
            obj["quality"] = {"score": call["score"], "grader": "judge"}
        lines.append(json.dumps(obj))
    junk = [g.replace("\n", " ").replace("\r", " ") for g in garbage if g.strip()]
    path = tmp_path_factory.mktemp("logs") / "calls.jsonl"
    path.write_text("\n".join(junk + lines) + "\n")
    records = data.load_jsonl(path)
    assert len(records) == len(calls)
    assert records.n_skipped <= len(junk)
    np.testing.assert_allclose(records.action, [[c["c"], c["p"], c["u"]] for c in calls])
    np.testing.assert_allclose(records.prompt_tokens, [c["prompt"] for c in calls])
    labelled = [c["score"] is not None for c in calls]
    np.testing.assert_array_equal(records.trials > 0, labelled)
