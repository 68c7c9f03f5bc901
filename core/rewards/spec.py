"""A reward spec: a weighted list of graders, scored together with per-grader results."""

from __future__ import annotations

import dataclasses
import math
import time
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
    PythonGrader,
    RegexMatch,
    Similarity,
)
from core.rewards.sandbox import OUT_OF_TIME, SandboxPool, SandboxUnavailable

Grader = Annotated[
    ExactMatch
    | Contains
    | RegexMatch
    | NumericMatch
    | MathMatch
    | JsonSchemaValid
    | Similarity
    | LengthWithin
    | FormatTags
    | PythonGrader,
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

    @property
    def runs_user_code(self) -> bool:
        """True when a grader is user code, which needs the sandbox."""
        return any(isinstance(g, PythonGrader) for g in self.graders)


# A score outside this range is refused: one huge reward would swamp a whole group's advantages.
MAX_ABS_SCORE = 1e6


@dataclass
class RewardResult:
    totals: list[float]
    per_grader: dict[str, list[float]]
    errors: dict[str, int] = field(default_factory=dict)  # per grader: samples it failed on
    failures: dict[str, list[str | None]] = field(default_factory=dict)  # per grader and sample: why
    outputs: dict[str, list[str]] = field(default_factory=dict)  # python graders: what they printed
    seconds: dict[str, float] = field(default_factory=dict)  # per grader: time spent scoring
    correct: list[bool] | None = None  # set when the spec is binary

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def error_messages(self) -> list[str]:
        """The first few failures, one line each: `grader 'x': KeyError: ...`."""
        lines = [
            f"grader {label!r}: {failure.strip().splitlines()[-1]}"
            for label, failures in self.failures.items()
            for failure in failures
            if failure
        ]
        return lines[:_MAX_ERROR_MESSAGES]


_MAX_ERROR_MESSAGES = 5


def checked_score(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"score is not a finite number: {value}")
    if abs(value) > MAX_ABS_SCORE:
        raise ValueError(f"score {value:g} is outside [-{MAX_ABS_SCORE:g}, {MAX_ABS_SCORE:g}]")
    return value


def score_completions(
    spec: RewardSpec,
    completions: list[str],
    examples: list[dict[str, Any]],
    prompts: list[Any] | None = None,
    sandbox: SandboxPool | None = None,
    deadline: float | None = None,
    owner: str = "",
) -> RewardResult:
    """Score each completion with every grader; a grader that fails on a sample scores 0 there.

    Failures (exceptions, timeouts, NaN, non-numbers, scores out of range) are counted per grader
    with what went wrong, so one bad sample never stops a training step. Python graders run in
    `sandbox`; they see each example with its `prompt` (`prompts`, when given). `deadline`
    (time.monotonic()) bounds the time spent; `owner` keeps sandbox processes of different
    owners (projects) apart.
    """
    if len(completions) != len(examples) or (prompts is not None and len(prompts) != len(completions)):
        raise ValueError("completions, examples and prompts must have the same length")
    per_grader: dict[str, list[float]] = {}
    failures: dict[str, list[str | None]] = {}
    outputs: dict[str, list[str]] = {}
    seconds: dict[str, float] = {}
    for grader in spec.graders:
        started = time.perf_counter()
        if isinstance(grader, PythonGrader):
            if sandbox is None:
                raise SandboxUnavailable("the reward has python graders, which need a sandbox pool")
            if prompts is None:
                prompts = [e.get("prompt", e.get("messages", "")) for e in examples]
            full = [
                e if "prompt" in e else {**e, "prompt": p} for e, p in zip(examples, prompts, strict=True)
            ]
            program = dataclasses.replace(grader.program, owner=owner)
            outcomes = sandbox.score(program, prompts, completions, full, deadline)
            raw = [(o.score, o.error) for o in outcomes]
            outputs[grader.label] = [o.output for o in outcomes]
        else:
            raw = [
                _score_trusted(grader, c, e)
                if deadline is None or time.monotonic() < deadline
                else _OUT_OF_TIME
                for c, e in zip(completions, examples, strict=True)
            ]
        scores, reasons = [], []
        for value, error in raw:
            if error is None:
                try:
                    value = checked_score(float(value))  # type: ignore[arg-type]
                except (TypeError, ValueError) as exc:
                    error = f"{type(exc).__name__}: {exc}"
            scores.append(value if error is None else 0.0)
            reasons.append(error)
        per_grader[grader.label] = scores  # type: ignore[assignment]
        failures[grader.label] = reasons
        seconds[grader.label] = time.perf_counter() - started
    errors = {label: n for label, reasons in failures.items() if (n := sum(r is not None for r in reasons))}
    totals = [sum(g.weight * per_grader[g.label][i] for g in spec.graders) for i in range(len(completions))]
    correct = None
    if spec.is_binary:
        correct = [
            all(per_grader[g.label][i] == 1.0 for g in spec.graders if g.weight > 0)
            for i in range(len(completions))
        ]
    return RewardResult(totals, per_grader, errors, failures, outputs, seconds, correct)


_OUT_OF_TIME = (None, OUT_OF_TIME)


def _score_trusted(grader: Any, completion: str, example: dict[str, Any]) -> tuple[float | None, str | None]:
    """A declarative grader, in this process: (score, None) or (None, the exception's last line)."""
    try:
        return float(grader.score(completion, example)), None
    except Exception as exc:
        return None, traceback.format_exception_only(type(exc), exc)[-1].strip()
