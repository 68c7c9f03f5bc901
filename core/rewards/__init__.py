"""Rewards: pure grader functions `(completions, **columns) -> list[float]` and weighted specs.

Python graders (user code) run in the sandbox of core.rewards.sandbox, never in this process.
"""

from core.rewards.graders import PythonGrader
from core.rewards.sandbox import SandboxLimits, SandboxPool, SandboxUnavailable
from core.rewards.spec import Grader, JudgeUnavailable, RewardResult, RewardSpec, score_completions

__all__ = [
    "Grader",
    "JudgeUnavailable",
    "PythonGrader",
    "RewardResult",
    "RewardSpec",
    "SandboxLimits",
    "SandboxPool",
    "SandboxUnavailable",
    "score_completions",
]
