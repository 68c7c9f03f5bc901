"""Early stopping: the bookkeeping checked by hand, then the trainer on the tiny model stopping on
a plateau (keeping the best evaluation's adapter, across a resume too) and on groups with no
reward variance."""

from __future__ import annotations

import pytest
import torch

from core.adapters import trainable_state
from core.config import ConfigError
from core.early_stopping import EarlyStopping
from core.trainer import Trainer
from tests.core.test_trainer import Recorder, make_config


def test_patience_counts_evaluations_without_a_large_enough_rise():
    early = EarlyStopping(patience=2, min_delta=0.05)
    assert early.after_evaluation(0, 0.20) == (True, None)  # the first is the best so far
    assert early.after_evaluation(1, 0.30) == (True, None)  # +0.10 > 0.05
    assert early.after_evaluation(2, 0.34) == (False, None)  # +0.04: not an improvement
    best, reason = early.after_evaluation(3, 0.10)
    assert not best and reason is not None and "for 2 evaluations (best 0.3000 at step 1)" in reason
    assert (early.best_step, early.best_reward) == (1, 0.30)


def test_zero_variance_must_hold_for_every_group_steps_in_a_row():
    early = EarlyStopping(zero_variance_steps=2)
    assert early.after_step(4, 4) is None
    assert early.after_step(3, 4) is None  # one group still had something to learn: the count restarts
    assert early.after_step(4, 4) is None
    assert "for 2 steps in a row" in early.after_step(4, 4)
    off = EarlyStopping()
    assert off.after_step(4, 4) is None  # off: never a reason to stop


def test_state_round_trips():
    early = EarlyStopping(patience=3)
    early.after_evaluation(5, 0.5)
    early.after_evaluation(6, 0.4)
    again = EarlyStopping(patience=3)
    again.load_state(early.state())
    assert (again.best_step, again.best_reward, again.evaluations_since_best) == (5, 0.5, 1)


def test_patience_needs_evaluations_during_training(letters, tmp_path):
    with pytest.raises(ConfigError, match=r"eval\.every"):
        make_config(letters, tmp_path, training__early_stop_patience=2)


def test_groups_without_reward_variance_stop_the_run(letters, tmp_path):
    recorder = Recorder()
    config = make_config(  # a reward no completion earns: every group's rewards are all 0
        letters,
        tmp_path / "run",
        reward={"graders": [{"type": "regex", "pattern": "^impossible-[0-9]{40}$"}]},
        training__steps=10,
        training__early_stop_zero_variance_steps=2,
    )
    result = Trainer(config, [recorder]).train()
    assert result.steps_done == 2 and not result.stopped and result.adapter_dir is not None
    assert "no advantage left to learn from" in result.stop_reason
    assert [m["zero_variance_groups"] for m in recorder.steps] == [2, 2]
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def scripted_evaluations(monkeypatch, rewards: list[float], snapshots: dict[int, dict]) -> None:
    """Held-out rewards in this order (the rest of training is real); each evaluation's adapter
    is kept in `snapshots` by step."""
    scripted = iter(rewards)

    def evaluate(self):
        snapshots[self.step] = trainable_state(self.model)
        metrics = {"step": self.step, "reward_mean": next(scripted)}
        for cb in self.callbacks:
            cb.on_eval(metrics)
        return metrics

    monkeypatch.setattr(Trainer, "evaluate", evaluate)


def test_a_plateau_stops_the_run_and_the_best_evaluation_s_adapter_is_kept(letters, tmp_path, monkeypatch):
    snapshots: dict[int, dict] = {}
    # Steps 0, 1, 2, 3 evaluated; the best is step 1's; 2 evaluations without a rise stop at step 3,
    # and the final evaluation (0.30) is no better.
    scripted_evaluations(monkeypatch, [0.2, 0.5, 0.4, 0.45, 0.3], snapshots)
    events = []

    class Events(Recorder):
        def on_event(self, message, level, data):
            events.append(message)

    config = make_config(
        letters,
        tmp_path / "run",
        training__steps=10,
        training__early_stop_patience=2,
        training__learning_rate=0.05,
        eval__every=1,
    )
    trainer = Trainer(config, [Events()])
    result = trainer.train()
    assert result.steps_done == 3 and result.final_eval["reward_mean"] == 0.5
    assert "not improved" in result.stop_reason
    assert any("stopped early at step 3" in e and "the adapter of step 1 is the result" in e for e in events)
    kept = trainable_state(trainer.model)
    assert all(torch.equal(kept[k], snapshots[1][k]) for k in kept)
    assert not all(torch.equal(kept[k], snapshots[3][k]) for k in kept)  # training did move it


def test_a_resumed_run_keeps_the_best_adapter_it_had(letters, tmp_path, monkeypatch):
    snapshots: dict[int, dict] = {}
    scripted_evaluations(monkeypatch, [0.1, 0.6, 0.2, 0.3, 0.2, 0.2], snapshots)
    overrides = {
        "training__steps": 10,
        "training__early_stop_patience": 3,
        "training__learning_rate": 0.05,
        "eval__every": 1,
        "checkpoint__every": 1,
    }
    first = Trainer(make_config(letters, tmp_path / "run", **overrides), [Recorder(stop_after=2)])
    assert first.train().stopped  # interrupted after step 2 (best: step 1)
    resumed = Trainer(make_config(letters, tmp_path / "run", **overrides))
    result = resumed.train(resume_from=tmp_path / "run")
    assert resumed.early_stopping.best_step == 1 and result.steps_done == 4  # evaluations at 2, 3, 4
    kept = trainable_state(resumed.model)
    assert all(torch.equal(kept[k], snapshots[1][k]) for k in kept)
