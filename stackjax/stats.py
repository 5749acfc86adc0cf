"""Statistics for comparing a treatment with a control (generic, no LLM knowledge)."""

import dataclasses

import numpy as np
from scipy import stats as _stats


@dataclasses.dataclass(frozen=True)
class NonInferiority:
    """Result of a one-sided Welch non-inferiority test.

    Attributes:
        difference: mean(treatment) - mean(control).
        margin: the largest loss still called non-inferior.
        lower_bound: one-sided (1 - alpha) lower confidence bound of the difference.
        p_value: for H0: difference <= -margin.
        non_inferior: `p_value < alpha` (equivalently `lower_bound > -margin`).
        alpha: the test's level.
    """

    difference: float
    margin: float
    lower_bound: float
    p_value: float
    non_inferior: bool
    alpha: float


def welch_noninferiority(treatment, control, *, margin: float, alpha: float = 0.05) -> NonInferiority:
    """Is the treatment's mean no worse than the control's by more than `margin`?

    One-sided Welch t-test of H0: mean(treatment) - mean(control) <= -margin
    against H1: the difference > -margin (higher is better).

    Arguments:
        treatment, control: 1-d samples (higher is better).
        margin: the non-inferiority margin (> 0), in the samples' units.
        alpha: significance level.

    Returns:
        A `NonInferiority`.
    """
    t, c = np.asarray(treatment, float), np.asarray(control, float)
    if t.ndim != 1 or c.ndim != 1 or t.size < 2 or c.size < 2:
        raise ValueError("treatment, control: expected 1-d samples of at least 2 values")
    if not (np.isfinite(t).all() and np.isfinite(c).all()):
        raise ValueError("treatment, control: samples must be finite")
    if not margin > 0:
        raise ValueError(f"margin: must be > 0, got {margin}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha: must lie in (0, 1), got {alpha}")
    vt, vc = t.var(ddof=1) / t.size, c.var(ddof=1) / c.size
    se = np.sqrt(vt + vc)
    diff = t.mean() - c.mean()
    dof = (vt + vc) ** 2 / (vt**2 / (t.size - 1) + vc**2 / (c.size - 1)) if se > 0 else np.inf
    if se == 0:
        p = 0.0 if diff > -margin else 1.0
        lower = diff
    else:
        p = float(_stats.t.sf((diff + margin) / se, dof))
        lower = float(diff - _stats.t.ppf(1 - alpha, dof) * se)
    return NonInferiority(float(diff), float(margin), lower, p, bool(p < alpha), float(alpha))
