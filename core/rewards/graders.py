"""Declarative graders. Each is a validated spec that scores one completion against its example.

Every grader is also a reward function with TRL's convention, `grader(completions, **columns)`
returning one float per completion, so it can be used on its own or inside a `RewardSpec`.
A binary grader scores exactly 0 or 1, which lets the trainer report accuracy.
"""

from __future__ import annotations

import ast
import json
import math
import re
import sys
import threading
from functools import cached_property
from typing import Any, ClassVar, Literal

import jsonschema
import regex
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from core.rewards.extract import Extractor, extract_answer, user_pattern_matches
from core.rewards.sandbox import GraderProgram
from core.rewards.sandbox_server import ALLOWED_PACKAGES


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
                regex.compile(pattern)
            except regex.error as exc:
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
            regex.compile(pattern)
        except regex.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return pattern

    def score(self, completion: str, example: dict[str, Any]) -> float:
        answer = self.answer(completion)
        if answer is None:
            return 0.0
        return float(user_pattern_matches(self.pattern, answer, self.mode) is not None)


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


# ----- user code --------------------------------------------------------------------------------

MAX_SOURCE_BYTES = 256 * 1024
_IMPORTABLE = frozenset(sys.stdlib_module_names) | frozenset(ALLOWED_PACKAGES)
_ALLOWED_TEXT = "the standard library, " + ", ".join(ALLOWED_PACKAGES)


class PythonGrader(BaseModel):
    """User code, run in the reward sandbox (core/rewards/sandbox.py), never in the service.

    `def reward(completion: str, example: dict) -> float` is called once per completion; a
    function with a `completions` or `prompts` parameter is called once per batch with TRL's
    convention, `(prompts=..., completions=..., **columns) -> list[float]`; and OpenAI's
    `def grade(sample: dict, item: dict) -> float` gets OpenAI's `sample` and `item`
    (core/rewards/templates.py). Without `function`, the source's `reward` is called, else its
    `grade`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    binary: ClassVar[bool] = False
    type: Literal["python"] = "python"
    name: str | None = Field(None, description="Name in per-grader metrics; default: the type.")
    weight: float = Field(1.0, description="Weight in the spec's total.")
    source: str = Field(
        description=f"Python source defining the function (at most {MAX_SOURCE_BYTES // 1024} kB); "
        f"it may import {_ALLOWED_TEXT}."
    )
    function: str = Field(
        "reward",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        validate_default=True,
        description="The function to call, defined at top level: default `reward`, else `grade`.",
    )
    image_tag: str | None = Field(None, description="OpenAI's grader image; accepted, and ignored here.")

    @model_validator(mode="before")
    @classmethod
    def _default_function(cls, data: Any) -> Any:
        """OpenAI's python graders name no function: they define `grade`."""
        if isinstance(data, dict) and "function" not in data and isinstance(data.get("source"), str):
            try:
                defined = {n.name for n in ast.parse(data["source"]).body if isinstance(n, ast.FunctionDef)}
            except (SyntaxError, ValueError, RecursionError, MemoryError):
                return data  # the source validator says what is wrong
            if "reward" not in defined and "grade" in defined:
                return {**data, "function": "grade"}
        return data

    @field_validator("source")
    @classmethod
    def _compiles(cls, source: str) -> str:
        size = len(source.encode())
        if size > MAX_SOURCE_BYTES:
            raise ValueError(
                f"source is {size} bytes, over the limit of {MAX_SOURCE_BYTES} ({MAX_SOURCE_BYTES // 1024} kB)"
            )
        try:
            compile(source, "reward.py", "exec", dont_inherit=True)  # every SyntaxError, with its text
            tree = ast.parse(source, "reward.py")
        except SyntaxError as exc:
            where = f"line {exc.lineno}" + (f", column {exc.offset}" if exc.offset else "")
            lines = source.splitlines()
            text = exc.text or (lines[exc.lineno - 1] if exc.lineno and exc.lineno <= len(lines) else "")
            code = f": {text.strip()!r}" if text.strip() else ""
            raise ValueError(f"{where}: {exc.msg}{code}") from None
        except (ValueError, RecursionError, MemoryError) as exc:
            raise ValueError(f"source cannot be compiled: {type(exc).__name__}: {exc}") from None
        refused = [
            f"line {node.lineno}: module {top!r} cannot be imported (reward code may import {_ALLOWED_TEXT})"
            for node, top in _imports(tree)
            if top not in _IMPORTABLE
        ]
        if refused:
            raise ValueError("; ".join(refused))
        return source

    @field_validator("function")
    @classmethod
    def _defined(cls, function: str, info: ValidationInfo) -> str:
        if "source" in info.data:  # else the source itself was refused
            call_form(info.data["source"], function)
        return function

    @property
    def label(self) -> str:
        return self.name or self.type

    def fields_needed(self) -> set[str]:
        return set()  # unknown: user code reads what it reads

    @property
    def form(self) -> Literal["sample", "batch", "openai"]:
        return call_form(self.source, self.function)

    @cached_property
    def program(self) -> GraderProgram:
        # OpenAI's form is the per-sample call with (sample, item) in place of (completion, example).
        return GraderProgram(self.source, self.function, "batch" if self.form == "batch" else "sample")


def call_form(source: str, function: str) -> Literal["sample", "batch", "openai"]:
    """How the sandbox calls `function`, read from its signature; ValueError if it cannot be called."""
    tree = ast.parse(source)
    found = [
        n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == function
    ]
    if not found:
        openai = " or OpenAI's def grade(sample, item): ..." if function == "reward" else ""
        raise ValueError(
            f"the source defines no top-level function {function!r} "
            f"(def {function}(completion, example): ... returning a number{openai})"
        )
    node = found[-1]
    if isinstance(node, ast.AsyncFunctionDef):
        raise ValueError(f"{function!r} must be a plain def, not async def")
    args = node.args
    names = {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]}
    if names & {"completions", "prompts"}:
        return "batch"
    if len(args.posonlyargs) + len(args.args) >= 2 or args.vararg is not None:
        return "openai" if function == "grade" else "sample"
    raise ValueError(
        f"{function!r} must take (completion, example), or TRL's (prompts, completions, **columns) for a batch"
    )


def _imports(tree: ast.AST) -> list[tuple[ast.stmt, str]]:
    """Every absolute import in the code, with the top-level module it names."""
    found: list[tuple[ast.stmt, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node, alias.name.partition(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):  # a relative import names no package reward code has
            found.append((node, "." * node.level + (node.module or "").partition(".")[0]))
    return found
