"""The conditional response model: expected tokens T(a, x) and quality Q(a, x).

Every head is linear in `[1, covariates]`, so task type, model tier, context size
and complexity shift both the level and the effect of each action coordinate.

- Prompt tokens `P = exp(b.x + sum_k softplus(v_k.x) r_k(p)) + exp(w_c.x) c + exp(w_u.x) u`:
  non-decreasing in c, p and u.
- Completion tokens per answer `C = exp(g.x + sum_k softplus(h_k.x) r_k(p) + softplus(h_u.x) u)`:
  non-decreasing in p and u.
- Quality `Q = sigmoid(q.x + sum_k (s_k.x) r_k(p) + (s_c.x)(1 - exp(-c / 0.15)) + (s_u.x) u)`: in
  (0, 1), saturating in context, and free to rise or fall with verbosity per task
  (verbosity helps maths and hurts elsewhere in the real data).

`r_k(p)` are smooth ramps between the four verbosity levels (p = 0, 1/3, 2/3, 1),
so the model is smooth in the action. Observed tokens are log-normal around P and C
(scales `sigma_prompt`, `sigma_completion`); `tokens` returns the expected total.
"""

from collections.abc import Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._io import atomic_write
from . import features

N_RAMPS = 3
_RAMP_SHARPNESS = 0.05
_CONTEXT_SATURATION = 0.15
_K = features.N_COVARIATES + 1  # covariates plus an intercept


def _ramps(p: Float[Array, ""]) -> Float[Array, " 3"]:
    """Smooth 0->1 ramps across the three gaps between verbosity levels."""
    z = 3.0 * p - jnp.arange(N_RAMPS, dtype=p.dtype)
    t = _RAMP_SHARPNESS
    return t * (jax.nn.softplus(z / t) - jax.nn.softplus((z - 1.0) / t))


def _design(x: Float[Array, " f"]) -> Float[Array, " k"]:
    return jnp.concatenate([jnp.ones((1,), x.dtype), x])


def _intercept(value: float) -> np.ndarray:
    out = np.zeros(_K, dtype=np.float32)
    out[0] = value
    return out


class ResponseModel(eqx.Module):
    """Expected tokens and quality of an LLM call given the action and covariates.

    Build a fitted one with `stackjax.governance.fit_response_model`; `ResponseModel.prior()`
    gives the starting point (and the prior mean of the MAP fit).
    """

    prompt_base: Float[Array, " k"]
    prompt_verbosity: Float[Array, "3 k"]
    prompt_context: Float[Array, " k"]
    prompt_tools: Float[Array, " k"]
    completion_base: Float[Array, " k"]
    completion_verbosity: Float[Array, "3 k"]
    completion_tools: Float[Array, " k"]
    quality_base: Float[Array, " k"]
    quality_verbosity: Float[Array, "3 k"]
    quality_context: Float[Array, " k"]
    quality_tools: Float[Array, " k"]
    log_sigma_prompt: Float[Array, ""]
    log_sigma_completion: Float[Array, ""]

    @classmethod
    def prior(cls, verbosity_quality: Mapping[str, float] | None = None) -> "ResponseModel":
        """A plausible model before any data, from the paper's probe findings.

        ~300 prompt and ~100 completion tokens at the lowest settings, each verbosity
        level multiplying completions by about 2.7, full tools multiplying them by 3.1
        (tool restriction cut tokens 68%) and adding ~0.25 quality. Verbosity has no
        effect on quality unless stated.

        Arguments:
            verbosity_quality: optional prior belief per task type (a name in
                `features.TASK_TYPES`): the change in quality logit from answer-only to
                chain of thought, split evenly over those two steps. It is domain
                knowledge for task types the logs do not cover; the fit pulls each task's
                own effect towards it (`fit_response_model(prior=...)`).
        """
        zeros = np.zeros(_K, np.float32)
        ramp = lambda v: np.stack([_intercept(v)] * N_RAMPS)  # noqa: E731
        quality_verbosity = ramp(0.0)
        for task, logit in (verbosity_quality or {}).items():
            if task not in features.TASK_TYPES:
                raise ValueError(
                    f"verbosity_quality: unknown task type {task!r}; expected one of {features.TASK_TYPES}"
                )
            if not np.isfinite(logit):
                raise ValueError(f"verbosity_quality: the value for {task!r} must be finite, got {logit}")
            quality_verbosity[:2, 1 + features.TASK_TYPES.index(task)] = logit / 2.0
        return cls(
            prompt_base=jnp.asarray(_intercept(np.log(300.0))),
            prompt_verbosity=jnp.asarray(ramp(-2.0)),
            prompt_context=jnp.asarray(_intercept(np.log(400.0))),
            prompt_tools=jnp.asarray(_intercept(np.log(200.0))),
            completion_base=jnp.asarray(_intercept(np.log(100.0))),
            completion_verbosity=jnp.asarray(ramp(0.6)),
            completion_tools=jnp.asarray(_intercept(0.72)),
            quality_base=jnp.asarray(_intercept(1.0)),
            quality_verbosity=jnp.asarray(quality_verbosity),
            quality_context=jnp.asarray(zeros),
            quality_tools=jnp.asarray(_intercept(1.2)),
            log_sigma_prompt=jnp.asarray(np.log(0.3), jnp.float32),
            log_sigma_completion=jnp.asarray(np.log(0.5), jnp.float32),
        )

    def prompt_tokens(self, action: Float[Array, " 3"], x: Float[Array, " f"]) -> Float[Array, ""]:
        """Median prompt tokens."""
        d, r = _design(x), _ramps(action[1])
        verbose = jnp.dot(jax.nn.softplus(self.prompt_verbosity @ d), r)
        return (
            jnp.exp(self.prompt_base @ d + verbose)
            + jnp.exp(self.prompt_context @ d) * action[0]
            + jnp.exp(self.prompt_tools @ d) * action[2]
        )

    def completion_tokens(self, action: Float[Array, " 3"], x: Float[Array, " f"]) -> Float[Array, ""]:
        """Median completion tokens per answer."""
        d, r = _design(x), _ramps(action[1])
        verbose = jnp.dot(jax.nn.softplus(self.completion_verbosity @ d), r)
        tools = jax.nn.softplus(self.completion_tools @ d) * action[2]
        return jnp.exp(self.completion_base @ d + verbose + tools)

    def quality_logit(self, action: Float[Array, " 3"], x: Float[Array, " f"]) -> Float[Array, ""]:
        d, r = _design(x), _ramps(action[1])
        context = 1.0 - jnp.exp(-action[0] / _CONTEXT_SATURATION)
        return (
            self.quality_base @ d
            + jnp.dot(self.quality_verbosity @ d, r)
            + (self.quality_context @ d) * context
            + (self.quality_tools @ d) * action[2]
        )

    def quality(self, action: Float[Array, " 3"], x: Float[Array, " f"]) -> Float[Array, ""]:
        """Expected quality in (0, 1)."""
        return jax.nn.sigmoid(self.quality_logit(action, x))

    def tokens(self, action: Float[Array, " 3"], x: Float[Array, " f"]) -> Float[Array, ""]:
        """Expected total tokens per answer (log-normal means of prompt and completion)."""
        sp2 = jnp.exp(2 * self.log_sigma_prompt) / 2
        sc2 = jnp.exp(2 * self.log_sigma_completion) / 2
        return self.prompt_tokens(action, x) * jnp.exp(sp2) + self.completion_tokens(action, x) * jnp.exp(sc2)

    def __call__(self, action: Float[Array, " 3"], x: Float[Array, " f"]) -> tuple[Array, Array]:
        """`(expected tokens, expected quality)`."""
        return self.tokens(action, x), self.quality(action, x)


def save(model: ResponseModel, path) -> None:
    """Write a response model to `path` (equinox leaf serialisation, atomically)."""
    atomic_write(path, lambda handle: eqx.tree_serialise_leaves(handle, model))


def load(path) -> ResponseModel:
    """Read a response model written by `save`."""
    return eqx.tree_deserialise_leaves(path, ResponseModel.prior())


CALIBRATED_FILE = "calibrated_response.eqx"


def calibrated() -> ResponseModel:
    """The response model fitted to the real API logs (`../shared/data/real-api`), shipped with stackjax.

    Regenerate it with `stackjax calibrate --data concise_cot_calls.csv --data
    fewshot_addition_calls_gpt35.csv --out stackjax/governance/calibrated_response.eqx`;
    a test checks that doing so reproduces the shipped file.
    """
    from importlib import resources

    with resources.as_file(resources.files(__package__) / CALIBRATED_FILE) as path:
        return load(path)
