"""Task types, model tiers and the covariates the response model reads.

The response model sees one covariate vector per call or turn:
`[task one-hot (6), model tier, context size, complexity]`. `covariates` builds it
from named values, so logs, real-data loaders and simulated sessions share one
definition.
"""

import numpy as np

TASK_TYPES = (
    "casual_chat",
    "simple_qa",
    "text_writing",
    "code_generation",
    "data_analysis",
    "complex_reasoning",
)
COVARIATE_NAMES = (*(f"task_{t}" for t in TASK_TYPES), "model_tier", "context_size", "complexity")
N_COVARIATES = len(COVARIATE_NAMES)

# Model names seen in logs -> tier in [0, 1] (0: small/cheap, 1: frontier).
MODEL_TIERS = {
    "gpt-35-turbo": 0.0,
    "gpt-3.5-turbo": 0.0,
    "gpt-3.5-turbo-0301": 0.0,
    "gpt-4": 1.0,
    "gpt-4o": 1.0,
    "gpt-4o-mini": 0.3,
    "stackjax-surrogate": 0.5,
}

# The real-data exams as task types. A judgement call, documented: maths word
# problems and sums are data analysis, logic and law reasoning are complex
# reasoning, reading/sentence completion is text work, factual multiple choice is QA.
EXAM_TASK = {
    "aqua-rat-100": "data_analysis",
    "logiqa-en-100": "complex_reasoning",
    "lsat-lr-100": "complex_reasoning",
    "lsat-rc-100": "text_writing",
    "sat-en-100": "text_writing",
    "arc-challenge-test-100": "simple_qa",
    "hellaswag_val-100": "casual_chat",
    "medmcqa-dev-100": "simple_qa",
    "fewshot-addition": "data_analysis",
}


def model_tier(model: str) -> float:
    """Tier of a model name: known names from `MODEL_TIERS`, 'gpt-4*' -> 1, else 0.5."""
    if model in MODEL_TIERS:
        return MODEL_TIERS[model]
    return 1.0 if model.startswith("gpt-4") else 0.5


def context_size(tokens: np.ndarray) -> np.ndarray:
    """A bounded transform of the task's own context length in tokens."""
    return np.log1p(np.maximum(np.asarray(tokens, dtype=float), 0.0) / 500.0)


def covariates(
    task: np.ndarray,
    tier: np.ndarray,
    context_tokens: np.ndarray,
    complexity: np.ndarray,
) -> np.ndarray:
    """Stack named values into covariate rows, shape `(n, N_COVARIATES)`.

    Arguments:
        task: task-type index into `TASK_TYPES`, shape (n,).
        tier: model tier in [0, 1].
        context_tokens: the task's own context length in tokens.
        complexity: task complexity in [0, 1] (0.5 when unknown).
    """
    task = np.asarray(task, dtype=int)
    if np.any((task < 0) | (task >= len(TASK_TYPES))):
        raise ValueError(f"task: indices must lie in [0, {len(TASK_TYPES) - 1}]")
    onehot = np.eye(len(TASK_TYPES))[task]
    columns = [np.asarray(tier, float), context_size(context_tokens), np.asarray(complexity, float)]
    extra = np.stack([np.broadcast_to(c, task.shape) for c in columns], axis=-1)
    return np.concatenate([onehot, extra], axis=-1)
