"""Grader templates: {{item.x}} and {{sample.output_json.a}} resolve, or say what does not."""

from __future__ import annotations

import pytest

from core.rewards.templates import (
    InvalidVariable,
    SampleParseError,
    item_fields,
    item_of,
    render,
    sample_of,
)

SAMPLE = sample_of('{"email": "a@example.com", "tags": ["x", {"deep": null}], "n": 2}')
ITEM = {"answer": "42", "count": 3, "meta": {"ids": [7, 8]}}


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{item.answer}}", "42"),
        ("{{ item.answer }}", "42"),
        ("{{sample.output_json.email}}", "a@example.com"),
        ("{{sample.output_json.tags[1].deep}}", "null"),  # JSON null is a value, not a miss
        ("{{item.meta.ids[-1]}}", "8"),
        ("n={{item.count}}, ids={{item.meta.ids}}", "n=3, ids=[7, 8]"),
        ("{{sample.choices[0].message.role}}", "assistant"),
        ("no references", "no references"),
    ],
)
def test_references_resolve_strings_as_they_are_and_other_values_as_json(template, expected):
    assert render(template, SAMPLE, ITEM) == expected


def test_the_sample_is_laid_out_as_openai_describes_it():
    sample = sample_of("just text")
    assert sample["output_text"] == "just text"
    assert sample["output_json"] is None
    assert sample["output_tools"] == []
    assert sample["choices"][0]["message"]["content"] == "just text"
    assert sample_of("[1, 2]")["output_json"] == [1, 2]
    assert sample_of("3")["output_json"] is None  # JSON, but not an object or a list


@pytest.mark.parametrize(
    ("template", "error", "message"),
    [
        ("{{item.missing}}", InvalidVariable, "item has no 'missing'"),
        ("{{item.meta.ids[5]}}", InvalidVariable, "item.meta.ids has no [5]"),
        ("{{item.answer.inner}}", InvalidVariable, "item.answer has no 'inner'"),
        ("{{sample.output_json.email}}", SampleParseError, "the sample is not JSON"),
    ],
)
def test_a_reference_that_does_not_resolve_says_which(template, error, message):
    with pytest.raises(error) as caught:
        render(template, sample_of("not json"), ITEM)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{{answer}}", "the namespace must be item or sample"),
        ("{{model.x}}", "the namespace must be item or sample"),
        ("{{item.a b}}", "cannot be read after 'item.a'"),
        ("{{item.a[x]}}", "cannot be read after 'item.a'"),
    ],
)
def test_references_that_cannot_be_read_are_refused(template, message):
    with pytest.raises(ValueError) as caught:
        item_fields(template)
    assert message in str(caught.value)


def test_the_item_fields_a_template_reads():
    assert item_fields("{{item.a.b}} {{ item.c[0] }} {{sample.output_text}} {{item}}") == {"a", "c"}
    assert item_of({"answer": 1, "tools": [], "demonstration": "d"}) == {"answer": 1, "demonstration": "d"}
