"""calculate_output: arithmetic over grader scores, and everything else refused with where it is."""

from __future__ import annotations

import math

import pytest

from core.rewards.formula import FormulaError, parse_formula

NAMES = {"correct", "style"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.5 * correct + 0.5 * style", 0.5 * 1 + 0.5 * 0.25),
        ("correct - style / 2", 1 - 0.125),
        ("style ^ 2", 0.0625),  # ^ is a power, not Python's xor
        ("2 * style ^ 2", 0.125),  # and binds tighter than *
        ("2 ^ 3 ^ 2", 512),  # right-associative
        ("-style + +correct", 0.75),
        ("(correct + style) * 2", 2.5),
        ("min(1, correct + style)", 1),
        ("max(style, 0.1, 0.2)", 0.25),
        ("abs(style - correct)", 0.75),
        ("floor(2.7) + ceil(0.2)", 3),
        ("sqrt(style) + exp(0) + log(1)", 1.5),
        ("0.7", 0.7),
    ],
)
def test_formulas_compute_over_the_scores(text, expected):
    formula = parse_formula(text, NAMES)
    assert formula({"correct": 1.0, "style": 0.25}) == pytest.approx(expected)


def test_the_names_used_are_known():
    assert parse_formula("0.5 * correct + 1", NAMES).names == {"correct"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("correct + typo", "names 'typo', which is no grader here (graders: correct, style)"),
        ('__import__("os").system("x")', "can be called"),
        ("open('f')", "only min max abs floor ceil exp sqrt log can be called"),
        ("correct.real", "`correct.real` is not allowed"),
        ("[correct]", "`[correct]` is not allowed"),
        ("correct if style else 0", "is not allowed"),
        ("correct > style", "is not allowed"),
        ("'text'", "the constant 'text' is not a number"),
        ("True", "the constant True is not a number"),
        ("max()", "max() takes at least one argument, got 0"),
        ("sqrt(1, 2)", "sqrt() takes 1 argument, got 2"),
        ("min(correct, key=style)", "min() takes no keyword arguments"),
        ("min", "names 'min', which is no grader here"),
        ("(correct", "is not a formula at column"),
        ("lambda: 1", "is not allowed"),
        ("x" * 1001, "over the limit of 1000"),
    ],
)
def test_everything_else_is_refused_with_what_is_wrong(text, message):
    with pytest.raises(FormulaError) as caught:
        parse_formula(text, NAMES)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("correct / style", "ZeroDivisionError"),
        ("log(style)", "ValueError: math domain error"),
        ("(0 - correct) ^ 0.5", "is not a finite number here"),
        ("10 ^ (400 * correct)", "OverflowError"),
        ("exp(1000 * correct)", "OverflowError"),
    ],
)
def test_a_formula_that_cannot_be_computed_for_a_sample_says_why(text, message):
    formula = parse_formula(text, NAMES)
    with pytest.raises(FormulaError) as caught:
        formula({"correct": 1.0, "style": 0.0})
    assert message in str(caught.value)
    assert math.isfinite(formula({"correct": 0.0, "style": 1.0}))
