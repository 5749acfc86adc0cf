"""Graders: a quality score in [0, 1] for an answer, always labelled with the grader's name.

- `ExactMatch`: the final answer equals the reference (normalised case and spaces);
- `MultipleChoice`: the chosen option letter equals the reference letter;
- `Numeric`: the final number equals the reference within a relative tolerance;
- `FunctionGrader`: a user function (e.g. unit tests for generated code);
- `LLMJudge`: a model scores the answer through an OpenAI-compatible client.

The final answer is the text after the last 'Answer:' line when there is one (the
governed prompts ask for it), else the whole reply.
"""

import dataclasses
import math
import re
from collections.abc import Callable

_ANSWER = re.compile(r"answer\s*[:：]\s*(.+)", re.IGNORECASE)
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?")
_LETTER = re.compile(r"(?<![A-Za-z])\(?([A-Ea-e])\)?(?![A-Za-z])")
_SCORE = re.compile(r"SCORE\s*[:=]\s*([-+]?\d*\.?\d+)", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Grade:
    """A quality score in [0, 1] and the grader that produced it."""

    score: float
    grader: str

    def __post_init__(self):
        if not (math.isfinite(self.score) and 0.0 <= self.score <= 1.0):
            raise ValueError(f"score: expected a value in [0, 1], got {self.score}")


def final_answer(text: str | None) -> str:
    """The text after the last 'Answer:' marker (stripped), else the whole text."""
    if not text:
        return ""
    matches = _ANSWER.findall(text)
    return (matches[-1] if matches else text).strip()


def parse_number(text: str | None) -> float | None:
    """The last number in the final answer ('1,234.5', '-7', '3e2'), or None."""
    numbers = _NUMBER.findall(final_answer(text))
    if not numbers:
        return None
    try:
        return float(numbers[-1].replace(",", ""))
    except ValueError:
        return None


def parse_choice(text: str | None) -> str | None:
    """The option letter (A-E) of the final answer, or None."""
    match = _LETTER.search(final_answer(text))
    return match.group(1).upper() if match else None


def parse_score(text: str | None) -> float | None:
    """The judge's 'SCORE: x' (the last one), clipped to [0, 1], or None."""
    matches = _SCORE.findall(text or "")
    if not matches:
        return None
    value = float(matches[-1])
    return min(max(value, 0.0), 1.0) if math.isfinite(value) else None


class ExactMatch:
    """1 when the final answer equals the reference, ignoring case and surrounding spaces."""

    name = "exact_match"

    def grade(self, question: str, answer: str | None, reference) -> Grade:
        normalise = lambda s: " ".join(str(s).lower().split()).rstrip(".")  # noqa: E731
        return Grade(float(normalise(final_answer(answer)) == normalise(reference)), self.name)


class MultipleChoice:
    """1 when the chosen option letter equals the reference letter."""

    name = "multiple_choice"

    def grade(self, question: str, answer: str | None, reference) -> Grade:
        return Grade(float(parse_choice(answer) == str(reference).strip().upper()), self.name)


class Numeric:
    """1 when the final number is within `rel_tol` (or `abs_tol`) of the reference."""

    name = "numeric"

    def __init__(self, rel_tol: float = 1e-6, abs_tol: float = 1e-9):
        self.rel_tol, self.abs_tol = rel_tol, abs_tol

    def grade(self, question: str, answer: str | None, reference) -> Grade:
        value = parse_number(answer)
        ok = value is not None and math.isclose(
            value, float(reference), rel_tol=self.rel_tol, abs_tol=self.abs_tol
        )
        return Grade(float(ok), self.name)


class FunctionGrader:
    """A user function `(question, answer, reference) -> score in [0, 1]` (or bool)."""

    def __init__(self, function: Callable, name: str = "function"):
        self.function, self.name = function, name

    def grade(self, question: str, answer: str | None, reference) -> Grade:
        return Grade(float(self.function(question, answer, reference)), self.name)


JUDGE_PROMPT = (
    "You grade answers. Question:\n{question}\n\nReference answer:\n{reference}\n\n"
    "Candidate answer:\n{answer}\n\nHow correct is the candidate answer? "
    "Reply with one line 'SCORE: x' where x is a number between 0 and 1."
)


class LLMJudge:
    """A model scores answers in [0, 1], through an `openai.OpenAI` or `openai.AsyncOpenAI` client.

    Arguments:
        client: the client (any OpenAI-compatible endpoint).
        model: the judge model.
        prompt: the judge prompt, with `{question}`, `{reference}` and `{answer}` fields;
            it must ask for a 'SCORE: x' line.
        max_tokens: the judge's completion cap.
    """

    def __init__(self, client, model: str, *, prompt: str = JUDGE_PROMPT, max_tokens: int = 64):
        for field in ("{question}", "{answer}"):
            if field not in prompt:
                raise ValueError(f"prompt: the judge prompt must contain {field}")
        self.client, self.model, self.prompt, self.max_tokens = client, model, prompt, max_tokens
        self.name = f"llm_judge:{model}"

    def _request(self, question, answer, reference) -> dict:
        content = self.prompt.format(question=question, answer=answer or "", reference=reference)
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.max_tokens,
            "temperature": 0,
        }

    def _score(self, response) -> Grade:
        text = response.choices[0].message.content if response.choices else None
        score = parse_score(text)
        if score is None:
            raise ValueError(f"{self.name}: the judge's reply has no 'SCORE: x' line")
        return Grade(score, self.name)

    def grade(self, question: str, answer: str | None, reference) -> Grade:
        return self._score(self.client.chat.completions.create(**self._request(question, answer, reference)))

    async def agrade(self, question: str, answer: str | None, reference) -> Grade:
        response = await self.client.chat.completions.create(**self._request(question, answer, reference))
        return self._score(response)

    def __repr__(self) -> str:
        return f"LLMJudge(model={self.model!r})"


GRADERS = {"exact_match": ExactMatch, "multiple_choice": MultipleChoice, "numeric": Numeric}
