"""The addition tasks of the examples and the learning study: demonstrations and splits."""

from __future__ import annotations

from pathlib import Path

import pytest

from examples.addition.make_data import PHRASINGS, addition_splits, unordered_pair_splits, worked_solution


def test_worked_solutions_hand_checked():
    assert worked_solution(37, 45) == (
        "Ones: 7 + 5 = 12, write 2 and carry 1. Tens: 3 + 4 + 1 = 8. So 37 + 45 = 82. The answer is 82."
    )
    assert worked_solution(964, 494) == (
        "Ones: 4 + 4 = 8. Tens: 6 + 9 = 15, write 5 and carry 1. Hundreds: 9 + 4 + 1 = 14. "
        "So 964 + 494 = 1458. The answer is 1458."
    )
    assert worked_solution(505, 495).endswith(
        "Hundreds: 5 + 4 + 1 = 10. So 505 + 495 = 1000. The answer is 1000."
    )


@pytest.mark.parametrize("digits", [2, 3])
def test_splits_are_disjoint_as_unordered_pairs(digits):
    splits = unordered_pair_splits(digits, (100, 100, 2000), seed=0)
    assert [len(s) for s in splits] == [100, 100, 2000]
    unordered = [{tuple(sorted(p)) for p in split} for split in splits]
    assert sum(len(u) for u in unordered) == 2200  # no pair twice, in either order
    low, high = 10 ** (digits - 1), 10**digits
    assert all(low <= x < high for split in splits for pair in split for x in pair)
    assert any(a > b for a, b in splits[2]) and any(a < b for a, b in splits[2])  # both orders occur
    assert unordered_pair_splits(digits, (100, 100, 2000), seed=0) == splits  # seeded


def test_training_uses_one_phrasing_and_held_out_problems_cycle_through_all():
    train, heldout = addition_splits(50, 8, seed=1)
    assert {row["prompt"].split(" ")[0] for row in train} == {"What"}
    assert [row["phrasing"] for row in heldout] == [0, 1, 2, 3, 0, 1, 2, 3]
    for row in heldout:
        a, b = (int(t.strip("?.")) for t in row["prompt"].split() if t.strip("?.").isdigit())
        assert row["prompt"] == PHRASINGS[row["phrasing"]].format(a=a, b=b)
        assert row["answer"] == str(a + b) and row["demonstration"].endswith(f"The answer is {a + b}.")


def test_too_many_problems_are_refused():
    with pytest.raises(ValueError, match="at most 4095"):
        unordered_pair_splits(2, (4000, 100), seed=0)


def test_the_example_grader_is_one_grader_a_job_accepts():
    import yaml

    from core.config import parse_grader

    grader = yaml.safe_load((Path(__file__).parents[1] / "examples/addition/grader.yaml").read_text())
    spec = parse_grader(grader)
    assert [g.type for g in spec.graders] == ["numeric"]
