"""Datasets: JSONL examples, validated line by line, with a held-out split.

A line is one JSON object with a `prompt` (string) or `messages` (chat list), an optional
`demonstration` (string, or a final assistant message) and any other fields, which are passed
to reward graders. Validation reads bytes, so it reports bad encodings, and never stops at the
first problem: every bad line is listed with its number, field and reason.
"""

from __future__ import annotations

import json
import random
import statistics
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
DEFAULT_MAX_LINE_BYTES = 1 << 20  # 1 MiB: a long context, far from a memory problem
_MAX_REPORTED_ERRORS = 100


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


class DatasetError(ValueError):
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
            if messages[-1]["role"] == "assistant":
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
        messages.append({"role": role, "content": content})
    return (None if errors else messages), errors


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def read_jsonl(
    lines: Iterable[bytes | LineTooLong],
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    keep_examples: bool = True,
) -> DatasetReport:
    """Validate JSONL from raw byte lines. Blank lines are skipped; a UTF-8 BOM and CRLF are accepted.

    With keep_examples=False only counts are kept, so memory stays flat for any file size.
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
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            fail(LineError(number, None, f"not valid UTF-8 (byte {exc.start + 1} of the line)"))
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except RecursionError:
            fail(LineError(number, None, "JSON nested too deeply"))
            continue
        except json.JSONDecodeError as exc:
            fail(LineError(number, None, f"not valid JSON: {exc.msg} at column {exc.colno}"))
            continue
        example, errors = parse_example(obj, number)
        for error in errors:
            fail(error)
        if example is not None:
            report.count(example)
            if keep_examples:
                report.examples.append(example)
    return report


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
        raise FileNotFoundError(f"dataset not found: {path}")
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
        raise ValueError(f"eval_size {size} leaves no training examples (the dataset has {len(examples)})")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    heldout = set(order[:size])
    return (
        [e for i, e in enumerate(examples) if i not in heldout],
        [e for i, e in enumerate(examples) if i in heldout],
    )


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
