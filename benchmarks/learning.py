"""Learning benchmark: sft, rft, sft_then_rft and prefix_rft on two-digit addition.

Every run gets the same budget of sequences (steps x prompts x rollouts; SFT trains on as many
demonstrations per step) and is evaluated with greedy decoding on the same 200 held-out
problems. Writes a JSON of every evaluation, a PNG of held-out accuracy against step, and a
markdown table of the final numbers.

    python -m benchmarks.learning --steps 20 --eval-every 10 --out docs/benchmarks/learning [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("benchmarks.learning")

METHODS = ("sft", "rft", "sft_then_rft", "prefix_rft")
ADAPTERS = ("prefix", "lora")


def run_one(method: str, adapter: str, settings: dict[str, Any], data_dir: str) -> dict[str, Any]:
    """Train one (method, adapter) pair; returns its evaluations and timings."""
    import torch

    torch.set_num_threads(settings["threads"])
    _configure_logging()
    from cli.trainer_commands import _quiet_libraries
    from core.config import parse_config
    from core.reporting import TrainerCallback
    from core.trainer import Trainer

    _quiet_libraries()

    class Collect(TrainerCallback):
        def __init__(self) -> None:
            self.evals: list[dict[str, Any]] = []
            self.steps: list[dict[str, Any]] = []

        def on_eval(self, metrics: dict[str, Any]) -> None:
            self.evals.append(metrics)
            log.info(
                "  [%s/%s] eval @ %d: accuracy %.3f", method, adapter, metrics["step"], metrics["accuracy"]
            )

        def on_step(self, metrics: dict[str, Any]) -> None:
            self.steps.append({k: v for k, v in metrics.items() if isinstance(v, int | float | str)})

    learning_rate = (
        settings["lr_prefix"] if adapter == "prefix" else settings["lr_lora"]
    )  # None: the adapter's default
    config = parse_config(
        {
            "model": "smollm2-135m-instruct",
            "method": method,
            "adapter": {"type": adapter},
            "data": {"train": f"{data_dir}/train.jsonl", "eval": f"{data_dir}/eval.jsonl"},
            "reward": {"graders": [{"type": "numeric", "name": "correct", "extract": "last_number"}]},
            "training": {
                "steps": settings["steps"],
                "prompts_per_step": settings["prompts_per_step"],
                "rollouts_per_prompt": settings["rollouts_per_prompt"],
                "max_completion_tokens": settings["max_completion_tokens"],
                "samples_per_step": 0,
                **({"learning_rate": learning_rate} if learning_rate else {}),
            },
            "eval": {"every": settings["eval_every"], "max_examples": settings["eval_examples"]},
            "seed": settings["seed"],
            "output_dir": f"{data_dir}/runs/{method}-{adapter}",
        }
    )
    learning_rate = config.learning_rate
    collect = Collect()
    started = time.perf_counter()
    Trainer(config, callbacks=[collect]).train()
    return {
        "method": method,
        "adapter": adapter,
        "learning_rate": learning_rate,
        "wall_minutes": (time.perf_counter() - started) / 60,
        "evals": [
            {"step": e["step"], "accuracy": e["accuracy"], "reward_mean": e["reward_mean"]}
            for e in collect.evals
        ],
        "steps": collect.steps,
    }


def _run_star(args: tuple) -> dict[str, Any]:
    return run_one(*args)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(METHODS, ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=True))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        xs = [e["step"] for e in r["evals"]]
        ys = [100 * e["accuracy"] for e in r["evals"]]
        style = "-" if r["adapter"] == "prefix" else "--"
        ax.plot(
            xs, ys, style, marker="o", color=colours[r["method"]], label=f"{r['method']} ({r['adapter']})"
        )
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out accuracy, greedy (%)")
    ax.set_title("Two-digit addition, SmolLM2-135M-Instruct")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| method | adapter | lr | base acc. | final acc. | gain (points) | best acc. | minutes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        accuracies = [e["accuracy"] for e in r["evals"]]
        base, final = accuracies[0], accuracies[-1]
        lines.append(
            f"| {r['method']} | {r['adapter']} | {r['learning_rate']:g} | {100 * base:.1f}% | {100 * final:.1f}% "
            f"| {100 * (final - base):+.1f} | {100 * max(accuracies):.1f}% | {r['wall_minutes']:.1f} |"
        )
    return "\n".join(lines)


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)


def main(argv: list[str] | None = None) -> int:
    _configure_logging()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--adapters", nargs="+", default=list(ADAPTERS), choices=ADAPTERS)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--rollouts-per-prompt", type=int, default=8)
    parser.add_argument("--max-completion-tokens", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-examples", type=int, default=200)
    parser.add_argument("--lr-prefix", type=float, help="default: the prefix adapter's default")
    parser.add_argument("--lr-lora", type=float, help="default: the LoRA adapter's default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs in parallel (torch threads are split among them)"
    )
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/learning"))
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.provenance import provenance
    from examples.addition.make_data import addition_splits, write_jsonl

    argv = sys.argv[1:] if argv is None else argv
    origin = provenance(shlex.join(["python", "-m", "benchmarks.learning", *argv]), args.out)

    settings = {
        "steps": args.steps,
        "prompts_per_step": args.prompts_per_step,
        "rollouts_per_prompt": args.rollouts_per_prompt,
        "max_completion_tokens": args.max_completion_tokens,
        "eval_every": args.eval_every,
        "eval_examples": args.eval_examples,
        "lr_prefix": args.lr_prefix,
        "lr_lora": args.lr_lora,
        "seed": args.seed,
        "threads": max(1, (os.cpu_count() or 1) // args.jobs),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    from core.models import resolve_model_dir

    resolve_model_dir("smollm2-135m-instruct")  # convert once, before the runs start
    with tempfile.TemporaryDirectory(prefix="prefix-rft-learning-") as data_dir:
        train, heldout = addition_splits(2000, args.eval_examples, args.seed)
        write_jsonl(Path(data_dir) / "train.jsonl", train)
        write_jsonl(Path(data_dir) / "eval.jsonl", heldout)
        runs = [(m, a, settings, data_dir) for a in args.adapters for m in args.methods]
        log.info(
            "%d runs x %d steps x %d sequences",
            len(runs),
            args.steps,
            args.prompts_per_step * args.rollouts_per_prompt,
        )
        if args.jobs > 1:
            with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
                results = pool.map(_run_star, runs, chunksize=1)
        else:
            results = [run_one(*run) for run in runs]

    report = {**origin, "settings": settings, "results": results}
    (args.out / "learning.json").write_text(json.dumps(report, indent=2))
    plot(results, args.out / "accuracy.png")
    summary = table(results)
    (args.out / "table.md").write_text(summary + "\n")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
