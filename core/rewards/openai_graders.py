"""OpenAI's grader objects, scored as OpenAI documents them (docs/graders.md has the table).

`string_check` and `text_similarity` compare two templates (core/rewards/templates.py);
`score_model` and `label_model` ask a judge model (core.rewards.spec.Judge; service/judge.py asks
one over HTTP); `python` with `grade(sample, item)` is PythonGrader (core/rewards/graders.py);
`multi` becomes a RewardSpec with a `calculate_output` formula (core/rewards/spec.py). They sit in the same grader
union as our declarative graders, so a reward is one list of graders whatever their origin.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.rewards.templates import item_fields, item_of, references, render, sample_of
from core.rewards.text_metrics import TEXT_METRICS


class TemplateGraderBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    binary: ClassVar[bool] = True
    type: str
    name: str | None = Field(None, description="Name in per-grader metrics; default: the type.")
    weight: float = Field(1.0, description="Weight in the reward's total (ours; OpenAI has one grader).")

    @property
    def label(self) -> str:
        return self.name or self.type

    def templates(self) -> list[str]:
        raise NotImplementedError

    def fields_needed(self) -> set[str]:
        return set().union(*(item_fields(t) for t in self.templates()))

    @model_validator(mode="after")
    def _templates_readable(self) -> TemplateGraderBase:
        for template in self.templates():
            references(template)  # ValueError naming the reference that cannot be read
        return self


class StringCheck(TemplateGraderBase):
    """1 or 0: `eq` input equals reference, `ne` they differ, `like` input contains reference,
    `ilike` the same ignoring case."""

    type: Literal["string_check"] = "string_check"
    input: str = Field(description="Template, e.g. {{sample.output_text}}.")
    reference: str = Field(description="Template, e.g. {{item.answer}}.")
    operation: Literal["eq", "ne", "like", "ilike"]

    def templates(self) -> list[str]:
        return [self.input, self.reference]

    def score(self, completion: str, example: dict[str, Any]) -> float:
        sample, item = sample_of(completion), item_of(example)
        text, reference = render(self.input, sample, item), render(self.reference, sample, item)
        if self.operation == "eq":
            return float(text == reference)
        if self.operation == "ne":
            return float(text != reference)
        if self.operation == "like":
            return float(reference in text)
        return float(reference.casefold() in text.casefold())


class TextSimilarity(TemplateGraderBase):
    """Similarity in [0, 1] of input and reference by `evaluation_metric` (core/rewards/text_metrics.py)."""

    binary: ClassVar[bool] = False
    type: Literal["text_similarity"] = "text_similarity"
    input: str
    reference: str
    evaluation_metric: str = Field(
        description="fuzzy_match, bleu, gleu, meteor, rouge_1 ... rouge_5, rouge_l."
    )
    pass_threshold: float | None = Field(
        None, description="Accepted for OpenAI's evals; training ignores it."
    )

    @field_validator("evaluation_metric")
    @classmethod
    def _known_metric(cls, metric: str) -> str:
        if metric == "cosine":
            raise ValueError(
                "cosine needs an embedding model, which this service does not run (OpenAI offers it in "
                f"evals only); use one of {', '.join(TEXT_METRICS)}"
            )
        if metric not in TEXT_METRICS:
            raise ValueError(f"unknown evaluation_metric {metric!r}; use one of {', '.join(TEXT_METRICS)}")
        return metric

    def templates(self) -> list[str]:
        return [self.input, self.reference]

    def score(self, completion: str, example: dict[str, Any]) -> float:
        sample, item = sample_of(completion), item_of(example)
        return TEXT_METRICS[self.evaluation_metric](
            render(self.input, sample, item), render(self.reference, sample, item)
        )


# ----- model graders (an LLM judge) ---------------------------------------------------------------


class InputText(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["input_text", "output_text"]
    text: str


class JudgeMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["message"] | None = None
    role: Literal["system", "developer", "user", "assistant"]
    content: str | InputText | list[InputText] = Field(
        description="Template text, or text parts; judges here read text only (no images or audio)."
    )

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = [self.content] if isinstance(self.content, InputText) else self.content
        return "".join(p.text for p in parts)


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    seed: int | None = None
    top_p: float | None = Field(None, gt=0, le=1)
    temperature: float | None = Field(None, ge=0, le=2)
    max_completions_tokens: int | None = Field(None, ge=1, le=4096)
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = Field(
        None, description="Accepted and ignored: the judges here do not reason separately."
    )


class ModelGraderBase(TemplateGraderBase):
    """A judge model reads the rendered messages and answers in JSON (`{"result": ...}`)."""

    model: str = Field(
        description="Judge name; the deployment maps it to a served model (settings judge_models)."
    )
    input: list[JudgeMessage] = Field(min_length=1)
    sampling_params: SamplingParams = Field(default_factory=SamplingParams)

    def templates(self) -> list[str]:
        return [m.text for m in self.input]

    def instruction(self) -> str:
        raise NotImplementedError

    def messages(self, completion: str, example: dict[str, Any]) -> list[dict[str, str]]:
        sample, item = sample_of(completion), item_of(example)
        rendered = [{"role": m.role, "content": render(m.text, sample, item)} for m in self.input]
        return [*rendered, {"role": "system", "content": self.instruction()}]

    def score_answer(self, answer: str) -> float:
        raise NotImplementedError


class ModelGraderParseError(ValueError):
    """The judge's answer holds no usable result: OpenAI's model_grader_parse_error."""


def judge_result(answer: str) -> Any:
    """`result` of the JSON object in the judge's answer (the first {...} when there is text around it)."""
    found = re.search(r"\{.*\}", answer, flags=re.DOTALL)
    try:
        document = json.loads(found.group(0) if found else answer)
    except ValueError:
        raise ModelGraderParseError(f"the judge's answer is not JSON: {answer[:200]!r}") from None
    if not isinstance(document, dict) or "result" not in document:
        raise ModelGraderParseError(f"the judge's answer has no 'result': {answer[:200]!r}")
    return document["result"]


class ScoreModel(ModelGraderBase):
    """The judge's numeric `result`, clamped to `range`."""

    binary: ClassVar[bool] = False
    type: Literal["score_model"] = "score_model"
    range: tuple[float, float] = Field((0.0, 1.0), description="[min, max] the score is clamped to.")

    @field_validator("range")
    @classmethod
    def _ordered(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        if not bounds[0] < bounds[1]:
            raise ValueError(f"range must be [min, max] with min < max, got {list(bounds)}")
        return bounds

    def instruction(self) -> str:
        low, high = self.range
        return (
            'Answer with one JSON object and nothing else: {"result": <a number from '
            f'{low:g} to {high:g}>, "steps": [{{"description": "...", "conclusion": "..."}}]}}'
        )

    def score_answer(self, answer: str) -> float:
        result = judge_result(answer)
        if isinstance(result, bool) or not isinstance(result, int | float) or not math.isfinite(result):
            raise ModelGraderParseError(f"the judge's result is not a number: {result!r}")
        return min(max(float(result), self.range[0]), self.range[1])


class LabelModel(ModelGraderBase):
    """1 if the judge's label is one of `passing_labels`, else 0."""

    type: Literal["label_model"] = "label_model"
    labels: list[str] = Field(min_length=1)
    passing_labels: list[str] = Field(min_length=1)

    @model_validator(mode="after")
    def _passing_are_labels(self) -> LabelModel:
        unknown = sorted(set(self.passing_labels) - set(self.labels))
        if unknown:
            raise ValueError(f"passing_labels must be among labels; not labels: {', '.join(unknown)}")
        return self

    def instruction(self) -> str:
        return (
            'Answer with one JSON object and nothing else: {"result": "<one label>"}, '
            f"the label one of {json.dumps(self.labels)}"
        )

    def score_answer(self, answer: str) -> float:
        result = judge_result(answer)
        if result not in self.labels:
            raise ModelGraderParseError(f"the judge's label {result!r} is not one of {self.labels}")
        return float(result in self.passing_labels)
