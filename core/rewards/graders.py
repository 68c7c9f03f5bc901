"""Declarative graders. Each is a validated spec that scores one completion against its example.

Every grader is also a reward function with TRL's convention, `grader(completions, **columns)`
returning one float per completion, so it can be used on its own or inside a `RewardSpec`.
A binary grader scores exactly 0 or 1, which lets the trainer report accuracy.
"""

from __future__ import annotations

import json
import math
import re
import threading
from functools import cached_property
from typing import Any, ClassVar, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.rewards.extract import Extractor, extract_answer


class GraderBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    binary: ClassVar[bool] = True
    type: str
    name: str | None = Field(None, description="Name in per-grader metrics; default: the type.")
    weight: float = Field(1.0, description="Weight in the spec's total.")
    extract: Extractor = Field("none", description="How to pull the answer out of the completion.")
    extract_pattern: str | None = Field(
        None, description="Regex whose first group is the answer (overrides extract)."
    )

    @field_validator("extract_pattern")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return pattern

    @property
    def label(self) -> str:
        return self.name or self.type

    def fields_needed(self) -> set[str]:
        """Example fields this grader reads; checked against a dataset before training."""
        field = getattr(self, "field", None)
        return {field} if field else set()

    def answer(self, completion: str) -> str | None:
        return extract_answer(completion, self.extract, self.extract_pattern)

    def score(self, completion: str, example: dict[str, Any]) -> float:
        raise NotImplementedError

    def __call__(self, completions: list[str], **columns: list[Any]) -> list[float]:
        examples = [{key: values[i] for key, values in columns.items()} for i in range(len(completions))]
        return [self.score(c, e) for c, e in zip(completions, examples, strict=True)]


def _reference(example: dict[str, Any], field: str) -> Any:
    if field not in example:
        raise KeyError(f"example has no field {field!r}")
    return example[field]


class ExactMatch(GraderBase):
    """1 if the (extracted) answer equals the reference after stripping whitespace."""

    type: Literal["exact_match"] = "exact_match"
    field: str = Field("answer", description="Example field holding the reference.")
    case_sensitive: bool = True

    def score(self, completion: str, example: dict[str, Any]) -> float:
        answer = self.answer(completion)
        if answer is None:
            return 0.0
        reference = str(_reference(example, self.field)).strip()
        answer = answer.strip()
        if not self.case_sensitive:
            answer, reference = answer.casefold(), reference.casefold()
        return float(answer == reference)


class Contains(GraderBase):
    """1 if the completion contains the fixed `value`, or else the example's `field`."""

    type: Literal["contains"] = "contains"
    value: str | None = None
    field: str | None = "answer"
    case_sensitive: bool = True

    @model_validator(mode="after")
    def _one_source(self) -> Contains:
        if self.value is not None:
            object.__setattr__(self, "field", None)
        elif self.field is None:
            raise ValueError("contains needs `value` or `field`")
        return self

    def score(self, completion: str, example: dict[str, Any]) -> float:
        needle = self.value if self.value is not None else str(_reference(example, self.field or ""))
        answer = self.answer(completion)
        if answer is None:
            return 0.0
        if not self.case_sensitive:
            needle, answer = needle.casefold(), answer.casefold()
        return float(needle in answer)


class RegexMatch(GraderBase):
    """1 if the pattern matches (anywhere with `search`, the whole answer with `fullmatch`)."""

    type: Literal["regex"] = "regex"
    pattern: str
    mode: Literal["search", "fullmatch"] = "search"

    @field_validator("pattern")
    @classmethod
    def _pattern_compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return pattern

    def score(self, completion: str, example: dict[str, Any]) -> float:
        answer = self.answer(completion)
        if answer is None:
            return 0.0
        match = re.fullmatch if self.mode == "fullmatch" else re.search
        return float(match(self.pattern, answer, flags=re.DOTALL) is not None)


def parse_number(text: str) -> float | None:
    try:
        return float(str(text).strip().replace(",", ""))
    except ValueError:
        return None


class NumericMatch(GraderBase):
    """1 if the answer parses as a number equal to the reference within tolerance."""

    type: Literal["numeric"] = "numeric"
    field: str = "answer"
    extract: Extractor = "last_number"
    rel_tol: float = Field(1e-6, ge=0)
    abs_tol: float = Field(1e-9, ge=0)

    def score(self, completion: str, example: dict[str, Any]) -> float:
        answer = self.answer(completion)
        predicted = parse_number(answer) if answer is not None else None
        reference = parse_number(_reference(example, self.field))
        if predicted is None or reference is None:
            return 0.0
        return float(math.isclose(predicted, reference, rel_tol=self.rel_tol, abs_tol=self.abs_tol))


class MathMatch(GraderBase):
    """1 if math-verify finds the answer mathematically equal to the reference (LaTeX or plain)."""

    type: Literal["math"] = "math"
    field: str = "answer"

    def score(self, completion: str, example: dict[str, Any]) -> float:
        from math_verify import parse, verify

        answer = self.answer(completion)
        if answer is None:
            return 0.0
        # math-verify's timeouts use SIGALRM, which only the main thread may set.
        timeout = 5 if threading.current_thread() is threading.main_thread() else None
        gold = parse(str(_reference(example, self.field)), parsing_timeout=timeout)
        predicted = parse(answer, parsing_timeout=timeout)
        if not gold or not predicted:
            return 0.0
        return float(verify(gold, predicted, timeout_seconds=timeout))


class JsonSchemaValid(GraderBase):
    """1 if the answer is JSON that validates against `schema` (inline) or the example's `field`."""

    type: Literal["json_schema"] = "json_schema"
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    field: str | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one_source(self) -> JsonSchemaValid:
        if (self.json_schema is None) == (self.field is None):
            raise ValueError("json_schema needs exactly one of `schema` (inline) or `field`")
        if self.json_schema is not None:
            try:
                jsonschema.validators.validator_for(self.json_schema).check_schema(self.json_schema)
            except jsonschema.SchemaError as exc:
                raise ValueError(f"schema is not a valid JSON Schema: {exc.message}") from None
        return self

    @cached_property
    def _validator(self) -> Any:
        return jsonschema.validators.validator_for(self.json_schema)(self.json_schema)

    def score(self, completion: str, example: dict[str, Any]) -> float:
        answer = self.answer(completion)
        if answer is None:
            return 0.0
        try:
            document = json.loads(answer)
        except json.JSONDecodeError:
            return 0.0
        if self.json_schema is not None:
            validator = self._validator
        else:
            schema = _reference(example, self.field or "")
            schema = json.loads(schema) if isinstance(schema, str) else schema
            validator = jsonschema.validators.validator_for(schema)(schema)
        return float(validator.is_valid(document))


class Similarity(GraderBase):
    """Normalised Indel similarity in [0, 1] between the answer and the reference."""

    binary: ClassVar[bool] = False
    type: Literal["similarity"] = "similarity"
    field: str = "answer"
    case_sensitive: bool = True

    def score(self, completion: str, example: dict[str, Any]) -> float:
        from rapidfuzz import fuzz

        answer = self.answer(completion)
        if answer is None:
            return 0.0
        reference = str(_reference(example, self.field))
        if not self.case_sensitive:
            answer, reference = answer.casefold(), reference.casefold()
        return fuzz.ratio(answer.strip(), reference.strip()) / 100.0


class LengthWithin(GraderBase):
    """1 if the answer's length (characters or words) lies in [min, max]."""

    type: Literal["length"] = "length"
    unit: Literal["chars", "words"] = "chars"
    min: int = Field(0, ge=0)
    max: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> LengthWithin:
        if self.max is not None and self.max < self.min:
            raise ValueError("length: max must be at least min")
        return self

    def score(self, completion: str, example: dict[str, Any]) -> float:
        answer = self.answer(completion)
        if answer is None:
            return 0.0
        size = len(answer) if self.unit == "chars" else len(answer.split())
        return float(size >= self.min and (self.max is None or size <= self.max))


class FormatTags(GraderBase):
    """1 if every tag appears as a closed `<tag>...</tag>` pair, in the given order."""

    type: Literal["format"] = "format"
    tags: list[str] = Field(min_length=1)

    @field_validator("tags")
    @classmethod
    def _plain_names(cls, tags: list[str]) -> list[str]:
        for tag in tags:
            if not re.fullmatch(r"[A-Za-z_][\w\-]*", tag):
                raise ValueError(f"tag {tag!r} must be a plain name like 'think' or 'answer'")
        return tags

    def score(self, completion: str, example: dict[str, Any]) -> float:
        pattern = r"\s*".join(rf"<{t}>.*?</{t}>" for t in self.tags)
        return float(re.search(pattern, completion, flags=re.DOTALL) is not None)


DECLARATIVE_GRADERS: tuple[type[GraderBase], ...] = (
    ExactMatch,
    Contains,
    RegexMatch,
    NumericMatch,
    MathMatch,
    JsonSchemaValid,
    Similarity,
    LengthWithin,
    FormatTags,
)
