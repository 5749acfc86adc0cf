"""The end-to-end demonstration: calibrated simulator -> trained controller -> A/B against baselines.

Used by `stackjax demo`. Everything runs on the response model calibrated on real
API logs (shipped with stackjax): this is a simulation of an agent's sessions, not
calls to a real API.
"""

import dataclasses
import time

import equinox as eqx
import jax
import numpy as np

from .. import stats
from . import response, session
from .game import DEFAULT_CONFIG, GameConfig

MARGIN = 0.02


@dataclasses.dataclass
class ControllerResult:
    name: str
    tokens: np.ndarray  # sampled tokens per turn, (sessions * turns,)
    quality: np.ndarray  # sampled graded quality per turn
    converged: float  # share of follower solves that converged

    @property
    def mean_tokens(self) -> float:
        return float(self.tokens.mean())

    @property
    def mean_quality(self) -> float:
        return float(self.quality.mean())


@dataclasses.dataclass
class DemoResult:
    results: dict[str, ControllerResult]
    train_seconds: float
    train_losses: np.ndarray
    policy: session.LeaderPolicy

    def token_change(self, name: str, baseline: str = "conservative") -> float:
        return self.results[name].mean_tokens / self.results[baseline].mean_tokens - 1.0

    def noninferiority(self, name: str, baseline: str = "conservative") -> stats.NonInferiority:
        return stats.welch_noninferiority(
            self.results[name].quality, self.results[baseline].quality, margin=MARGIN
        )


def compare_controllers(controllers: dict, model, states, turns: int, *, key, config: GameConfig):
    """Sampled per-turn outcomes of each controller on the same sessions and random draws."""
    out = {}
    for name, controller in controllers.items():
        record, _ = eqx.filter_jit(
            lambda c, s: session.rollout(c, model, s, turns, config=config, key=key, sample=True)
        )(controller, states)
        out[name] = ControllerResult(
            name,
            np.asarray(record.tokens).reshape(-1),
            np.asarray(record.quality).reshape(-1),
            float(np.mean(np.asarray(record.converged))),
        )
    return out


def run(
    *,
    train_sessions: int = 512,
    steps: int = 300,
    eval_sessions: int = 1000,
    turns: int = 3,
    seed: int = 0,
    config: GameConfig = DEFAULT_CONFIG,
    progress: bool = True,
) -> DemoResult:
    """Train a task-aware leader policy on the calibrated simulator and A/B it against the baselines.

    Arguments:
        train_sessions: sessions per training batch (fresh each step).
        steps: training steps.
        eval_sessions: fresh sessions for the comparison (each plays `turns` turns).
        turns: turns per session.
        seed: fixes training and evaluation draws.
        config: the game.
        progress: show a progress bar while training.
    """
    model = response.calibrated()
    key_policy, key_eval_states, key_eval_draws = jax.random.split(jax.random.PRNGKey(seed), 3)
    policy = session.LeaderPolicy(key_policy, config)
    start = time.perf_counter()
    policy, losses = session.train_policy(
        policy,
        model,
        config=config,
        steps=steps,
        sessions=train_sessions,
        turns=turns,
        seed=seed,
        progress=progress,
    )
    seconds = time.perf_counter() - start
    states = session.sample_sessions(key_eval_states, eval_sessions, turns=turns)
    controllers = {**session.fixed_baselines(), "stackjax policy": policy}
    results = compare_controllers(controllers, model, states, turns, key=key_eval_draws, config=config)
    return DemoResult(results, seconds, losses, policy)


def format_table(result: DemoResult) -> str:
    """A markdown table: tokens, quality, efficiency and the change against the conservative baseline."""
    lines = [
        "| controller | tokens/turn | quality | quality per 1k tokens | tokens vs conservative | "
        f"quality non-inferior (margin {MARGIN}, one-sided Welch p) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in result.results.items():
        if name == "conservative":
            change, test = "-", "-"
        else:
            ni = result.noninferiority(name)
            change = f"{100 * result.token_change(name):+.1f}%"
            test = f"{'yes' if ni.non_inferior else 'no'} (diff {ni.difference:+.4f}, p = {ni.p_value:.2g})"
        efficiency = 1000 * r.mean_quality / r.mean_tokens
        lines.append(
            f"| {name} | {r.mean_tokens:.1f} | {r.mean_quality:.4f} | {efficiency:.3f} | {change} | {test} |"
        )
    return "\n".join(lines)


def plot(result: DemoResult, path) -> None:
    """Tokens against quality per controller (mean and 95% interval), saved to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .._io import atomic_write

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, r in result.results.items():
        n = r.tokens.size
        left.errorbar(
            r.mean_tokens,
            r.mean_quality,
            xerr=1.96 * r.tokens.std(ddof=1) / np.sqrt(n),
            yerr=1.96 * r.quality.std(ddof=1) / np.sqrt(n),
            fmt="o",
            capsize=3,
            label=name,
        )
    left.set_xlabel("mean tokens per turn")
    left.set_ylabel("mean graded quality")
    left.set_title("controllers on fresh simulated sessions")
    left.legend(fontsize=8)
    utility = -result.train_losses
    window = max(1, min(25, utility.size // 5))
    smoothed = np.convolve(utility, np.ones(window) / window, mode="valid")
    right.plot(utility, color="0.8", lw=0.8, label="per batch (fresh sessions)")
    right.plot(np.arange(window - 1, utility.size), smoothed, label=f"moving mean of {window}")
    right.set_xlabel("training step")
    right.set_ylabel("mean leader utility")
    right.legend(fontsize=8)
    right.set_title("training through the implicit best response")
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=120))
    plt.close(fig)
