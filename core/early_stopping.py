"""Early stopping: when to end a run that has nothing left to gain. Pure bookkeeping, no torch.

Two signals, each opt-in:
- the held-out reward has not improved by more than `min_delta` over its best for `patience`
  evaluations in a row (the best so far is the one to keep);
- every group of `zero_variance_steps` training steps in a row had the same reward for all its
  rollouts: every advantage was 0, so the updates had nothing to learn from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class EarlyStopping:
    patience: int | None = None
    min_delta: float = 0.0
    zero_variance_steps: int | None = None
    best_reward: float | None = None
    best_step: int | None = None
    evaluations_since_best: int = 0
    flat_steps: int = 0

    def after_evaluation(self, step: int, reward: float) -> tuple[bool, str | None]:
        """(whether this evaluation is the new best, the reason to stop or None)."""
        if self.best_reward is None or reward > self.best_reward + self.min_delta:
            self.best_reward, self.best_step, self.evaluations_since_best = reward, step, 0
            return True, None
        self.evaluations_since_best += 1
        if self.patience is not None and self.evaluations_since_best >= self.patience:
            return False, (
                f"the held-out reward has not improved by more than {self.min_delta:g} for "
                f"{self.evaluations_since_best} evaluations (best {self.best_reward:.4f} at step {self.best_step})"
            )
        return False, None

    def after_step(self, zero_variance_groups: int, groups: int) -> str | None:
        """The reason to stop after a training step with `zero_variance_groups` of `groups` flat."""
        self.flat_steps = self.flat_steps + 1 if groups and zero_variance_groups == groups else 0
        if self.zero_variance_steps is not None and self.flat_steps >= self.zero_variance_steps:
            return (
                f"every group had the same reward for all its rollouts for {self.flat_steps} steps in a row: "
                "no advantage left to learn from"
            )
        return None

    def state(self) -> dict:
        return asdict(self)

    def load_state(self, state: dict) -> None:
        for name in ("best_reward", "best_step", "evaluations_since_best", "flat_steps"):
            setattr(self, name, state.get(name, getattr(self, name)))
