"""OpenAI's grader templates: `{{item.answer}}`, `{{ sample.output_json.email }}`, `{{sample.output_tools[0].name}}`.

A template is text with `{{ namespace.path }}` references. `item` is the dataset row (every key
but the prompt's `messages`/`prompt` and `tools`), `sample` is what the model produced, built by
`sample_of` as OpenAI describes it: `output_text`, `output_json` (the text parsed, when it is
JSON), `output_tools`, `choices`. A path is keys after dots and list indices in brackets. A
reference that does not resolve raises InvalidVariable, and `output_json` of a text that is not
JSON raises SampleParseError: the grader scores 0 there and the error is counted by kind, as
OpenAI's `invalid_variable_error` and `sample_parse_error`.
"""

from __future__ import annotations

import json
import re
from typing import Any

_REFERENCE = re.compile(r"\{\{\s*(.*?)\s*\}\}")
_STEP = re.compile(r"\.([^.\[\]\s]+)|\[\s*(-?\d+)\s*\]")
_NAMESPACES = ("item", "sample")
ITEM_EXCLUDED = ("tools",)  # with the prompt itself, which an Example keeps apart


class InvalidVariable(LookupError):
    """A template reference that does not resolve: OpenAI's invalid_variable_error."""


class SampleParseError(ValueError):
    """The sample cannot be read as the template asks (output_json of a text that is not JSON)."""


def sample_of(completion: str) -> dict[str, Any]:
    """The `sample` namespace of one completion, in the layout OpenAI's graders see."""
    try:
        output_json = json.loads(completion)
    except ValueError:
        output_json = None
    return {
        "output_text": completion,
        "output_json": output_json if isinstance(output_json, dict | list) else None,
        "output_tools": [],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": completion}}],
    }


def item_of(example: dict[str, Any]) -> dict[str, Any]:
    """The `item` namespace: the dataset row's own fields."""
    return {key: value for key, value in example.items() if key not in ITEM_EXCLUDED}


def references(template: str) -> list[tuple[str, list[str | int]]]:
    """Each reference as (namespace, path); ValueError naming a reference that cannot be read."""
    found = []
    for match in _REFERENCE.finditer(template):
        found.append(parse_reference(match.group(1)))
    return found


def parse_reference(text: str) -> tuple[str, list[str | int]]:
    namespace = re.match(r"\w*", text).group(0)  # type: ignore[union-attr]
    if namespace not in _NAMESPACES:
        raise ValueError(f"template reference {{{{{text}}}}}: the namespace must be item or sample")
    rest = text[len(namespace) :]
    path: list[str | int] = []
    position = 0
    for step in _STEP.finditer(rest):
        if step.start() != position:
            break
        path.append(step.group(1) if step.group(1) is not None else int(step.group(2)))
        position = step.end()
    if position != len(rest):
        raise ValueError(
            f"template reference {{{{{text}}}}} cannot be read after {namespace + rest[:position]!r}"
        )
    return namespace, path


def item_fields(template: str) -> set[str]:
    """Top-level item keys the template reads (checked against a dataset before training)."""
    return {str(path[0]) for namespace, path in references(template) if namespace == "item" and path}


def resolve(namespace: str, path: list[str | int], sample: dict[str, Any], item: dict[str, Any]) -> Any:
    if namespace == "sample" and path[:1] == ["output_json"] and sample.get("output_json") is None:
        raise SampleParseError("the sample is not JSON, so sample.output_json has nothing to read")
    value: Any = sample if namespace == "sample" else item
    walked = namespace
    for step in path:
        in_list = isinstance(step, int) and isinstance(value, list) and -len(value) <= step < len(value)
        if in_list or (isinstance(step, str) and isinstance(value, dict) and step in value):
            value = value[step]
        else:
            raise InvalidVariable(f"{walked} has no {f'[{step}]' if isinstance(step, int) else repr(step)}")
        walked += f"[{step}]" if isinstance(step, int) else f".{step}"
    return value


def render(template: str, sample: dict[str, Any], item: dict[str, Any]) -> str:
    """The template with every reference replaced: strings as they are, other values as JSON."""

    def value_of(match: re.Match[str]) -> str:
        namespace, path = parse_reference(match.group(1))
        value = resolve(namespace, path, sample, item)
        return value if isinstance(value, str) else json.dumps(value)

    return _REFERENCE.sub(value_of, template)
