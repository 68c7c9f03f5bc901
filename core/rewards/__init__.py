"""Rewards: pure grader functions `(completions, **columns) -> list[float]` and weighted specs."""

from core.rewards.spec import Grader, RewardResult, RewardSpec, score_completions

__all__ = ["Grader", "RewardResult", "RewardSpec", "score_completions"]
