"""Terminal progress for CLI runs: a progress bar with the key metrics, and a closing summary."""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

from core.reporting import TrainerCallback, TrainResult


class ProgressReporter(TrainerCallback):
    def __init__(self, total_steps: int):
        self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)
        self.last_step: dict[str, Any] = {}

    def on_step(self, metrics: dict[str, Any]) -> None:
        self.last_step = metrics
        self.bar.n = metrics["step"]
        shown = {"loss": f"{metrics['loss']:.4f}"}
        if "reward_mean" in metrics:
            shown["reward"] = f"{metrics['reward_mean']:.3f}"
        if "demo_prefix_low" in metrics:
            shown["prefix"] = f"{metrics['demo_prefix_low']:.2f}-{metrics['demo_prefix_high']:.2f}"
        shown["s/step"] = f"{metrics['step_time_s']:.1f}"
        self.bar.set_postfix(shown, refresh=True)

    def on_eval(self, metrics: dict[str, Any]) -> None:
        accuracy = f", accuracy {metrics['accuracy']:.1%}" if "accuracy" in metrics else ""
        self.bar.write(
            f"eval @ step {metrics['step']}: reward {metrics['reward_mean']:.3f}{accuracy} "
            f"on {metrics['examples']} held-out examples"
        )

    def on_checkpoint(self, step: int, path) -> None:
        self.bar.write(f"checkpoint @ step {step}: {path}")

    def close(self) -> None:
        self.bar.close()

    @staticmethod
    def summary(result: TrainResult) -> str:
        lines = [f"{'stopped' if result.stopped else 'finished'} after {result.steps_done} steps"]
        for label, metrics in (("before", result.initial_eval), ("after", result.final_eval)):
            if metrics:
                accuracy = f"  accuracy {metrics['accuracy']:.1%}" if "accuracy" in metrics else ""
                lines.append(f"  {label:6s} reward {metrics['reward_mean']:.3f}{accuracy}")
        if result.adapter_dir:
            lines.append(f"adapter: {result.adapter_dir}  (load with PeftModel.from_pretrained(base, dir))")
        return "\n".join(lines)
