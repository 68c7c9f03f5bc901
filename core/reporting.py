"""What a run reports: the callbacks the trainer calls, and the files every run writes.

The CLI draws a progress bar with these callbacks (cli/progress.py), the worker turns them into
database rows (worker/runner.py), and `RunFiles`, which every Trainer has, writes them under the
run's output directory:

    metrics.jsonl   one line per step        eval.jsonl     one line per evaluation
    samples.jsonl   completions and rewards  summary.json   the result of a finished run
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class TrainResult:
    steps_done: int
    stopped: bool
    adapter_dir: Path | None
    final_eval: dict[str, Any] | None
    initial_eval: dict[str, Any] | None
    stop_reason: str | None = None  # why early stopping ended the run, if it did


class TrainerCallback:
    """Hooks the CLI and the worker implement; every method is optional."""

    def on_train_begin(self, step: int) -> None:
        """Training starts at `step`: 0 for a new run, the checkpoint's step when resuming."""

    def on_step(self, metrics: dict[str, Any]) -> None: ...
    def on_eval(self, metrics: dict[str, Any]) -> None: ...
    def on_samples(self, step: int, samples: list[dict[str, Any]]) -> None: ...
    def on_checkpoint(self, step: int, path: Path) -> None: ...
    def on_event(self, message: str, level: str = "info", data: dict[str, Any] | None = None) -> None:
        """Something the job's owner should read (a failing reward grader and its traceback, ...)."""

    def on_train_end(self, result: TrainResult) -> None: ...

    def should_stop(self) -> bool:
        return False


class RunFiles(TrainerCallback):
    """The run's JSONL logs and summary, in its output directory."""

    LOGS = ("metrics.jsonl", "eval.jsonl", "samples.jsonl")

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)

    def on_train_begin(self, step: int) -> None:
        # A resumed run drops the rows written after its checkpoint, so its logs read as one run;
        # a new run starts them afresh.
        for name in self.LOGS:
            _keep_rows_up_to(self.out_dir / name, step)

    def on_step(self, metrics: dict[str, Any]) -> None:
        self._append("metrics.jsonl", [metrics])

    def on_eval(self, metrics: dict[str, Any]) -> None:
        self._append("eval.jsonl", [metrics])

    def on_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        self._append("samples.jsonl", samples)

    def on_train_end(self, result: TrainResult) -> None:
        if result.stopped:
            return
        summary = {
            "steps": result.steps_done,
            "initial_eval": result.initial_eval,
            "final_eval": result.final_eval,
        }
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))

    def _append(self, name: str, rows: list[dict[str, Any]]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with (self.out_dir / name).open("a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)


def _keep_rows_up_to(path: Path, step: int) -> None:
    """Drop the rows written after `step`; at step 0, a new run, drop them all."""
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line and step > 0 and json.loads(line).get("step", 0) <= step
    ]
    path.write_text("".join(line + "\n" for line in kept))
