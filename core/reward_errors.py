"""What a run does when reward graders fail: report each new kind of error once, and fail the job
when a grader keeps failing on too many samples (the reward needs fixing, not the model)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.errors import InvalidInput
from core.rewards import RewardResult

MAX_REPORTED_ERRORS = 20  # distinct reward errors reported as events per run; the rest are counted


class RewardErrorRateExceeded(InvalidInput):
    """A grader kept failing on too many samples: the reward needs fixing, not the model."""


@dataclass(frozen=True)
class RewardErrorEvent:
    message: str
    data: dict[str, Any]


@dataclass
class RewardErrorPolicy:
    """Which reward errors were reported already, and for how many steps each grader failed too often."""

    max_rate: float  # training.max_reward_error_rate
    steps: int  # training.reward_error_steps
    streaks: dict[str, int] = field(default_factory=dict)
    reported: set[tuple[str, str]] = field(default_factory=set)

    def new_errors(self, result: RewardResult, step: int) -> list[RewardErrorEvent]:
        """An event for each kind of error (grader, last traceback line) not reported before."""
        samples = len(result.totals)
        events = []
        for label, failures in result.failures.items():
            for failure in failures:
                key = (label, failure.strip().splitlines()[-1] if failure else "")
                if failure and key not in self.reported and len(self.reported) < MAX_REPORTED_ERRORS:
                    self.reported.add(key)
                    failed = result.errors[label]
                    events.append(
                        RewardErrorEvent(
                            f"reward grader {label!r} failed on {failed} of {samples} samples at step {step}: "
                            f"{key[1]}",
                            {
                                "grader": label,
                                "step": step,
                                "failed": failed,
                                "samples": samples,
                                "traceback": failure,
                            },
                        )
                    )
        return events

    def check_rate(self, result: RewardResult, step: int) -> None:
        """Count this step; raise when a grader's error rate stayed over the limit for `steps` steps."""
        samples = len(result.totals)
        failing = None
        for label in result.per_grader:
            over = result.errors.get(label, 0) / max(samples, 1) > self.max_rate
            self.streaks[label] = self.streaks.get(label, 0) + 1 if over else 0
            if self.streaks[label] >= self.steps and failing is None:
                failing = label
        if failing is not None:
            last = next(f for f in reversed(result.failures[failing]) if f)
            raise RewardErrorRateExceeded(
                f"reward grader {failing!r} failed on more than {self.max_rate:.0%} of the samples for "
                f"{self.steps} steps in a row ({result.errors[failing]} of {samples} at step {step}; "
                f"training.max_reward_error_rate). Last error:\n{last[-1500:]}"
            )
