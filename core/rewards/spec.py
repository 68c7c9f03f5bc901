"""A reward spec: graders scored together, with per-grader results, summed by weight or by formula.

One representation for every way a reward is written: our weighted list of graders, OpenAI's
single grader object, and OpenAI's `multi` grader (its sub-graders and `calculate_output`),
which `spec_of_grader` turns into a spec.
"""

from __future__ import annotations

import dataclasses
import math
import time
import traceback
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.rewards.formula import Formula, FormulaError, parse_formula
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
from core.rewards.openai_graders import (
    LabelModel,
    ModelGraderBase,
    ScoreModel,
    StringCheck,
    TextSimilarity,
)
from core.rewards.sandbox import OUT_OF_TIME, TIME_LIMIT_ERROR, SandboxPool, SandboxUnavailable
from core.rewards.templates import item_of, sample_of

Grader = Annotated[
    StringCheck
    | TextSimilarity
    | ScoreModel
    | LabelModel
    | ExactMatch
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
    calculate_output: str | None = Field(
        None,
        description="A formula over the graders' names that makes the reward in place of the weighted "
        "sum, as OpenAI's multi grader: e.g. 0.5 * correct + 0.5 * min(1, style ^ 2).",
    )

    @model_validator(mode="after")
    def _unique_labels(self) -> RewardSpec:
        labels = [g.label for g in self.graders]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(
                f"grader names must be unique; give `name` to the repeated ones: {', '.join(repeated)}"
            )
        if self.calculate_output is not None:
            parse_formula(self.calculate_output, set(labels))  # FormulaError is a ValueError
        return self

    @property
    def formula(self) -> Formula | None:
        if self.calculate_output is None:
            return None
        return parse_formula(self.calculate_output, set(self.labels))

    @property
    def labels(self) -> list[str]:
        return [g.label for g in self.graders]

    @property
    def is_binary(self) -> bool:
        """True when every grader scores 0 or 1, so 'all graders passed' is a meaningful accuracy."""
        return self.calculate_output is None and all(g.binary for g in self.graders)

    def fields_needed(self) -> set[str]:
        return set().union(*(g.fields_needed() for g in self.graders))

    @property
    def runs_user_code(self) -> bool:
        """True when a grader is user code, which needs the sandbox."""
        return any(isinstance(g, PythonGrader) for g in self.graders)

    @property
    def judge_models(self) -> set[str]:
        """Judge names the model graders ask for; each must be served by the deployment."""
        return {g.model for g in self.graders if isinstance(g, ModelGraderBase)}


def spec_of_grader(grader: dict[str, Any]) -> RewardSpec:
    """The spec of one OpenAI grader object; a `multi` grader's sub-graders become the spec's graders.

    `multi.graders` comes in three shapes, all accepted: a map from name to grader (OpenAI's
    guides; the names are what `calculate_output` refers to), a list (the API spec's example),
    or a single grader (the client's types); in a list or alone, a grader is known by its name.
    """
    if not isinstance(grader, dict):
        raise ValueError(f"a grader must be an object with a `type`, got {type(grader).__name__}")
    if grader.get("type") != "multi":
        return RewardSpec(graders=[grader])
    unknown = sorted(set(grader) - {"type", "name", "graders", "calculate_output"})
    if unknown:
        raise ValueError(f"multi grader: unknown fields {', '.join(unknown)}")
    if not isinstance(grader.get("calculate_output"), str):
        raise ValueError("multi grader: `calculate_output` (a formula over the graders' names) is required")
    inner = grader.get("graders")
    if isinstance(inner, dict) and "type" not in inner:
        named = [{**g, "name": key} if isinstance(g, dict) else g for key, g in inner.items()]
    elif isinstance(inner, dict):
        named = [inner]
    elif isinstance(inner, list):
        named = inner
    else:
        raise ValueError("multi grader: `graders` must be a map of name to grader, a list, or one grader")
    if any(isinstance(g, dict) and g.get("type") == "multi" for g in named):
        raise ValueError("multi grader: a multi grader cannot contain another multi grader")
    return RewardSpec(graders=named, calculate_output=grader["calculate_output"])


CALCULATE_OUTPUT = "calculate_output"  # where a formula's failures are counted


class JudgeUnavailable(RuntimeError):
    """A model grader names a judge this deployment does not serve."""


class Judge(Protocol):
    """What model graders ask (service/judge.py's ChatJudge asks a chat model over HTTP)."""

    def missing(self, names: set[str]) -> list[str]:
        """The judge names it cannot serve."""
        ...

    def score(
        self,
        grader: ModelGraderBase,
        completions: list[str],
        examples: list[dict[str, Any]],
        deadline: float | None,
    ) -> list[tuple[float | None, str | None]]:
        """(score, None) or (None, what went wrong) per completion."""
        ...


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

    def error_kinds(self, spec: RewardSpec) -> dict[str, dict[str, int]]:
        """Per grader: how many samples failed, by OpenAI's error names (error_kind)."""
        types = {g.label: g.type for g in spec.graders} | {CALCULATE_OUTPUT: CALCULATE_OUTPUT}
        kinds: dict[str, dict[str, int]] = {}
        for label, reasons in self.failures.items():
            for reason in reasons:
                if reason:
                    kind = error_kind(types[label], reason)
                    kinds.setdefault(label, {}).setdefault(kind, 0)
                    kinds[label][kind] += 1
        return kinds

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

ERROR_KINDS = (
    "formula_parse_error",
    "sample_parse_error",
    "invalid_variable_error",
    "python_grader_runtime_error",
    "python_grader_server_error",
    "model_grader_server_error",
    "model_grader_parse_error",
    "other_error",
)


def error_kind(grader_type: str, reason: str) -> str:
    """OpenAI's name for why a grader failed on a sample, from the failure's text."""
    if grader_type == CALCULATE_OUTPUT:
        return "formula_parse_error"
    name = reason.partition(":")[0].strip().rsplit(".", 1)[-1]  # the exception class, module dropped
    if name == "InvalidVariable":
        return "invalid_variable_error"
    if name == "SampleParseError":
        return "sample_parse_error"
    if grader_type == "python":
        last = reason.strip().splitlines()[-1] if reason.strip() else ""
        infrastructure = (
            reason == OUT_OF_TIME or last.startswith(TIME_LIMIT_ERROR) or reason.startswith("the sandbox")
        )
        return "python_grader_server_error" if infrastructure else "python_grader_runtime_error"
    if name == "ModelGraderParseError":
        return "model_grader_parse_error"
    if name in ("ModelGraderServerError", "JudgeUnavailable", "TimeoutError"):
        return "model_grader_server_error"
    return "other_error"


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
    judge: Judge | None = None,
) -> RewardResult:
    """Score each completion with every grader; a grader that fails on a sample scores 0 there.

    Failures (exceptions, timeouts, NaN, non-numbers, scores out of range) are counted per grader
    with what went wrong, so one bad sample never stops a training step. Python graders run in
    `sandbox`; they see each example with its `prompt` (`prompts`, when given). `deadline`
    (time.monotonic()) bounds the time spent; `owner` keeps sandbox processes of different
    owners (projects) apart. Model graders ask `judge`. With a `calculate_output` formula, a
    sample where it cannot be computed (1/0) scores 0, its error counted under `calculate_output`.
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
            if grader.form == "openai":  # grade(sample, item)
                arguments: list[Any] = [sample_of(c) for c in completions]
                full = [item_of(e) for e in examples]
            else:
                arguments = list(completions)
                full = [
                    e if "prompt" in e else {**e, "prompt": p} for e, p in zip(examples, prompts, strict=True)
                ]
            program = dataclasses.replace(grader.program, owner=owner)
            outcomes = sandbox.score(program, prompts, arguments, full, deadline)
            raw = [(o.score, o.error) for o in outcomes]
            outputs[grader.label] = [o.output for o in outcomes]
        elif isinstance(grader, ModelGraderBase):
            if judge is None:
                raise JudgeUnavailable(f"grader {grader.label!r} needs the judge model {grader.model!r}")
            raw = judge.score(grader, completions, examples, deadline)
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
    formula = spec.formula
    if formula is None:
        totals = [
            sum(g.weight * per_grader[g.label][i] for g in spec.graders) for i in range(len(completions))
        ]
    else:
        totals, reasons = [], []
        for i in range(len(completions)):
            try:
                totals.append(
                    checked_score(formula({label: per_grader[label][i] for label in formula.names}))
                )
                reasons.append(None)
            except (FormulaError, ValueError) as exc:
                totals.append(0.0)
                reasons.append(f"{type(exc).__name__}: {exc}")
        if any(reasons):
            failures[CALCULATE_OUTPUT] = reasons
    errors = {label: n for label, reasons in failures.items() if (n := sum(r is not None for r in reasons))}
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
