"""A reward spec: a weighted list of graders, scored together with per-grader results."""

from __future__ import annotations

import math
import traceback
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.rewards.graders import (
    Contains,
    ExactMatch,
    FormatTags,
    JsonSchemaValid,
    LengthWithin,
    MathMatch,
    NumericMatch,
    RegexMatch,
    Similarity,
)

Grader = Annotated[
    ExactMatch
    | Contains
    | RegexMatch
    | NumericMatch
    | MathMatch
    | JsonSchemaValid
    | Similarity
    | LengthWithin
    | FormatTags,
    Field(discriminator="type"),
]


class RewardSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    graders: list[Grader] = Field(
        min_length=1, description="Graders whose weighted scores add up to the reward."
    )

    @model_validator(mode="after")
    def _unique_labels(self) -> RewardSpec:
        labels = [g.label for g in self.graders]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(
                f"grader names must be unique; give `name` to the repeated ones: {', '.join(repeated)}"
            )
        return self

    @property
    def labels(self) -> list[str]:
        return [g.label for g in self.graders]

    @property
    def max_total(self) -> float:
        return sum(g.weight for g in self.graders if g.weight > 0)

    @property
    def is_binary(self) -> bool:
        """True when every grader scores 0 or 1, so 'all graders passed' is a meaningful accuracy."""
        return all(g.binary for g in self.graders)

    def fields_needed(self) -> set[str]:
        return set().union(*(g.fields_needed() for g in self.graders))


@dataclass
class RewardResult:
    totals: list[float]
    per_grader: dict[str, list[float]]
    errors: dict[str, int] = field(default_factory=dict)
    error_messages: list[str] = field(default_factory=list)
    correct: list[bool] | None = None  # set when the spec is binary

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


_MAX_ERROR_MESSAGES = 5


def score_completions(
    spec: RewardSpec, completions: list[str], examples: list[dict[str, Any]]
) -> RewardResult:
    """Score each completion with every grader; a grader that fails on a sample scores 0 there.

    Failures (exceptions, NaN, non-numbers) are counted per grader and the first few messages
    kept, so one bad sample never stops a training step.
    """
    per_grader: dict[str, list[float]] = {}
    errors: dict[str, int] = {}
    messages: list[str] = []
    for grader in spec.graders:
        scores = []
        for completion, example in zip(completions, examples, strict=True):
            try:
                value = float(grader.score(completion, example))
                if not math.isfinite(value):
                    raise ValueError(f"score is not a finite number: {value}")
            except Exception as exc:
                value = 0.0
                errors[grader.label] = errors.get(grader.label, 0) + 1
                if len(messages) < _MAX_ERROR_MESSAGES:
                    last = traceback.format_exception_only(type(exc), exc)[-1].strip()
                    messages.append(f"grader {grader.label!r}: {last}")
            scores.append(value)
        per_grader[grader.label] = scores
    totals = [sum(g.weight * per_grader[g.label][i] for g in spec.graders) for i in range(len(completions))]
    correct = None
    if spec.is_binary:
        correct = [
            all(per_grader[g.label][i] == 1.0 for g in spec.graders if g.weight > 0)
            for i in range(len(completions))
        ]
    return RewardResult(totals, per_grader, errors, messages, correct)
