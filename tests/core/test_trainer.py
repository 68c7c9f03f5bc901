"""The training loop on the tiny model: hybrid rollouts, masks, KL, export, resume, learning."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from core.config import parse_config
from core.data import DatasetError
from core.models import load_base_model
from core.reporting import TrainerCallback
from core.rollout import response_batch, response_log_probs
from core.trainer import Trainer


def write_dataset(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_config(data: Path, out: Path, **overrides):
    raw = {
        "model": "tiny-random",
        "data": {"train": str(data)},
        "reward": {"graders": [{"type": "contains", "value": "a"}]},
        "training": {
            "steps": 2,
            "prompts_per_step": 2,
            "rollouts_per_prompt": 4,
            "max_completion_tokens": 12,
            "micro_batch_size": 3,
            "samples_per_step": 2,
        },
        "output_dir": str(out),
        "seed": 7,
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            raw.setdefault(section, {})[field] = value
        else:
            raw[section] = value
    return parse_config(raw)


class Recorder(TrainerCallback):
    def __init__(self, stop_after: int | None = None):
        self.steps: list[dict] = []
        self.evals: list[dict] = []
        self.stop_after = stop_after

    def on_step(self, metrics):
        self.steps.append(metrics)

    def on_eval(self, metrics):
        self.evals.append(metrics)

    def should_stop(self):
        return self.stop_after is not None and len(self.steps) >= self.stop_after


def learning_run(data: Path, out: Path, steps: int, learning_rate: float, **overrides) -> Recorder:
    """A learning test's run: 8 prompts x 8 rollouts of at most 6 tokens per step."""
    recorder = Recorder()
    training = {
        "steps": steps,
        "prompts_per_step": 8,
        "rollouts_per_prompt": 8,
        "max_completion_tokens": 6,
        "learning_rate": learning_rate,
        "samples_per_step": 0,
        **overrides.pop("training", {}),
    }
    Trainer(make_config(data, out, training=training, **overrides), [recorder]).train()
    return recorder


def test_hybrid_rollouts_continue_a_cut_of_the_demonstration(letters, tmp_path):
    trainer = Trainer(
        make_config(
            letters, tmp_path / "run", training__rollouts_per_prompt=4, training__hybrid_rollouts_per_prompt=2
        )
    )
    examples = trainer.train_examples[:3]
    torch.manual_seed(0)
    import random

    rollouts = trainer.generate_rollouts(examples, 0.3, 0.9, random.Random(0))
    assert len(rollouts.responses) == 12
    for row, (group, cut) in enumerate(zip(rollouts.groups, rollouts.demo_prefix_lengths, strict=True)):
        demo = examples[group].demo_ids
        k = row % 4
        if k < 2:  # the first H rollouts of a group are hybrids
            assert 1 <= cut <= len(demo) - 1
            assert math.floor(0.3 * len(demo)) <= cut <= max(1, math.floor(0.9 * len(demo)))
            assert rollouts.responses[row][:cut] == demo[:cut]  # ids, never re-tokenised
            assert len(rollouts.responses[row]) > cut  # the model wrote at least one token
        else:
            assert cut == 0
        assert len(rollouts.responses[row]) <= 12
    _, prefix_mask = trainer._token_tensors(rollouts, list(range(12)))
    assert prefix_mask.sum(1).tolist() == rollouts.demo_prefix_lengths


def test_rft_has_no_hybrids_and_prefix_rft_trains_the_top_fifth_of_prefix_tokens(letters, tmp_path):
    recorder = Recorder()
    Trainer(make_config(letters, tmp_path / "rft", method="rft"), [recorder]).train()
    assert all(m["hybrid_rollouts"] == 0 and m["demo_prefix_tokens_trained"] == 0 for m in recorder.steps)

    recorder = Recorder()
    trainer = Trainer(make_config(letters, tmp_path / "prefix"), [recorder])
    captured = {}
    original = trainer.generate_rollouts

    def spy(*args, **kwargs):
        captured["rollouts"] = rollouts = original(*args, **kwargs)
        return rollouts

    trainer.generate_rollouts = spy
    trainer.train()
    last = recorder.steps[-1]
    assert last["hybrid_rollouts"] == 2  # H = 1 per prompt, 2 prompts
    n_prefix = sum(captured["rollouts"].demo_prefix_lengths)
    assert last["demo_prefix_tokens_trained"] == math.ceil(0.2 * n_prefix)
    low, high = trainer.demo_prefix_window(1)
    assert last["demo_prefix_low"] == pytest.approx(low) and last["demo_prefix_high"] == high


def test_step_metrics_cover_the_run(letters, tmp_path):
    recorder = Recorder()
    out = tmp_path / "run"
    Trainer(make_config(letters, out, data__eval_size=4), [recorder]).train()
    expected = {
        "loss", "reward_mean", "reward_std", "reward/contains", "accuracy", "demo_prefix_low", "demo_prefix_high",
        "demo_prefix_ratio_mean", "demo_prefix_tokens_trained", "entropy", "clip_fraction", "response_length",
        "rollout_tokens_per_s", "step_time_s", "reward_errors", "grad_norm", "lr",
    }  # fmt: skip
    assert expected <= set(recorder.steps[0])
    assert [m["step"] for m in recorder.steps] == [1, 2]
    assert [e["step"] for e in recorder.evals] == [0, 2]  # before training and at the end
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {"completion", "reward", "rewards", "prompt"} <= set(samples[0])


def test_kl_reference_is_the_initial_adapter(letters, tmp_path):
    recorder = Recorder()
    Trainer(
        make_config(letters, tmp_path / "run", training__kl_beta=0.1, training__steps=2), [recorder]
    ).train()
    first, second = recorder.steps
    assert first["kl"] == pytest.approx(0.0, abs=1e-7)  # step 0: policy == reference
    assert first["clip_fraction"] == 0.0  # and the ratio is exactly 1
    assert second["kl"] > 0.0


@pytest.mark.parametrize(
    "adapter",
    [
        {"type": "prefix"},
        {"type": "prefix", "prefix_projection": True, "num_virtual_tokens": 4},
        {"type": "lora", "r": 4},
    ],
)
def test_exported_adapter_loads_with_plain_peft_and_gives_the_same_logits(letters, tmp_path, adapter):
    trainer = Trainer(make_config(letters, tmp_path / "run", adapter=adapter, training__learning_rate=0.05))
    result = trainer.train()
    assert (result.adapter_dir / "adapter_config.json").is_file()
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    base, _ = load_base_model("tiny-random", dtype=trainer.dtype)  # the weights it trained on
    loaded = PeftModel.from_pretrained(base, result.adapter_dir)
    batch = response_batch([[5, 6, 7, 8]], [[9, 10, 11]], 0, torch.device("cpu"))
    with torch.no_grad():
        expected, _ = response_log_probs(trainer.model, batch)
        got, _ = response_log_probs(loaded, batch)
        with loaded.disable_adapter():
            untrained, _ = response_log_probs(loaded, batch)
    assert torch.allclose(got, expected, atol=1e-5)
    assert (untrained - expected).abs().max() > 1e-4  # the adapter carries the training


@pytest.mark.parametrize(
    ("method", "adapter"),
    [
        ("prefix_rft", {"type": "prefix"}),
        ("prefix_rft", {"type": "prefix", "prefix_projection": True, "num_virtual_tokens": 4}),
        ("sft_then_rft", {"type": "lora", "r": 4}),
    ],
)
def test_resume_equals_an_uninterrupted_run(letters, tmp_path, method, adapter):
    overrides = {
        "method": method,
        "adapter": adapter,
        "training__steps": 4,
        "checkpoint__every": 2,
        "training__learning_rate": 0.02,
    }
    straight = Recorder()
    Trainer(make_config(letters, tmp_path / "straight", **overrides), [straight]).train()

    out = tmp_path / "resumed"
    first = Recorder(stop_after=2)
    result = Trainer(make_config(letters, out, **overrides), [first]).train()
    assert result.stopped and result.steps_done == 2
    assert (out / "checkpoints" / "step-000002" / "trainer_state.pt").is_file()
    second = Recorder()
    Trainer(make_config(letters, out, **overrides), [second]).train(resume_from=out)

    def comparable(m):
        return {k: v for k, v in m.items() if not k.endswith(("_s", "_per_s"))}

    assert [comparable(m) for m in first.steps + second.steps] == [comparable(m) for m in straight.steps]
    a = (tmp_path / "straight" / "adapter" / "adapter_model.safetensors").read_bytes()
    b = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a == b
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
        4,
    ]


def test_seeded_runs_are_reproducible(letters, tmp_path):
    runs = []
    for name in ("a", "b"):
        recorder = Recorder()
        Trainer(make_config(letters, tmp_path / name), [recorder]).train()
        runs.append([m["loss"] for m in recorder.steps] + [m["reward_mean"] for m in recorder.steps])
    assert runs[0] == runs[1]


def test_sft_lowers_the_demonstration_loss(letters, tmp_path):
    recorder = Recorder()
    config = make_config(
        letters,
        tmp_path / "sft",
        method="sft",
        adapter={"type": "lora"},
        training__steps=8,
        training__learning_rate=0.05,
    )
    Trainer(config, [recorder]).train()
    losses = [m["loss"] for m in recorder.steps]
    assert all(m["phase"] == "sft" for m in recorder.steps)
    assert losses[-1] < losses[0] * 0.8


def test_sft_then_rft_switches_phase(letters, tmp_path):
    recorder = Recorder()
    Trainer(
        make_config(letters, tmp_path / "run", method="sft_then_rft", training__steps=4), [recorder]
    ).train()
    assert [m["phase"] for m in recorder.steps] == ["sft", "sft", "rft", "rft"]
    assert recorder.steps[2]["hybrid_rollouts"] == 0
    assert recorder.steps[2]["demo_prefix_low"] == pytest.approx(0.95)  # RFT phase's schedule starts at 0


def test_missing_reward_fields_are_reported_before_training(tmp_path):
    data = write_dataset(tmp_path / "d.jsonl", [{"prompt": "x", "answer": "1"}, {"prompt": "y"}])
    config = make_config(data, tmp_path / "run", reward={"graders": [{"type": "numeric", "field": "answer"}]})
    with pytest.raises(DatasetError, match=r"line 2.*answer"):
        Trainer(config)


def test_stop_request_ends_the_run_early(letters, tmp_path):
    recorder = Recorder(stop_after=1)
    result = Trainer(make_config(letters, tmp_path / "run", training__steps=5), [recorder]).train()
    assert result.stopped and result.steps_done == 1 and result.adapter_dir is None


@pytest.mark.slow
def test_a_tiny_model_learns_a_trivially_learnable_reward(letters, tmp_path):
    recorder = learning_run(
        letters, tmp_path / "learn", 40, 0.03, method="rft", adapter={"type": "lora", "r": 8}
    )
    rewards = [m["reward_mean"] for m in recorder.steps]
    first, last = rewards[0], sum(rewards[-5:]) / 5
    assert first < 0.3 and last > 0.9, rewards


def test_several_updates_per_batch_use_the_sampling_policy_as_pi_old(letters, tmp_path):
    recorder = Recorder()
    config = make_config(
        letters,
        tmp_path / "run",
        adapter={"type": "lora", "r": 4},
        training__updates_per_batch=3,
        training__learning_rate=0.05,
    )
    Trainer(config, [recorder]).train()
    # With pi_old fixed at the sampling policy, later passes move the ratio away from 1 and clip.
    assert any(m["clip_fraction"] > 0 for m in recorder.steps)
    assert all(math.isfinite(m["loss"]) for m in recorder.steps)


@pytest.mark.parametrize(
    ("method", "adapter"),
    [("prefix_rft", {"type": "prefix", "num_virtual_tokens": 4}), ("sft_then_rft", {"type": "lora", "r": 4})],
)
def test_gradient_checkpointing_trains_the_same_adapter(letters, tmp_path, method, adapter):
    overrides = {"method": method, "adapter": adapter, "training__steps": 4, "training__learning_rate": 0.02}
    runs = {}
    for checkpointing in (False, True):
        recorder = Recorder()
        out = tmp_path / f"checkpointing-{checkpointing}"
        config = make_config(letters, out, training__gradient_checkpointing=checkpointing, **overrides)
        Trainer(config, [recorder]).train()
        runs[checkpointing] = recorder, (out / "adapter" / "adapter_model.safetensors").read_bytes()
    plain, checkpointed = runs[False][0].steps, runs[True][0].steps
    assert [m["loss"] for m in checkpointed] == pytest.approx([m["loss"] for m in plain], rel=1e-5, abs=1e-7)
    assert [m["grad_norm"] for m in checkpointed] == pytest.approx([m["grad_norm"] for m in plain], rel=1e-5)
    assert runs[True][1] == runs[False][1]  # the same adapter, byte for byte


@pytest.mark.parametrize(
    ("method", "supervised_adam_steps"), [("sft_then_rft", ({1}, {2})), ("psft_then_rft", ({2}, {4}))]
)
def test_the_rft_phase_starts_with_a_fresh_optimizer_and_schedule(
    letters, tmp_path, method, supervised_adam_steps
):
    config = make_config(
        letters,
        tmp_path / "run",
        method=method,
        training__steps=4,
        training__warmup_steps=3,
        training__learning_rate=0.01,
        training__rft_learning_rate=0.03,
        training__psft_minibatches=2,
    )
    trainer = Trainer(config)
    seen = []

    class Watch(TrainerCallback):
        def on_step(self, metrics):
            adam_steps = {int(s["step"]) for s in trainer.optimizer.state.values()}
            seen.append((metrics["phase"], id(trainer.optimizer), adam_steps, metrics["lr"]))

    trainer.callbacks.append(Watch())
    trainer.train()
    phases, optimizers, adam_steps, lrs = zip(*seen, strict=True)
    supervised = config.supervised_phase
    assert phases == (supervised, supervised, "rft", "rft")
    assert optimizers[0] == optimizers[1] != optimizers[2] == optimizers[3]
    assert adam_steps == (*supervised_adam_steps, {1}, {2})  # Adam's moments restart with RFT
    # Each phase warms up to its own rate over its own 3 steps (a step reports the rate it trained with).
    assert lrs == pytest.approx((0.01 / 3, 0.01 * 2 / 3, 0.03 / 3, 0.03 * 2 / 3))


@pytest.mark.parametrize("adapter", [{"type": "lora", "r": 4}, {"type": "prefix", "num_virtual_tokens": 4}])
def test_psft_with_one_minibatch_is_sft(letters, tmp_path, adapter):
    runs = {}
    for method in ("sft", "psft"):
        recorder = Recorder()
        out = tmp_path / method
        config = make_config(
            letters,
            out,
            method=method,
            adapter=adapter,
            training__steps=3,
            training__learning_rate=0.05,
            training__psft_minibatches=1,
        )
        Trainer(config, [recorder]).train()
        adapter_bytes = (out / "adapter" / "adapter_model.safetensors").read_bytes()
        runs[method] = [(m["loss"], m["grad_norm"]) for m in recorder.steps], adapter_bytes
    assert runs["psft"][0] == runs["sft"][0]  # the same losses and gradient norms, step by step
    assert runs["psft"][1] == runs["sft"][1]  # and the same adapter, byte for byte


def test_psft_takes_a_clipped_step_per_minibatch_against_the_batch_start(letters, tmp_path):
    config = make_config(
        letters,
        tmp_path / "psft",
        method="psft",
        adapter={"type": "lora", "r": 4},
        training__steps=2,
        training__learning_rate=0.05,
        training__psft_minibatches=4,
        training__sft_examples_per_step=8,
    )
    trainer = Trainer(config)
    adam_steps = []

    class Watch(TrainerCallback):
        def on_step(self, metrics):
            adam_steps.append({int(s["step"]) for s in trainer.optimizer.state.values()})

    recorder = Recorder()
    trainer.callbacks += [Watch(), recorder]
    trainer.train()
    assert adam_steps == [{4}, {8}]
    assert [m["optimizer_steps"] for m in recorder.steps] == [4, 4]
    # The demonstrations are all alike: after the first mini-batch their tokens have risen past
    # 1.28 times pi_old, and the later mini-batches of the same batch clip them.
    assert all(m["clip_fraction"] > 0 for m in recorder.steps)
    assert all(m["phase"] == "psft" for m in recorder.steps)

    sft = Recorder()
    Trainer(
        make_config(
            letters,
            tmp_path / "sft",
            method="sft",
            adapter={"type": "lora", "r": 4},
            training__steps=2,
            training__learning_rate=0.05,
            training__sft_examples_per_step=8,
        ),
        [sft],
    ).train()
    assert recorder.steps[1]["loss"] != sft.steps[1]["loss"]  # K = 4 is not sft


def test_demonstration_prefix_tokens_outside_the_kept_top_fifth_get_exactly_zero_gradient(
    letters, tmp_path, monkeypatch
):
    import core.trainer as trainer_module

    config = make_config(
        letters,
        tmp_path / "run",
        training__steps=1,
        training__rollouts_per_prompt=4,
        training__hybrid_rollouts_per_prompt=2,
        training__micro_batch_size=16,
    )
    trainer = Trainer(config)
    # Every rollout gets advantage 1, so every token the mask keeps has a gradient to show.
    monkeypatch.setattr(trainer_module, "group_advantages", lambda rewards, *_: torch.ones_like(rewards))
    captured = {}
    original_generate, original_scoring = trainer.generate_rollouts, trainer_module.response_log_probs

    def generate(*args, **kwargs):
        captured["rollouts"] = rollouts = original_generate(*args, **kwargs)
        return rollouts

    def scoring(model, batch, temperature=1.0, with_entropy=False):
        log_probs, entropy = original_scoring(model, batch, temperature, with_entropy)
        if torch.is_grad_enabled():  # the update's forward: keep d loss / d log-prob per token
            captured["entropy"] = entropy
            log_probs.register_hook(lambda grad: captured.__setitem__("grad", grad))
        return log_probs, entropy

    trainer.generate_rollouts = generate
    monkeypatch.setattr(trainer_module, "response_log_probs", scoring)
    trainer.train()

    rollouts = captured["rollouts"]
    (rows,) = trainer._micro_batches([len(r) for r in rollouts.responses])  # one micro-batch: all rows
    prefix = torch.tensor([rollouts.demo_prefix_lengths[i] for i in rows])
    lengths = torch.tensor([len(rollouts.responses[i]) for i in rows])
    positions = torch.arange(captured["grad"].shape[1])[None, :]
    in_prefix = positions < prefix[:, None]
    continuation = (positions >= prefix[:, None]) & (positions < lengths[:, None])
    # The top fifth by entropy over every demonstration-prefix token of the step, found here anew.
    n_prefix = int(in_prefix.sum())
    assert n_prefix >= 10
    kept = torch.zeros_like(in_prefix).flatten()
    kept[
        in_prefix.flatten()
        .nonzero()
        .squeeze(1)[captured["entropy"][in_prefix].topk(math.ceil(0.2 * n_prefix)).indices]
    ] = True
    kept = kept.view_as(in_prefix)
    grad = captured["grad"]
    assert (grad[in_prefix & ~kept] == 0).all()
    assert (grad[kept] != 0).all()
    assert (grad[continuation] != 0).all()


@pytest.mark.slow
def test_the_rft_phase_of_sft_then_rft_raises_the_reward_its_demonstrations_do_not_earn(tmp_path):
    # The demonstrations contain no 'a', so the SFT phase drives the reward down; only the RFT
    # phase can bring it up.
    rows = [{"prompt": f"write something {i}", "demonstration": "the sky is blue"} for i in range(24)]
    recorder = learning_run(
        write_dataset(tmp_path / "sky.jsonl", rows),
        tmp_path / "run",
        30,
        0.03,
        method="sft_then_rft",
        adapter={"type": "lora", "r": 8},
        training={"sft_steps": 10},
    )
    rewards = [m["reward_mean"] for m in recorder.steps if m["phase"] == "rft"]
    assert len(rewards) == 20
    assert rewards[0] < 0.2 and sum(rewards[-5:]) / 5 > 0.9, rewards


@pytest.mark.slow
def test_prefix_rft_with_a_prefix_adapter_learns_a_learnable_reward(letters, tmp_path):
    """The product path: the default method and the default adapter, held-out accuracy up."""
    recorder = learning_run(
        letters,
        tmp_path / "learn",
        40,
        0.1,
        method="prefix_rft",
        adapter={"type": "prefix"},
        data__eval_size=8,
        eval={"every": 10},
    )
    accuracy = [e["accuracy"] for e in recorder.evals]
    rewards = [m["reward_mean"] for m in recorder.steps]
    assert accuracy[0] <= 0.25 and accuracy[-1] >= 0.75, accuracy
    assert sum(rewards[:5]) / 5 < 0.3 and sum(rewards[-5:]) / 5 > 0.6, rewards
    assert all(m["hybrid_rollouts"] == 8 for m in recorder.steps)  # one hybrid per group


def test_a_fresh_prefix_adapter_answers_the_held_out_prompts_as_the_base_model(letters, tmp_path):
    """Step 0 is the base model: the prefix stands in for the chat start it was made from (a fresh
    LoRA adapter adds zero, so it answers as the base model does)."""
    settings = {"training__dtype": "float32", "data__eval_size": 8, "eval__max_completion_tokens": 16}
    prefix = Trainer(make_config(letters, tmp_path / "prefix", **settings))
    lora = Trainer(make_config(letters, tmp_path / "lora", adapter={"type": "lora"}, **settings))
    assert prefix.replaced_start and not lora.replaced_start
    assert all(
        p.prompt_ids == lo.prompt_ids[len(prefix.replaced_start) :]
        for p, lo in zip(prefix.eval_examples, lora.eval_examples, strict=True)
    )
    answers = [row["completion"] for row in prefix.evaluation().completions]
    assert answers == [row["completion"] for row in lora.evaluation().completions]
    assert len(set(answers)) > 1  # the prompts get different answers: a real comparison


def test_exported_prefix_adapters_record_the_prompt_start_they_stand_in_for(letters, tmp_path):
    from core.adapters import REPLACED_START_FILE, read_replaced_start

    out = tmp_path / "run"
    trainer = Trainer(make_config(letters, out, checkpoint__every=2, training__learning_rate=0.05))
    result = trainer.train()
    for exported in (result.adapter_dir, out / "checkpoints" / "step-000002" / "adapter"):
        assert read_replaced_start(exported) == trainer.replaced_start
    # An adapter that records none (exported before prefixes stood in for the chat start) is
    # evaluated on whole prompts, as it was trained.
    (result.adapter_dir / REPLACED_START_FILE).unlink()
    trainer.load_adapter(result.adapter_dir)
    assert trainer.replaced_start == ()
    start = read_replaced_start(out / "checkpoints" / "step-000002" / "adapter")
    assert tuple(trainer.train_examples[0].prompt_ids[: len(start)]) == start
