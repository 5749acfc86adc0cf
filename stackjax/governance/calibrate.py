"""Fit the response model to real call logs, and measure how well it predicts unseen tasks.

Maximum a posteriori: log-normal likelihood for prompt and completion tokens,
binomial for graded answers, and a weak Gaussian prior around
`ResponseModel.prior()` (it pins down effects the data never varies, such as tools
in logs without tool use). Optimised by L-BFGS (optax), compiled once per data
shape: cross-validation folds reuse one compilation by masking rows with weights.
"""

import dataclasses
from collections import defaultdict

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._optim import lbfgs_minimise
from . import features
from .data import CallRecords
from .response import ResponseModel

TASK_SHRINKAGE = 0.01


def _arrays(records: CallRecords) -> dict[str, jax.Array]:
    return {
        "action": jnp.asarray(records.action, jnp.float32),
        "covariates": jnp.asarray(records.covariates, jnp.float32),
        "log_prompt": jnp.asarray(np.log1p(records.prompt_tokens), jnp.float32),
        "log_completion": jnp.asarray(np.log1p(records.completion_tokens), jnp.float32),
        "trials": jnp.asarray(records.trials, jnp.float32),
        "successes": jnp.asarray(records.successes, jnp.float32),
    }


def negative_log_posterior(
    model: ResponseModel,
    data: dict,
    weights: jax.Array,
    prior: ResponseModel,
    prior_strength: float,
    task_shrinkage: float,
) -> jax.Array:
    """Mean negative log-likelihood per call plus the Gaussian prior penalties."""
    a, x = data["action"], data["covariates"]
    log_p = jnp.log1p(jax.vmap(model.prompt_tokens)(a, x))
    log_c = jnp.log1p(jax.vmap(model.completion_tokens)(a, x))
    sp, sc = model.log_sigma_prompt, model.log_sigma_completion
    token_nll = (
        0.5 * ((data["log_prompt"] - log_p) / jnp.exp(sp)) ** 2
        + sp
        + 0.5 * ((data["log_completion"] - log_c) / jnp.exp(sc)) ** 2
        + sc
    )
    logits = jax.vmap(model.quality_logit)(a, x)
    # -[k log s(z) + (n - k) log(1 - s(z))] = n softplus(z) - k z
    quality_nll = data["trials"] * jax.nn.softplus(logits) - data["successes"] * logits
    total = jnp.sum(weights * (token_nll + quality_nll)) / jnp.maximum(jnp.sum(weights), 1.0)
    diffs = jax.tree_util.tree_map(lambda m, p: jnp.sum((m - p) ** 2), model, prior)
    # Task-specific verbosity effects on quality shrink towards the shared effect (plus
    # any stated prior belief): with one or two exams per task type they otherwise fit
    # each exam's noise.
    tasks = slice(1, 1 + len(features.TASK_TYPES))
    task_effects = model.quality_verbosity[:, tasks] - prior.quality_verbosity[:, tasks]
    return (
        total
        + prior_strength * sum(jax.tree_util.tree_leaves(diffs))
        + task_shrinkage * jnp.sum(task_effects**2)
    )


@eqx.filter_jit
def _fit(init, data, weights, prior, prior_strength, task_shrinkage, steps: int):
    loss = lambda m: negative_log_posterior(m, data, weights, prior, prior_strength, task_shrinkage)  # noqa: E731
    return lbfgs_minimise(loss, init, steps)


def fit_response_model(
    records: CallRecords,
    *,
    steps: int = 400,
    prior_strength: float = 1e-3,
    task_shrinkage: float = TASK_SHRINKAGE,
    weights: np.ndarray | None = None,
    init: ResponseModel | None = None,
    prior: ResponseModel | None = None,
) -> ResponseModel:
    """Fit a `ResponseModel` to call records by maximum a posteriori.

    Arguments:
        records: calls from `stackjax.governance.data.load`.
        steps: L-BFGS iterations.
        prior_strength: weight of the Gaussian prior around `ResponseModel.prior()`.
        task_shrinkage: weight of the extra prior pulling each task type's own
            verbosity effect on quality towards the shared one.
        weights: optional per-row weights (0 drops a row); default all ones.
        init: starting model (default: the prior).
        prior: the prior mean (default `ResponseModel.prior()`; pass
            `ResponseModel.prior(verbosity_quality=...)` to state beliefs about task
            types the records do not cover).

    Returns:
        The fitted model.
    """
    if len(records) == 0:
        raise ValueError("records: no calls to fit")
    if steps < 1:
        raise ValueError(f"steps: must be >= 1, got {steps}")
    w = np.ones(len(records)) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != (len(records),) or np.any(w < 0) or not np.isfinite(w).all():
        raise ValueError("weights: expected one finite, non-negative weight per record")
    prior = ResponseModel.prior() if prior is None else prior
    model, values = _fit(
        init or prior,
        _arrays(records),
        jnp.asarray(w, jnp.float32),
        prior,
        prior_strength,
        task_shrinkage,
        steps,
    )
    if not bool(jnp.isfinite(values[-1])):
        raise FloatingPointError("fit_response_model: the objective became non-finite; check the records")
    return model


@dataclasses.dataclass
class Predictions:
    """Per-call predictions beside the observations they are compared with."""

    tokens: np.ndarray
    quality: np.ndarray


def predict(model: ResponseModel, records: CallRecords) -> Predictions:
    """Expected tokens per answer and expected quality for every call."""
    data = _arrays(records)
    tokens, quality = jax.jit(jax.vmap(model))(data["action"], data["covariates"])
    return Predictions(np.asarray(tokens, dtype=float), np.asarray(quality, dtype=float))


def _r2(observed: np.ndarray, predicted: np.ndarray) -> float:
    observed, predicted = np.asarray(observed, float), np.asarray(predicted, float)
    total = np.sum((observed - observed.mean()) ** 2)
    return float(1.0 - np.sum((observed - predicted) ** 2) / total) if total > 0 else float("nan")


def calibration_report(records: CallRecords, predictions: Predictions) -> dict[str, float]:
    """Cell-level and per-call agreement between predictions and observations.

    Cells are (group x model x verbosity level x context share). Returns a dict with
    `token_r2_cell`, `quality_mae_cell`, `verbosity_effect_mae` (per cell, the change
    in quality from answer-only, predicted vs observed), `token_r2_call`,
    `quality_r2_call`, `n_calls`, `n_cells` and `n_skipped`.
    """
    cells = records.cells()
    labelled = records.trials > 0
    acc = records.accuracy
    obs_t, pred_t, obs_q, pred_q, keys = [], [], [], [], []
    for cell in np.unique(cells):
        rows = cells == cell
        obs_t.append(records.tokens[rows].mean())
        pred_t.append(predictions.tokens[rows].mean())
        q_rows = rows & labelled
        obs_q.append(acc[q_rows].mean() if q_rows.any() else np.nan)
        pred_q.append(predictions.quality[q_rows].mean() if q_rows.any() else np.nan)
        keys.append(cell.split("|"))
    obs_q, pred_q = np.array(obs_q), np.array(pred_q)
    effects = defaultdict(dict)
    for (group, model, level, ctx), o, p in zip(keys, obs_q, pred_q, strict=True):
        effects[(group, model, ctx)][level] = (o, p)
    effect_errors = []
    for levels in effects.values():
        if "answer_only" not in levels:
            continue
        o0, p0 = levels["answer_only"]
        for name, (o, p) in levels.items():
            if name != "answer_only" and np.isfinite(o) and np.isfinite(o0):
                effect_errors.append(abs((p - p0) - (o - o0)))
    have_q = np.isfinite(obs_q)
    return {
        "token_r2_cell": _r2(obs_t, pred_t),
        "quality_mae_cell": float(np.mean(np.abs(obs_q[have_q] - pred_q[have_q])))
        if have_q.any()
        else float("nan"),
        "verbosity_effect_mae": float(np.mean(effect_errors)) if effect_errors else float("nan"),
        "token_r2_call": _r2(records.tokens, predictions.tokens),
        "quality_r2_call": _r2(acc[labelled], predictions.quality[labelled])
        if labelled.any()
        else float("nan"),
        "n_calls": len(records),
        "n_cells": len(keys),
        "n_skipped": records.n_skipped,
    }


def anchor_to(model: ResponseModel, anchor: CallRecords) -> ResponseModel:
    """Shift the model's three intercepts so that it matches a new task's anchor calls.

    A new task's overall difficulty and length are not predictable from its type
    alone; one batch of calls at a known action (e.g. the default, answer-only)
    fixes them. Everything else (the effect of each action, of the model tier, ...)
    stays as fitted. Prompt and completion tokens are rescaled so that their mean
    log matches the anchor's; the quality offset solves `sum n sigmoid(z + d) = sum k`.

    Arguments:
        model: a fitted response model.
        anchor: the new task's calls at its anchor action(s).

    Returns:
        The shifted model (use it for that task only).
    """
    if len(anchor) == 0:
        raise ValueError("anchor: no calls")
    data = _arrays(anchor)
    a, x = data["action"], data["covariates"]
    prompt = np.asarray(jax.vmap(model.prompt_tokens)(a, x), dtype=float)
    completion = np.asarray(jax.vmap(model.completion_tokens)(a, x), dtype=float)
    z = np.asarray(jax.vmap(model.quality_logit)(a, x), dtype=float)
    n, k = np.asarray(data["trials"], float), np.asarray(data["successes"], float)

    def log_scale(median, observed_log):
        # Solve mean(log1p(e^d * median)) = mean(observed log1p) for d.
        target = float(np.mean(observed_log))
        return _newton_1d(lambda d: np.mean(np.log1p(np.exp(d) * median)) - target,
                          lambda d: np.mean(np.exp(d) * median / (1 + np.exp(d) * median)))  # fmt: skip

    d_prompt = log_scale(prompt, np.asarray(data["log_prompt"]))
    d_completion = log_scale(completion, np.asarray(data["log_completion"]))
    d_quality = 0.0
    if n.sum() > 0:
        target = np.clip(k.sum(), 0.5, n.sum() - 0.5)  # keep the offset finite at 0% or 100%
        sig = lambda d: 1.0 / (1.0 + np.exp(-(z + d)))  # noqa: E731
        d_quality = _newton_1d(
            lambda d: np.sum(n * sig(d)) - target, lambda d: np.sum(n * sig(d) * (1 - sig(d)))
        )

    # Prompt tokens scale as a whole: every additive part gets the same log offset.
    return eqx.tree_at(
        lambda m: (m.prompt_base, m.prompt_context, m.prompt_tools, m.completion_base, m.quality_base),
        model,
        tuple(
            arr.at[0].add(by)
            for arr, by in (
                (model.prompt_base, d_prompt),
                (model.prompt_context, d_prompt),
                (model.prompt_tools, d_prompt),
                (model.completion_base, d_completion),
                (model.quality_base, d_quality),
            )
        ),
    )


def _newton_1d(f, df, x0: float = 0.0, steps: int = 60) -> float:
    x = x0
    for _ in range(steps):
        step = f(x) / max(df(x), 1e-12)
        x -= float(np.clip(step, -5.0, 5.0))
        if abs(step) < 1e-10:
            break
    return float(x)


def _anchor_rows(records: CallRecords, anchor_level: str | None) -> np.ndarray:
    from . import actions

    if anchor_level is None:
        return np.zeros(len(records), bool)
    if anchor_level not in actions.VERBOSITY_LEVELS:
        raise ValueError(f"anchor_level: expected one of {actions.VERBOSITY_LEVELS}, got {anchor_level!r}")
    level = actions.VERBOSITY_LEVELS.index(anchor_level)
    return actions.verbosity_level(records.action[:, 1]) == level


def _predict_deployments(model: ResponseModel, records: CallRecords, anchor_rows: np.ndarray) -> Predictions:
    """Predict every row; with anchor rows, each (group, model) pair is first anchored on its own."""
    tokens = np.full(len(records), np.nan)
    quality = np.full(len(records), np.nan)
    for group in np.unique(records.group):
        for name in np.unique(records.model):
            rows = (records.group == group) & (records.model == name)
            if not rows.any():
                continue
            anchor = rows & anchor_rows
            fitted = anchor_to(model, records.subset(anchor)) if anchor.any() else model
            predictions = predict(fitted, records.subset(rows))
            tokens[rows], quality[rows] = predictions.tokens, predictions.quality
    return Predictions(tokens, quality)


def _unseen_report(records: CallRecords, predictions: Predictions, anchor_rows: np.ndarray) -> dict:
    """`calibration_report` over the non-anchor rows; verbosity effects (differences to
    answer-only) over all rows, since they need the anchor cells too."""
    unseen = ~anchor_rows
    report = calibration_report(
        records.subset(unseen), Predictions(predictions.tokens[unseen], predictions.quality[unseen])
    )
    report["verbosity_effect_mae"] = calibration_report(records, predictions)["verbosity_effect_mae"]
    return report


GROUP_KEYS = ("token_r2_cell", "quality_mae_cell", "verbosity_effect_mae", "n_cells", "n_calls")


def _report_by_group(records: CallRecords, predictions: Predictions, anchor_rows: np.ndarray) -> dict:
    """`_unseen_report` of each group (exam) on its own: where the pooled error comes from."""
    out = {}
    for group in np.unique(records.group):
        rows = records.group == group
        if not (rows & ~anchor_rows).any():
            continue
        sub = Predictions(predictions.tokens[rows], predictions.quality[rows])
        report = _unseen_report(records.subset(rows), sub, anchor_rows[rows])
        out[str(group)] = {k: report[k] for k in GROUP_KEYS}
    return out


def evaluate_held_out(
    model: ResponseModel, records: CallRecords, *, anchor_level: str | None = None
) -> tuple[dict[str, float], Predictions]:
    """Figures of a fitted model on tasks it never saw.

    Arguments:
        model: the fitted response model.
        records: the held-out calls.
        anchor_level: if set, each (task, model)'s calls at this verbosity level anchor
            its intercepts (`anchor_to`) and the cell and per-call figures cover only
            its other rows.

    Returns:
        The `calibration_report` (plus `by_group`: the cell figures of each task on its
        own) and the per-call predictions.
    """
    anchor_rows = _anchor_rows(records, anchor_level)
    predictions = _predict_deployments(model, records, anchor_rows)
    report = _unseen_report(records, predictions, anchor_rows)
    report["by_group"] = _report_by_group(records, predictions, anchor_rows)
    return report, predictions


def leave_one_group_out(
    records: CallRecords,
    *,
    groups: list[str] | None = None,
    steps: int = 400,
    prior_strength: float = 1e-3,
    task_shrinkage: float = TASK_SHRINKAGE,
    anchor_level: str | None = None,
    prior: ResponseModel | None = None,
    progress: bool = False,
) -> tuple[dict[str, float], Predictions]:
    """Hold out each group (exam) in turn, fit on the rest, predict it; pool the held-out predictions.

    Arguments:
        records: all calls.
        groups: the groups to hold out (default: every group with at least two
            verbosity levels, i.e. every exam of the prompt-style data). Other groups
            always stay in training.
        steps, prior_strength, task_shrinkage, prior: as for `fit_response_model`.
        anchor_level: if set (e.g. "answer_only"), each held-out (exam, model)'s calls
            at that verbosity level anchor its intercepts (`anchor_to`), and the cell
            and per-call figures cover only its other cells, which stay unseen.
        progress: show a progress bar.

    Returns:
        The `calibration_report` of the pooled held-out predictions, restricted to
        the held-out rows (minus anchor rows), with `by_group` (each exam's cell
        figures on its own), and the per-call predictions (NaN for rows never
        predicted).
    """
    anchor_rows = _anchor_rows(records, anchor_level)
    if groups is None:
        levels = defaultdict(set)
        for g, p in zip(records.group, records.action[:, 1], strict=True):
            levels[g].add(round(float(p), 3))
        groups = sorted(g for g, v in levels.items() if len(v) > 1)
    unknown = sorted(set(groups) - set(records.group))
    if unknown:
        raise ValueError(f"groups: not in the records: {unknown}")
    tokens = np.full(len(records), np.nan)
    quality = np.full(len(records), np.nan)
    iterator = groups
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(groups, desc="leave-one-exam-out")
    for group in iterator:
        held_out = records.group == group
        model = fit_response_model(
            records,
            steps=steps,
            prior_strength=prior_strength,
            task_shrinkage=task_shrinkage,
            weights=(~held_out).astype(float),
            prior=prior,
        )
        # A deployment is a (task, model) pair: each is anchored on its own calls.
        predictions = _predict_deployments(model, records.subset(held_out), anchor_rows[held_out])
        tokens[held_out], quality[held_out] = predictions.tokens, predictions.quality
    held = np.isin(records.group, groups)
    pooled = Predictions(tokens[held], quality[held])
    report = _unseen_report(records.subset(held), pooled, anchor_rows[held])
    report["by_group"] = _report_by_group(records.subset(held), pooled, anchor_rows[held])
    tokens[anchor_rows], quality[anchor_rows] = np.nan, np.nan
    return report, Predictions(tokens, quality)


def fit_linear_correction(simulated: np.ndarray, real: np.ndarray) -> tuple[float, float]:
    """Least-squares `real ~ slope * simulated + intercept` (the paper fitted 0.3167, 85.4).

    Returns:
        `(slope, intercept)`.
    """
    simulated, real = np.asarray(simulated, float), np.asarray(real, float)
    if simulated.shape != real.shape or simulated.ndim != 1 or simulated.size < 2:
        raise ValueError("simulated, real: expected two 1-d arrays of the same length >= 2")
    if not (np.isfinite(simulated).all() and np.isfinite(real).all()):
        raise ValueError("simulated, real: must be finite")
    if np.ptp(simulated) == 0:
        raise ValueError("simulated: needs at least two distinct values")
    slope, intercept = np.polyfit(simulated, real, 1)
    return float(slope), float(intercept)


def apply_linear_correction(tokens, slope: float, intercept: float):
    """`slope * tokens + intercept`, the paper's global sim-to-real token correction."""
    return slope * tokens + intercept
