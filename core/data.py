"""Datasets: JSONL examples, validated line by line, with a held-out split.

A line is one JSON object with a `prompt` (string) or `messages` (chat list), an optional
`demonstration` (string, or a final assistant message) and any other fields, which are passed
to reward graders. Earlier assistant messages are context; OpenAI's `weight` (0 or 1) is accepted
on them, and a final assistant message with weight 0 is refused, since it would train nothing.
Validation reads bytes, so it reports bad encodings, and never stops at the first problem: every
bad line is listed with its number, field and reason.
"""

from __future__ import annotations

import functools
import json
import math
import random
import re
import statistics
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from core.errors import InvalidInput

T = TypeVar("T")
ROLES = ("system", "user", "assistant")
DEFAULT_MAX_LINE_BYTES = 1 << 20  # 1 MiB: a long context, far from a memory problem
_MAX_REPORTED_ERRORS = 100
# Far below Python's recursion limit, so that every reader of a line (this check, the worker, the
# graders) agrees on it however deep its own stack already is.
MAX_JSON_DEPTH = 100
# Field names are counted per dataset (field_counts): bounded, so that a file of unique names cannot
# grow the count, the stored row and the API's answer without limit.
MAX_FIELD_NAMES = 1000
MAX_FIELD_NAME_CHARS = 256
_UTF8_BOM, _UTF16_BOMS = b"\xef\xbb\xbf", (b"\xff\xfe", b"\xfe\xff")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # \ud800-\udfff: pairs are fine, lone ones are not text


@dataclass(frozen=True)
class Example:
    prompt: str | list[dict[str, str]]  # plain text, or chat messages ending with a user turn
    demonstration: str | None
    fields: dict[str, Any]  # every other field of the line, for the reward graders
    line: int

    @property
    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        return "\n".join(m["content"] for m in self.prompt)


@dataclass(frozen=True)
class LineError:
    line: int
    field: str | None
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" + (f", field {self.field!r}" if self.field else "")
        return f"{where}: {self.message}"


@dataclass
class DatasetReport:
    examples: list[Example] = field(default_factory=list)  # empty when read with keep_examples=False
    errors: list[LineError] = field(default_factory=list)
    error_count: int = 0  # all errors, also those past the reported list's limit
    lines: int = 0
    example_count: int = 0
    with_demonstration: int = 0
    field_counts: dict[str, int] = field(default_factory=dict)  # extra fields -> examples that have them

    @property
    def ok(self) -> bool:
        return self.error_count == 0 and self.example_count > 0

    def count(self, example: Example) -> None:
        self.example_count += 1
        self.with_demonstration += example.demonstration is not None
        for name in example.fields:
            if name != "demonstration":
                self.field_counts[name] = self.field_counts.get(name, 0) + 1

    def summary(self) -> dict[str, Any]:
        return {
            "lines": self.lines,
            "examples": self.example_count,
            "with_demonstration": self.with_demonstration,
            "field_counts": dict(sorted(self.field_counts.items())),
            "error_count": self.error_count,
            "errors": [{"line": e.line, "field": e.field, "message": e.message} for e in self.errors],
        }


class DatasetError(InvalidInput):
    def __init__(self, source: str, report: DatasetReport):
        self.report = report
        shown = "\n".join(f"  - {e}" for e in report.errors[:20])
        more = report.error_count - min(len(report.errors), 20)
        tail = f"\n  ... and {more} more" if more > 0 else ""
        if not report.errors and not report.example_count:
            shown = "  - the file has no examples"
        super().__init__(f"{source}: invalid dataset\n{shown}{tail}")


def parse_example(obj: Any, line: int) -> tuple[Example | None, list[LineError]]:
    """Turn one decoded JSON value into an Example, or say everything wrong with it."""
    if not isinstance(obj, dict):
        return None, [LineError(line, None, f"expected a JSON object, got {_json_type(obj)}")]
    errors: list[LineError] = []
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    demonstration = obj.get("demonstration")
    prompt: str | list[dict[str, str]] | None = None

    if has_prompt == has_messages:
        errors.append(
            LineError(line, None, "needs exactly one of 'prompt' (string) or 'messages' (chat list)")
        )
    elif has_prompt:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            errors.append(
                LineError(line, "prompt", f"must be a non-empty string, got {_json_type(obj['prompt'])}")
            )
        else:
            prompt = obj["prompt"]
    else:
        messages, message_errors = _parse_messages(obj["messages"], line)
        errors += message_errors
        if messages is not None:
            if _untrained(obj["messages"][-1]):
                errors.append(
                    LineError(
                        line,
                        f"messages[{len(messages) - 1}].weight",
                        "the final assistant message is the one trained on, and weight 0 trains "
                        "nothing: drop the line, give it weight 1, or end the messages with the user turn",
                    )
                )
            elif messages[-1]["role"] == "assistant":
                if "demonstration" in obj:
                    errors.append(
                        LineError(
                            line, "demonstration", "given twice: as a field and as a final assistant message"
                        )
                    )
                demonstration = messages.pop()["content"]
            if not messages or messages[-1]["role"] != "user":
                errors.append(LineError(line, "messages", "the prompt must end with a user message"))
            else:
                prompt = messages

    if demonstration is not None and (not isinstance(demonstration, str) or not demonstration.strip()):
        errors.append(
            LineError(line, "demonstration", f"must be a non-empty string, got {_json_type(demonstration)}")
        )
    if errors or prompt is None:
        return None, errors
    fields = {k: v for k, v in obj.items() if k not in ("prompt", "messages")}
    return Example(prompt=prompt, demonstration=demonstration, fields=fields, line=line), []


def _parse_messages(value: Any, line: int) -> tuple[list[dict[str, str]] | None, list[LineError]]:
    if not isinstance(value, list) or not value:
        return None, [LineError(line, "messages", f"must be a non-empty list, got {_json_type(value)}")]
    messages, errors = [], []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            errors.append(
                LineError(
                    line, where, f"must be an object with 'role' and 'content', got {_json_type(message)}"
                )
            )
            continue
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            errors.append(
                LineError(line, f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
            )
        if not isinstance(content, str):
            errors.append(LineError(line, f"{where}.content", f"must be a string, got {_json_type(content)}"))
        if "weight" in message and (role != "assistant" or not _is_weight(message["weight"])):
            errors.append(
                LineError(
                    line,
                    f"{where}.weight",
                    f"is 0 or 1 on an assistant message, got {json.dumps(message['weight'])} on {role!r}",
                )
            )
        messages.append({"role": role, "content": content})
    return (None if errors else messages), errors


def _is_weight(value: Any) -> bool:
    return type(value) is int and value in (0, 1)  # not True or 1.0: OpenAI's weight is an integer


def _untrained(message: dict[str, Any]) -> bool:
    """An assistant message OpenAI's format marks as context only (`"weight": 0`)."""
    return message.get("role") == "assistant" and _is_weight(message.get("weight")) and message["weight"] == 0


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def read_jsonl(
    lines: Iterable[bytes | LineTooLong],
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    keep_examples: bool = True,
) -> DatasetReport:
    """Validate JSONL from raw byte lines. Blank lines are skipped; a UTF-8 BOM and CRLF are accepted.

    Besides bad JSON, encodings and types, lines are refused for what Python's json lets through
    but no reader downstream should see: a name given twice in an object, NaN, Infinity and numbers
    out of range, lone UTF-16 surrogates, nesting past MAX_JSON_DEPTH, and field names past
    MAX_FIELD_NAME_CHARS or MAX_FIELD_NAMES. With keep_examples=False only counts are kept, so
    memory stays flat for any file size.
    """
    report = DatasetReport()

    def fail(error: LineError) -> None:
        report.error_count += 1
        if len(report.errors) < _MAX_REPORTED_ERRORS:
            report.errors.append(error)

    for number, raw in enumerate(lines, start=1):
        report.lines = number
        size = raw.size if isinstance(raw, LineTooLong) else len(raw)
        if size > max_line_bytes:
            fail(LineError(number, None, f"line is {size:,} bytes, over the limit of {max_line_bytes:,}"))
            continue
        if number == 1 and raw.startswith(_UTF8_BOM):
            raw = raw[3:]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            message = f"not valid UTF-8 (byte {exc.start + 1} of the line)"
            if number == 1 and raw[:2] in _UTF16_BOMS:
                message = "the file is UTF-16 (it starts with a UTF-16 byte order mark); save it as UTF-8"
            fail(LineError(number, None, message))
            continue
        if not text.strip():
            continue
        obj, error = _decode_line(text, number)
        if error is None:
            example, errors = parse_example(obj, number)
            errors = errors or _field_name_errors(example, report.field_counts)
        else:
            example, errors = None, [error]
        for error in errors:
            fail(error)
        if example is not None and not errors:
            report.count(example)
            if keep_examples:
                report.examples.append(example)
    return report


class _DuplicateName(ValueError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _unique_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object_pairs_hook: a name given twice is an error, not a silent last-one-wins."""
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise _DuplicateName(name)
            seen.add(name)
    return obj


def _finite_float(literal: str) -> float:
    value = float(literal)
    if math.isinf(value):  # 1e999 parses to inf
        raise ValueError(f"the number {literal[:40]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")  # Python's json accepts NaN and Infinity


# Made once: json.loads with arguments builds a new decoder on every call.
_DECODER = json.JSONDecoder(
    object_pairs_hook=_unique_names, parse_float=_finite_float, parse_constant=_no_constant
)


def _decode_line(text: str, line: int) -> tuple[Any, LineError | None]:
    """The line's JSON value, or the error that says what is wrong with it and where."""
    try:
        obj = _DECODER.decode(text)
    except RecursionError:
        return None, LineError(line, None, f"JSON nested too deeply (the limit is {MAX_JSON_DEPTH} levels)")
    except _DuplicateName as exc:
        return None, LineError(line, _shown(exc.name), "given twice in the same object")
    except json.JSONDecodeError as exc:
        return None, LineError(
            line,
            None,
            f"not valid JSON: {exc.msg.removesuffix(' at')} at column {exc.colno}{_hint(exc, text)}",
        )
    except ValueError as exc:  # a number json cannot hold: out of range, too many digits, NaN
        reason = str(exc)
        if "digits" in reason:
            reason = f"a number has more than {sys.get_int_max_str_digits():,} digits"
        return None, LineError(line, None, f"not valid JSON: {reason}")
    return obj, _structure_error(text, obj, line)


def _hint(exc: json.JSONDecodeError, text: str) -> str:
    if text.startswith("\ufeff"):
        return " (a byte order mark starts this line; only the file may start with one: were files joined?)"
    if exc.msg == "Extra data" and "\r" in text.rstrip("\r\n"):
        return " (lines end in a lone CR; end them in LF or CRLF)"
    return ""


def _structure_error(text: str, obj: Any, line: int) -> LineError | None:
    """Nesting past MAX_JSON_DEPTH and lone surrogates, both of which json accepts. The value is only
    walked when the line's text could hold either, so an ordinary line costs two counts and a search."""
    deep = text.count("[") + text.count("{") > MAX_JSON_DEPTH
    surrogates = _SURROGATE_ESCAPE.search(text) is not None
    if not (deep or surrogates):
        return None
    stack: list[tuple[str | None, Any, int]] = [(None, obj, 1)]  # (top-level field, value, depth)
    while stack:
        field, value, depth = stack.pop()
        if isinstance(value, str):
            if surrogates and not _is_text(value):
                return LineError(
                    line, field, "holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text"
                )
        elif isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                return LineError(line, field, f"nested deeper than {MAX_JSON_DEPTH} levels")
            if isinstance(value, list):
                stack += [(field, child, depth + 1) for child in value]
                continue
            for name, child in value.items():
                under = _shown(name) if depth == 1 else field
                stack += [(under, name, depth + 1), (under, child, depth + 1)]  # names are text too
    return None


def _shown(name: str) -> str:
    """A field name as an error can show it: a lone surrogate becomes its escape, `\\ud800`."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _field_name_errors(example: Example | None, counted: dict[str, int]) -> list[LineError]:
    if example is None:
        return []
    errors = []
    for name in example.fields:
        if name in counted or name == "demonstration":  # seen before, or not an extra field
            continue
        if len(name) > MAX_FIELD_NAME_CHARS:
            errors.append(
                LineError(
                    example.line, name[:40] + "...", f"field name over {MAX_FIELD_NAME_CHARS} characters"
                )
            )
        elif len(counted) >= MAX_FIELD_NAMES:
            message = f"the dataset has more than {MAX_FIELD_NAMES:,} different field names"
            errors.append(LineError(example.line, name, message))
            break
    return errors


@dataclass(frozen=True)
class LineTooLong:
    """Stands for a line too long to read into memory; only its size is kept."""

    size: int


def iter_byte_lines(
    path: Path, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> Iterator[bytes | LineTooLong]:
    """Lines of a file, never holding more than `max_line_bytes` + 1 bytes of one in memory."""
    with path.open("rb") as handle:
        while line := handle.readline(max_line_bytes + 1):
            if len(line) > max_line_bytes and not line.endswith(b"\n"):
                size = len(line)
                while chunk := handle.readline(1 << 20):  # skip to the line's end, counting
                    size += len(chunk)
                    if chunk.endswith(b"\n"):
                        break
                yield LineTooLong(size)
            else:
                yield line


def load_dataset(path: str | Path, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> list[Example]:
    """Read and validate a JSONL file; raise DatasetError listing every bad line."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"dataset not found: {path}")
    report = read_jsonl(iter_byte_lines(path, max_line_bytes), max_line_bytes)
    if not report.ok:
        raise DatasetError(str(path), report)
    return report.examples


def missing_fields(examples: list[Example], needed: set[str]) -> list[LineError]:
    """Lines that lack a field the reward graders read."""
    return [
        LineError(e.line, name, "missing, but the reward spec reads it")
        for e in examples
        for name in sorted(needed)
        if name not in e.fields
    ]


def split_heldout(examples: list[Example], size: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Carve `size` examples out for evaluation with a seeded shuffle; returns (train, heldout)."""
    if size <= 0:
        return list(examples), []
    if size >= len(examples):
        raise InvalidInput(
            f"data.eval_size {size} leaves no training examples (the dataset has {len(examples)})"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    heldout = set(order[:size])
    return (
        [e for i, e in enumerate(examples) if i not in heldout],
        [e for i, e in enumerate(examples) if i in heldout],
    )


def examples_at_step(pool: list[T], step: int, size: int, seed: str) -> list[T]:
    """The `size` examples of `step`: the pool in a seeded shuffle per epoch, so any step's batch
    is found without replaying the steps before it (a resumed run sees the same data)."""
    batch = []
    for i in range(step * size, (step + 1) * size):
        epoch, index = divmod(i, len(pool))
        batch.append(pool[_epoch_order(f"{seed}-{epoch}", len(pool))[index]])
    return batch


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: str, size: int) -> tuple[int, ...]:
    order = list(range(size))
    random.Random(seed).shuffle(order)
    return tuple(order)


def length_stats(lengths: list[int]) -> dict[str, float]:
    """min / mean / p50 / p95 / max of token lengths (empty -> zeros)."""
    if not lengths:
        return {"min": 0, "mean": 0.0, "p50": 0, "p95": 0, "max": 0}
    ordered = sorted(lengths)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {
        "min": ordered[0],
        "mean": round(statistics.fmean(ordered), 2),
        "p50": ordered[(len(ordered) - 1) // 2],
        "p95": p95,
        "max": ordered[-1],
    }
