"""The files every run writes (RunFiles), and the reward-error policy, without a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.reporting import RunFiles, TrainResult
from core.reward_errors import MAX_REPORTED_ERRORS, RewardErrorPolicy, RewardErrorRateExceeded
from core.rewards import RewardResult


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_files_log_steps_evaluations_and_samples(tmp_path):
    files = RunFiles(tmp_path / "run")
    files.on_train_begin(0)
    files.on_eval({"step": 0, "reward_mean": 0.1})
    files.on_step({"step": 1, "loss": 0.5})
    files.on_samples(1, [{"step": 1, "completion": "a"}, {"step": 1, "completion": "b"}])
    files.on_train_end(TrainResult(1, False, None, {"step": 1, "reward_mean": 0.2}, {"step": 0}))
    run = tmp_path / "run"
    assert rows(run / "metrics.jsonl") == [{"step": 1, "loss": 0.5}]
    assert rows(run / "eval.jsonl") == [{"step": 0, "reward_mean": 0.1}]
    assert [r["completion"] for r in rows(run / "samples.jsonl")] == ["a", "b"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary == {"steps": 1, "initial_eval": {"step": 0}, "final_eval": {"step": 1, "reward_mean": 0.2}}


def test_a_resumed_run_drops_what_was_written_after_its_checkpoint(tmp_path):
    files = RunFiles(tmp_path)
    for step in (1, 2, 3, 4):
        files.on_step({"step": step})
    files.on_eval({"step": 2})
    files.on_eval({"step": 4})
    files.on_train_begin(2)  # resumed from the checkpoint of step 2
    assert [r["step"] for r in rows(tmp_path / "metrics.jsonl")] == [1, 2]
    assert [r["step"] for r in rows(tmp_path / "eval.jsonl")] == [2]


def test_a_new_run_in_an_old_directory_starts_its_logs_afresh(tmp_path):
    old = RunFiles(tmp_path)
    old.on_eval({"step": 0})
    old.on_step({"step": 1})
    RunFiles(tmp_path).on_train_begin(0)
    assert rows(tmp_path / "metrics.jsonl") == [] and rows(tmp_path / "eval.jsonl") == []


def test_a_stopped_run_writes_no_summary(tmp_path):
    RunFiles(tmp_path).on_train_end(TrainResult(3, True, None, None, None))
    assert not (tmp_path / "summary.json").exists()


def result(failures: list[str | None], grader: str = "g") -> RewardResult:
    return RewardResult(
        totals=[0.0] * len(failures),
        per_grader={grader: [0.0] * len(failures)},
        errors={grader: sum(f is not None for f in failures)},
        failures={grader: failures},
    )


TRACE = "Traceback (most recent call last):\n  ...\nKeyError: 'answer'"


def test_each_kind_of_reward_error_is_reported_once():
    policy = RewardErrorPolicy(max_rate=1.0, steps=3)
    [event] = policy.new_errors(result([TRACE, None, TRACE, None]), step=1)
    assert event.message == "reward grader 'g' failed on 2 of 4 samples at step 1: KeyError: 'answer'"
    assert event.data == {"grader": "g", "step": 1, "failed": 2, "samples": 4, "traceback": TRACE}
    assert policy.new_errors(result([TRACE] * 4), step=2) == []  # the same error again
    other = TRACE.replace("KeyError: 'answer'", "ZeroDivisionError: division by zero")
    assert len(policy.new_errors(result([other]), step=3)) == 1


def test_reported_reward_errors_are_bounded():
    policy = RewardErrorPolicy(max_rate=1.0, steps=3)
    distinct = [f"ValueError: {i}" for i in range(MAX_REPORTED_ERRORS + 5)]
    assert len(policy.new_errors(result(distinct), step=1)) == MAX_REPORTED_ERRORS


def test_a_grader_failing_too_often_for_steps_in_a_row_fails_the_run():
    policy = RewardErrorPolicy(max_rate=0.5, steps=2)
    half, most = [TRACE, None], [TRACE, TRACE, None]
    policy.check_rate(result(most), step=1)  # over the rate: 1 step in a row
    policy.check_rate(result(half), step=2)  # 50% is not over 50%: the streak starts again
    policy.check_rate(result(most), step=3)
    with pytest.raises(RewardErrorRateExceeded) as caught:
        policy.check_rate(result(most), step=4)
    message = str(caught.value)
    assert message.startswith("reward grader 'g' failed on more than 50% of the samples for 2 steps in a row")
    assert "(2 of 3 at step 4; training.max_reward_error_rate)" in message
    assert message.endswith("KeyError: 'answer'")
