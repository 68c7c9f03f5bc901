"""A finished job's step metrics as the CSV OpenAI's `result_files` hold.

OpenAI's columns come first (`step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy`),
then ours; a cell is empty where the job has no such number (a supervised job has no reward, we
measure no token accuracy). Plain CSV, not base64.
"""

from __future__ import annotations

import csv
import io
from typing import Any

# (column, split, our metric name); split "train" reads the step's row, "eval" its evaluation.
COLUMNS = (
    ("step", None, None),
    ("train_loss", "train", "loss"),
    ("train_accuracy", "train", "accuracy"),
    ("valid_loss", "eval", "loss"),
    ("valid_mean_token_accuracy", "eval", "mean_token_accuracy"),
    ("train_mean_reward", "train", "reward_mean"),
    ("valid_mean_reward", "eval", "reward_mean"),
    ("valid_accuracy", "eval", "accuracy"),
    ("trained_tokens", "train", "trained_tokens"),
)


def results_csv(train: dict[int, dict[str, Any]], evals: dict[int, dict[str, Any]]) -> str:
    """One row per step that trained or was evaluated (step 0: before training), in step order."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(name for name, _, _ in COLUMNS)
    for step in sorted(set(train) | set(evals)):
        rows = {"train": train.get(step, {}), "eval": evals.get(step, {})}
        writer.writerow(
            [step] + [_cell(rows[split].get(key)) for _, split, key in COLUMNS[1:]]  # type: ignore[index]
        )
    return out.getvalue()


def _cell(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return ""
    return repr(value) if isinstance(value, float) else str(value)
