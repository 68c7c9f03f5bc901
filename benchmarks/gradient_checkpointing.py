"""Memory and time of one policy update with and without training.gradient_checkpointing.

    python -m benchmarks.gradient_checkpointing --runs 3 --out docs/benchmarks/gradient_checkpointing.json

The update of the example config (SmolLM2-135M-Instruct, 4 prompts x 8 rollouts of 64 response
tokens, micro-batches of 16, one hybrid rollout per prompt), on fixed token rows, so both sides do
the same work. Each run is a fresh process: it loads the model, runs the update once to warm up,
then `--updates` times timed. Memory is the peak resident memory during the updates above what
the process held before the first (the activations and gradients of the update, and what the
allocator keeps of them), sampled every 2 ms. Printed side by side per adapter: the median over
runs, with the range.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.provenance import provenance, spread, write_report

log = logging.getLogger("benchmarks.gradient_checkpointing")

ADAPTERS = {"lora": {"type": "lora", "r": 8}, "prefix": {"type": "prefix"}}
PROMPTS, ROLLOUTS, RESPONSE_TOKENS, MICRO_BATCH = 4, 8, 64, 16


class PeakMemory:
    """The largest resident set size seen while inside the `with`, sampled in a thread."""

    def __init__(self, every: float = 0.002) -> None:
        import psutil

        self.process, self.every, self.peak = psutil.Process(), every, 0
        self._done = threading.Event()

    def __enter__(self) -> PeakMemory:
        self.before = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.every)

    def __exit__(self, *_: Any) -> None:
        self._done.set()
        self._thread.join()

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.before) / 2**20


def measure(adapter: str, checkpointing: bool, updates: int, work_dir: Path) -> dict[str, Any]:
    """In this process: build the trainer, make fixed rollouts, time `updates` policy updates."""
    import torch

    from core.config import parse_config
    from core.trainer import Rollouts, Trainer
    from examples.addition.make_data import addition_splits, write_jsonl

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    train, _ = addition_splits(train_size=64, eval_size=0, seed=0)
    write_jsonl(work_dir / "train.jsonl", train)
    config = parse_config(
        {
            "model": "smollm2-135m-instruct",
            "adapter": ADAPTERS[adapter],
            "data": {"train": str(work_dir / "train.jsonl")},
            "reward": {"graders": [{"type": "numeric", "extract": "last_number"}]},
            "training": {
                "steps": 1,
                "prompts_per_step": PROMPTS,
                "rollouts_per_prompt": ROLLOUTS,
                "max_completion_tokens": RESPONSE_TOKENS,
                "micro_batch_size": MICRO_BATCH,
                "device": "cpu",
                "dtype": "float32",
                "gradient_checkpointing": checkpointing,
            },
            "output_dir": str(work_dir / "run"),
        }
    )
    trainer = Trainer(config)
    examples = trainer.train_examples[:PROMPTS]
    responses, prefix_lengths, groups = [], [], []
    for g, example in enumerate(examples):
        demo = example.demo_ids
        for k in range(ROLLOUTS):
            responses.append([demo[(i + k) % len(demo)] for i in range(RESPONSE_TOKENS)])
            prefix_lengths.append(len(demo) // 2 if k == 0 else 0)  # one hybrid rollout per prompt
            groups.append(g)
    texts = trainer.tokenizer.batch_decode(responses)
    rollouts = Rollouts(examples, responses, prefix_lengths, groups, texts)
    advantages = torch.linspace(-1, 1, len(responses))

    seconds = []
    with PeakMemory() as memory:  # from before the first update: what the allocator keeps counts
        trainer.policy_update(rollouts, advantages)  # warm-up: allocator, kernels (not timed)
        for _ in range(updates):
            started = time.perf_counter()
            trainer.policy_update(rollouts, advantages)
            seconds.append(time.perf_counter() - started)
    prompt_tokens = sum(len(e.prompt_ids) for e in examples) / len(examples)
    return {
        "update_seconds": statistics.median(seconds),
        "peak_extra_mib": memory.extra_mib,
        "mean_prompt_tokens": prompt_tokens,
    }


def run_in_child(adapter: str, checkpointing: bool, updates: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as work_dir:
        out = Path(work_dir) / "result.json"
        command = [sys.executable, "-m", "benchmarks.gradient_checkpointing", "--child", adapter]
        command += [
            "--checkpointing",
            str(int(checkpointing)),
            "--updates",
            str(updates),
            "--child-out",
            str(out),
        ]
        subprocess.run(command, check=True)
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="Fresh processes per configuration.")
    parser.add_argument(
        "--updates", type=int, default=3, help="Measured updates per run (after one warm-up)."
    )
    parser.add_argument("--out", type=Path, help="Write the results here (JSON).")
    parser.add_argument("--child", choices=sorted(ADAPTERS), help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        with tempfile.TemporaryDirectory() as work_dir:
            result = measure(args.child, bool(args.checkpointing), args.updates, Path(work_dir))
        args.child_out.write_text(json.dumps(result))
        return 0

    results: dict[str, Any] = {}
    for adapter in ADAPTERS:
        for checkpointing in (False, True):
            runs = [run_in_child(adapter, checkpointing, args.updates) for _ in range(args.runs)]
            results[f"{adapter}/{'on' if checkpointing else 'off'}"] = {
                "runs": runs,
                "update_seconds": spread([r["update_seconds"] for r in runs]),
                "peak_extra_mib": spread([r["peak_extra_mib"] for r in runs]),
            }
    lines = [
        f"one policy update: {PROMPTS} x {ROLLOUTS} rows of {RESPONSE_TOKENS} response tokens, "
        f"micro-batch {MICRO_BATCH}; median of {args.runs} runs [min-max]",
        f"{'adapter':8s} {'memory off (MiB)':>22s} {'memory on (MiB)':>22s} {'saved':>6s} "
        f"{'time off (s)':>18s} {'time on (s)':>18s} {'slower':>7s}",
    ]
    for adapter in ADAPTERS:
        off, on = results[f"{adapter}/off"], results[f"{adapter}/on"]

        def cell(stats: dict[str, float], digits: int) -> str:
            return f"{stats['median']:.{digits}f} [{stats['min']:.{digits}f}-{stats['max']:.{digits}f}]"

        saved = 1 - on["peak_extra_mib"]["median"] / off["peak_extra_mib"]["median"]
        slower = on["update_seconds"]["median"] / off["update_seconds"]["median"] - 1
        lines.append(
            f"{adapter:8s} {cell(off['peak_extra_mib'], 0):>22s} {cell(on['peak_extra_mib'], 0):>22s} "
            f"{saved:6.0%} {cell(off['update_seconds'], 2):>18s} {cell(on['update_seconds'], 2):>18s} {slower:7.0%}"
        )
    table = "\n".join(lines)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info("%s", table)
    if args.out:
        command = "python -m benchmarks.gradient_checkpointing " + " ".join(argv or sys.argv[1:])
        record = {**provenance(command, args.out), "table": table.splitlines(), "results": results}
        write_report(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
