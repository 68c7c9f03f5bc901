"""One run over two processes (torchrun, gloo on CPU) equals one process at the same global batch.

What is compared, on the tiny random model in float32: per step, the loss, the reward mean and
standard deviation, the response length, the demonstration-prefix tokens kept by the entropy
mask and the gradient norm; each held-out evaluation's reward and response length; and every
tensor of the exported adapter. Rollouts are made identical by sampling every row from its own
seed, (run seed, step, row), so the two runs sample the same tokens: their rewards, lengths and
kept-token counts must be equal exactly. What can differ is float rounding, since a rank batches
its rows (and pads them) differently from one process: losses and gradient norms within 1e-5
relative, adapter tensors within 1e-5 of the tensor's largest value (AdamW's first steps move
every coordinate by about the learning rate whatever the gradient's size, so a coordinate whose
gradient is rounding noise moves by a rounding-sized fraction of it).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from core.config import parse_config
from core.distributed import Ranks, concat_reward_results, shard
from core.models import load_base_model
from core.rewards import score_completions
from core.rollout import sample, stop_token_ids
from core.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
RELATIVE = 1e-5


def test_shards_are_contiguous_cover_everything_and_differ_by_at_most_one():
    for count in range(0, 12):
        for world in (1, 2, 3, 5):
            shares = [shard(count, rank, world) for rank in range(world)]
            assert [i for s in shares for i in s] == list(range(count))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_one_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ranks = Ranks.from_environment()
    assert (ranks.rank, ranks.world_size, ranks.is_main, ranks.distributed) == (0, 1, True, False)
    assert ranks.gather("x") == ["x"] and ranks.from_main(3) == 3 and ranks.sum([1.5]) == [1.5]


def test_rewards_scored_in_parts_equal_rewards_scored_at_once():
    spec = parse_config(
        {
            "model": "tiny-random",
            "data": {"train": "unused.jsonl"},
            "reward": {
                "graders": [
                    {"type": "contains", "value": "a", "name": "has_a"},
                    {"type": "numeric", "field": "answer", "name": "number"},
                ]
            },
        }
    ).reward
    texts = ["a 1", "b 2", "a", "c 3", "aa 4"]
    examples = [{"answer": "1"}, {"answer": "2"}, {}, {"answer": "9"}, {"answer": "4"}]
    whole = score_completions(spec, texts, examples)
    parts = [
        score_completions(spec, texts[s.start : s.stop], examples[s.start : s.stop])
        for s in (range(0, 2), range(2, 2), range(2, 5))
    ]
    merged = concat_reward_results(parts)
    assert merged.totals == whole.totals and merged.per_grader == whole.per_grader
    assert merged.errors == whole.errors and merged.failures == whole.failures
    assert merged.correct == whole.correct


def test_a_seeded_row_samples_the_same_tokens_in_any_batch():
    """What makes the rollouts of N ranks those of one process: a row's draws are its own."""
    model, tokenizer = load_base_model("tiny-random")
    stops, pad = stop_token_ids(model, tokenizer), tokenizer.pad_token_id
    rows = [[5, 6, 7], [8, 9], [5, 6, 7], [10, 11, 12, 13]]
    seeds = [11, 12, 13, 14]
    together = sample(model, rows, 16, stops, pad, row_seeds=seeds)
    apart = [
        sample(model, [row], 16, stops, pad, row_seeds=[seed])[0]
        for row, seed in zip(rows, seeds, strict=True)
    ]
    assert together == apart
    assert together[0] != together[2]  # the same prompt, its own draws
    assert sample(model, rows[:1], 16, stops, pad, row_seeds=[99]) != together[:1]


def _letters(path: Path) -> Path:
    rows = [
        {"prompt": f"write something {i}", "demonstration": "a banana and a llama", "answer": "a"}
        for i in range(24)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(data: Path, out: Path, method: str, adapter: dict, **training) -> dict:
    return {
        "model": "tiny-random",
        "method": method,
        "adapter": adapter,
        "data": {"train": str(data), "eval_size": 5},
        "reward": {"graders": [{"type": "contains", "value": "a"}]},
        "training": {
            "steps": 3,
            "prompts_per_step": 5,  # 3 groups on rank 0, 2 on rank 1
            "rollouts_per_prompt": 4,
            "max_completion_tokens": 10,
            "micro_batch_size": 3,
            "samples_per_step": 0,
            "dtype": "float32",
            "device": "cpu",
            **training,
        },
        "eval": {"every": 2},
        "output_dir": str(out),
        "seed": 3,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= RELATIVE * max(abs(a), abs(b), 1e-12)


@pytest.mark.parametrize(
    "method, adapter, training, launch",
    [
        # hybrids, the entropy mask over both ranks; torchrun starts the CLI
        ("prefix_rft", {"type": "prefix"}, {}, "torchrun"),
        # 2 mini-batches split over the ranks; the CLI starts torchrun (training.processes)
        ("psft", {"type": "lora", "r": 4}, {"psft_minibatches": 2, "sft_examples_per_step": 7}, "config"),
    ],
)
def test_two_processes_train_what_one_process_trains(tmp_path, method, adapter, training, launch):
    data = _letters(tmp_path / "letters.jsonl")
    one, two = tmp_path / "one", tmp_path / "two"
    config = _config(data, one, method, adapter, **training)
    Trainer(parse_config(config)).train()

    config_file = tmp_path / "two.yaml"
    config_file.write_text(yaml.safe_dump({**config, "output_dir": str(two)}))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"OMP_NUM_THREADS": "1", "PREFIX_RFT_DISTRIBUTED_BACKEND": "gloo"}
    if launch == "torchrun":
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
            "-m", "cli.main", "train", str(config_file),
        ]  # fmt: skip
    else:
        command = [
            sys.executable,
            "-m",
            "cli.main",
            "train",
            str(config_file),
            "--set",
            "training.processes=2",
        ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]

    steps_one, steps_two = _rows(one / "metrics.jsonl"), _rows(two / "metrics.jsonl")
    assert len(steps_one) == len(steps_two) == 3
    exact = ("reward_mean", "reward_std", "response_length", "demo_prefix_tokens_trained", "trained_tokens")
    for a, b in zip(steps_one, steps_two, strict=True):
        for key in exact:
            assert a.get(key) == b.get(key), (key, a, b)
        for key in ("loss", "grad_norm", "clip_fraction", "entropy"):
            if key in a:
                assert _close(a[key], b[key]), (key, a[key], b[key])
    evals_one, evals_two = _rows(one / "eval.jsonl"), _rows(two / "eval.jsonl")
    assert [e["step"] for e in evals_one] == [e["step"] for e in evals_two] == [0, 2, 3]
    for a, b in zip(evals_one, evals_two, strict=True):
        assert (a["reward_mean"], a["response_length"]) == (b["reward_mean"], b["response_length"])
    if method == "prefix_rft":
        assert all(m["demo_prefix_tokens_trained"] > 0 for m in steps_one)

    adapter_one = load_file(one / "adapter" / "adapter_model.safetensors")
    adapter_two = load_file(two / "adapter" / "adapter_model.safetensors")
    assert adapter_one.keys() == adapter_two.keys()
    for name, tensor in adapter_one.items():
        scale = tensor.abs().max().item()
        assert torch.allclose(tensor, adapter_two[name], rtol=0, atol=RELATIVE * scale), name
    assert all(m["grad_norm"] > 0 for m in steps_one)  # the adapters moved
    # Rank 0 alone wrote the run's files: one line per step, not two.
    assert "loading tiny-random" in done.stdout and done.stdout.count("loading tiny-random") == 1
