"""Declarative graders, extractors and weighted reward specs, with hand-computed expected values."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from core.rewards import RewardSpec, score_completions
from core.rewards.extract import answer_tag, extract_answer, last_boxed, last_line, last_number
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
from core.rewards.spec import Grader

# --- extractors -------------------------------------------------------------------------------


def test_last_number_strips_thousands_separators():
    assert last_number("so 1,024.5 total") == "1024.5"
    assert last_number("first 3, then 1,000,000 apples") == "1000000"
    assert last_number("x = -7 and y = 2.5e3") == "2.5e3"
    assert last_number("in 2023, 5 apples") == "5"
    assert last_number("no digits here") is None


def test_last_number_with_leading_decimal_point():
    assert last_number("the answer is .5") == ".5"
    assert NumericMatch().score("the answer is .5", {"answer": 0.5}) == 1.0


def test_last_boxed_balances_nested_braces():
    assert last_boxed(r"so \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{1} or rather \boxed{{2}}") == "{2}"
    assert last_boxed(r"\boxed{\frac{1}{2}") is None  # never closed
    assert last_boxed("no box") is None


def test_answer_tag_and_last_line():
    assert answer_tag("<answer> 7 </answer> then <answer>\n 8 \n</answer>") == "8"
    assert answer_tag("<answer>7") is None
    assert last_line("a\n  b  \n\n") == "b"
    assert last_line("   \n ") is None


def test_extract_pattern_uses_first_group_of_last_match():
    text = "Final: a ... Final: b"
    assert extract_answer(text, pattern=r"Final: (\w+)") == "b"
    assert extract_answer(text, pattern=r"Final: \w+") == "Final: b"  # no group: whole match
    assert extract_answer(text, pattern=r"Result: (\w+)") is None
    # the pattern overrides the named extractor
    assert extract_answer("3 <answer>x</answer>", "last_number", pattern=r"<answer>(.*)</answer>") == "x"
    assert extract_answer("keep me", "none") == "keep me"


# --- graders ----------------------------------------------------------------------------------


def test_exact_match():
    g = ExactMatch()
    assert g.score("  42\n", {"answer": 42}) == 1.0
    assert g.score("42.0", {"answer": "42"}) == 0.0
    assert g.score("Paris", {"answer": "paris"}) == 0.0
    assert ExactMatch(case_sensitive=False).score("Paris", {"answer": "paris"}) == 1.0
    assert ExactMatch(field="gold", extract="answer_tag").score("<answer>x</answer>", {"gold": "x"}) == 1.0
    # nothing extracted scores 0
    assert ExactMatch(extract="answer_tag").score("x", {"answer": "x"}) == 0.0


def test_contains():
    assert Contains(value="because").score("yes, because", {}) == 1.0
    assert Contains(value="because").score("yes, Because", {}) == 0.0
    assert Contains(value="because", case_sensitive=False).score("yes, Because", {}) == 1.0
    assert Contains().score("the capital is Paris.", {"answer": "Paris"}) == 1.0
    assert Contains().score("the capital is Lyon.", {"answer": "Paris"}) == 0.0
    assert Contains(value="x").fields_needed() == set()
    assert Contains().fields_needed() == {"answer"}


def test_regex():
    assert RegexMatch(pattern=r"\d{3}").score("code 123 ok", {}) == 1.0
    assert RegexMatch(pattern=r"\d{3}").score("code 12 ok", {}) == 0.0
    assert RegexMatch(pattern=r"\d{3}", mode="fullmatch").score("code 123 ok", {}) == 0.0
    assert RegexMatch(pattern=r"\d{3}", mode="fullmatch").score("123", {}) == 1.0
    assert RegexMatch(pattern=r"a.b").score("a\nb", {}) == 1.0  # DOTALL


def test_numeric():
    g = NumericMatch()  # extracts the last number by default
    assert g.score("so 1,024.5 total", {"answer": "1024.5"}) == 1.0
    assert g.score("so 1,024.5 total", {"answer": 1024.5}) == 1.0
    assert g.score("it is 1024", {"answer": "1,024"}) == 1.0
    assert g.score("it is 1024.5", {"answer": 1024}) == 0.0
    assert g.score("no number", {"answer": 3}) == 0.0
    assert g.score("3", {"answer": "three"}) == 0.0  # unparseable reference
    assert NumericMatch(abs_tol=0.1).score("3.05", {"answer": 3}) == 1.0
    assert NumericMatch(rel_tol=0.01).score("101", {"answer": 100}) == 1.0
    assert NumericMatch().score("101", {"answer": 100}) == 0.0


def test_math():
    g = MathMatch()
    assert g.score(r"The answer is $\frac{1}{2}$", {"answer": "0.5"}) == 1.0
    assert g.score(r"\boxed{\frac{1}{2}}", {"answer": "1/2"}) == 1.0
    assert g.score(r"$\frac{1}{3}$", {"answer": "1/2"}) == 0.0
    assert MathMatch(extract="answer_tag").score(r"$\frac{1}{2}$", {"answer": "1/2"}) == 0.0


SCHEMA = {"type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}}}


def test_json_schema_inline():
    g = JsonSchemaValid.model_validate({"type": "json_schema", "schema": SCHEMA})
    assert g.score('{"a": 1}', {}) == 1.0
    assert g.score('{"a": 1}', {}) == 1.0  # the cached validator is reused
    assert g.score('{"a": "x"}', {}) == 0.0
    assert g.score('{"b": 1}', {}) == 0.0
    assert g.score("not json", {}) == 0.0
    assert JsonSchemaValid(schema=SCHEMA, extract="answer_tag").score('<answer>{"a": 2}</answer>', {}) == 1.0


def test_json_schema_from_field():
    g = JsonSchemaValid(field="schema")
    assert g.fields_needed() == {"schema"}
    assert g.score('{"a": 1}', {"schema": SCHEMA}) == 1.0
    assert g.score('{"a": 1}', {"schema": '{"type": "array"}'}) == 0.0  # a schema given as a string
    assert g.score("[1]", {"schema": '{"type": "array"}'}) == 1.0


def test_json_schema_needs_exactly_one_source():
    with pytest.raises(ValidationError):
        JsonSchemaValid()
    with pytest.raises(ValidationError):
        JsonSchemaValid(schema=SCHEMA, field="schema")


def test_similarity():
    g = Similarity()
    # Indel: "abcd" vs "abce" share 3 chars; distance 2 over 8 chars -> 1 - 2/8
    assert g.score("abcd", {"answer": "abce"}) == pytest.approx(0.75)
    assert g.score("  same ", {"answer": "same"}) == 1.0
    assert g.score("abc", {"answer": "xyz"}) == 0.0
    assert g.score("ABCD", {"answer": "abcd"}) == 0.0
    assert Similarity(case_sensitive=False).score("ABCD", {"answer": "abcd"}) == 1.0
    assert not Similarity.binary


def test_length():
    g = LengthWithin(min=2, max=4)
    assert g.score("ab", {}) == 1.0
    assert g.score("abcd", {}) == 1.0
    assert g.score("a", {}) == 0.0
    assert g.score("abcde", {}) == 0.0
    words = LengthWithin(unit="words", min=2, max=3)
    assert words.score("one two three", {}) == 1.0
    assert words.score("one two three four", {}) == 0.0
    assert words.score("one", {}) == 0.0
    assert LengthWithin(min=3).score("x" * 10_000, {}) == 1.0  # no max
    with pytest.raises(ValidationError):
        LengthWithin(min=5, max=4)


def test_format():
    g = FormatTags(tags=["think", "answer"])
    assert g.score("<think>hmm\nyes</think>\n<answer>4</answer>", {}) == 1.0
    assert g.score("<answer>4</answer><think>hmm</think>", {}) == 0.0  # wrong order
    assert g.score("<think>hmm</think><answer>4", {}) == 0.0  # unclosed
    assert g.score("<think>hmm</think>", {}) == 0.0
    with pytest.raises(ValidationError):
        FormatTags(tags=["a b"])
    with pytest.raises(ValidationError):
        FormatTags(tags=[])


def test_grader_is_a_trl_reward_function():
    g = NumericMatch()
    completions = ["it is 42", "it is 41", "no idea"]
    assert g(completions, answer=["42", "42", "42"], prompt=["p1", "p2", "p3"]) == [1.0, 0.0, 0.0]
    assert FormatTags(tags=["answer"])(["<answer>x</answer>", "x"]) == [1.0, 0.0]


# --- specs ------------------------------------------------------------------------------------


def _spec(*graders: dict) -> RewardSpec:
    return RewardSpec.model_validate({"graders": list(graders)})


def test_score_completions_weighted_totals():
    spec = _spec(
        {"type": "numeric", "weight": 1.0},
        {"type": "format", "name": "fmt", "tags": ["answer"], "weight": 0.5},
    )
    completions = ["<answer>42</answer>", "42", "<answer>41</answer>", "nothing"]
    examples = [{"answer": 42}] * 4
    result = score_completions(spec, completions, examples)
    assert result.per_grader == {"numeric": [1.0, 1.0, 0.0, 0.0], "fmt": [1.0, 0.0, 1.0, 0.0]}
    assert result.totals == pytest.approx([1.5, 1.0, 0.5, 0.0])
    assert result.correct == [True, False, False, False]
    assert result.errors == {}
    assert result.error_count == 0
    assert result.error_messages == []
    assert spec.labels == ["numeric", "fmt"]
    assert spec.is_binary


def test_negative_weight_counts_in_total_but_not_in_correct():
    spec = _spec(
        {"type": "numeric", "weight": 2.0},
        {"type": "length", "name": "too_long", "min": 10, "weight": -0.5},
    )
    result = score_completions(spec, ["so 42", "so it is 42"], [{"answer": 42}, {"answer": 42}])
    assert result.per_grader == {"numeric": [1.0, 1.0], "too_long": [0.0, 1.0]}
    assert result.totals == pytest.approx([2.0, 1.5])
    assert result.correct == [True, True]


def test_correct_is_none_with_a_similarity_grader():
    spec = _spec({"type": "exact_match"}, {"type": "similarity", "weight": 0.5})
    result = score_completions(spec, ["abcd", "abce"], [{"answer": "abcd"}, {"answer": "abcd"}])
    assert not spec.is_binary
    assert result.correct is None
    assert result.per_grader["similarity"] == pytest.approx([1.0, 0.75])
    assert result.totals == pytest.approx([1.5, 0.375])


def test_failing_grader_scores_zero_and_is_counted():
    spec = _spec(
        {"type": "exact_match", "field": "gold", "weight": 1.0},
        {"type": "numeric", "weight": 0.5},
    )
    completions = ["7", "7", "8"]
    examples = [{"gold": "7", "answer": 7}, {"answer": 7}, {"gold": "8", "answer": 7}]
    result = score_completions(spec, completions, examples)
    assert result.per_grader == {"exact_match": [1.0, 0.0, 1.0], "numeric": [1.0, 1.0, 0.0]}
    assert result.totals == pytest.approx([1.5, 0.5, 1.0])
    assert result.errors == {"exact_match": 1}
    assert result.error_count == 1
    assert len(result.error_messages) == 1
    assert "exact_match" in result.error_messages[0]
    assert "gold" in result.error_messages[0]
    assert result.correct == [True, False, False]


def test_error_messages_are_capped_but_all_errors_counted():
    spec = _spec({"type": "exact_match", "field": "gold"})
    result = score_completions(spec, ["x"] * 8, [{}] * 8)
    assert result.errors == {"exact_match": 8}
    assert result.totals == [0.0] * 8
    assert len(result.error_messages) == 5


def test_score_completions_length_mismatch_raises():
    spec = _spec({"type": "numeric"})
    with pytest.raises(ValueError):
        score_completions(spec, ["1", "2"], [{"answer": 1}])


@pytest.mark.parametrize(
    "graders",
    [
        pytest.param([{"type": "numeric"}, {"type": "numeric", "field": "other"}], id="duplicate-names"),
        pytest.param([{"type": "regex", "pattern": "("}], id="invalid-regex"),
        pytest.param([{"type": "numeric", "extract_pattern": "[a-"}], id="invalid-extract-pattern"),
        pytest.param([{"type": "json_schema", "schema": {"type": "not-a-type"}}], id="bad-json-schema"),
        pytest.param([], id="empty-graders"),
        pytest.param([{"type": "nope"}], id="unknown-type"),
        pytest.param([{"type": "numeric", "fild": "x"}], id="unknown-field"),
        pytest.param([{"type": "contains", "field": None}], id="contains-without-source"),
    ],
)
def test_reward_spec_validation_errors(graders):
    with pytest.raises(ValidationError):
        RewardSpec.model_validate({"graders": graders})


def test_duplicate_names_error_names_the_label():
    with pytest.raises(ValidationError, match="numeric"):
        _spec({"type": "numeric"}, {"type": "numeric", "field": "other"})
    # distinct names make the same types fine
    spec = _spec({"type": "numeric"}, {"type": "numeric", "name": "other_num", "field": "other"})
    assert spec.labels == ["numeric", "other_num"]


def test_grader_union_dispatches_on_type():
    grader = TypeAdapter(Grader).validate_python({"type": "regex", "pattern": "x"})
    assert isinstance(grader, RegexMatch)


def test_fields_needed():
    spec = _spec(
        {"type": "numeric"},
        {"type": "exact_match", "field": "gold"},
        {"type": "contains", "value": "because"},
        {"type": "json_schema", "field": "schema_field"},
        {"type": "json_schema", "name": "inline", "schema": SCHEMA},
        {"type": "format", "tags": ["answer"]},
        {"type": "length", "max": 100},
        {"type": "regex", "pattern": "x"},
    )
    assert spec.fields_needed() == {"answer", "gold", "schema_field"}
