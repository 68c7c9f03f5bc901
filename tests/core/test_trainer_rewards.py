"""Python graders in a real (tiny) training run: the reward_errors metric, events, the error-rate limit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.data import examples_at_step
from core.errors import InvalidInput
from core.reward_errors import RewardErrorRateExceeded
from core.rewards import SandboxLimits
from core.trainer import Trainer
from tests.core.test_trainer import Recorder, make_config, write_dataset

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("sandbox_privileges"),
]
LIMITS = SandboxLimits(timeout_seconds=0.5, cpu_seconds=10, memory_mb=256, workers=2)


class EventRecorder(Recorder):
    def __init__(self):
        super().__init__()
        self.events: list[tuple[str, str, dict]] = []

    def on_event(self, message, level="info", data=None):
        self.events.append((message, level, data))


@pytest.fixture
def numbered(tmp_path) -> Path:
    rows = [{"prompt": f"say something {i}", "demonstration": "a b c", "i": i} for i in range(8)]
    return write_dataset(tmp_path / "numbered.jsonl", rows)


def python_reward(source: str, name: str = "user") -> dict:
    return {"graders": [{"type": "python", "name": name, "source": source}]}


def test_a_grader_failing_on_some_samples_is_counted_and_reported_once(numbered, tmp_path):
    # Odd examples make the grader raise; the prompt reaches it inside the example.
    source = (
        "def reward(completion, example):\n"
        "    assert example['prompt'].startswith('say something')\n"
        "    print('grading', example['i'])\n"
        "    return 1.0 / (example['i'] % 2 == 0)\n"
    )
    config = make_config(
        numbered,
        tmp_path / "run",
        reward=python_reward(source),
        training__steps=3,
        training__max_reward_error_rate=1.0,
    )
    recorder = EventRecorder()
    trainer = Trainer(config, [recorder], sandbox_limits=LIMITS)
    trainer.train()

    assert len(recorder.steps) == 3
    for metrics in recorder.steps:
        prompts = examples_at_step(trainer.train_examples, metrics["step"] - 1, 2, seed=f"{config.seed}-1")
        odd = sum(e.example.fields["i"] % 2 for e in prompts)
        assert metrics["reward_errors"] == metrics["reward_errors/user"] == 4 * odd  # 4 rollouts each
        assert metrics["reward_mean"] == 1.0 - odd / 2
    assert any(m["reward_errors"] for m in recorder.steps), "no step drew an odd example"
    [(message, level, data)] = recorder.events  # the same error again is counted, not re-reported
    assert level == "warning" and message.startswith("reward grader 'user' failed on ")
    assert " of 8 samples at step " in message
    assert "ZeroDivisionError" in message
    assert 'File "reward.py", line 4, in reward' in data["traceback"] and data["grader"] == "user"

    # Each sample shows what the grader printed and, where it failed, its traceback.
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["outputs"]["user"].startswith("grading ") for s in samples)
    failed = [s for s in samples if "errors" in s]
    assert all("ZeroDivisionError" in s["errors"]["user"] and s["reward"] == 0.0 for s in failed)
    assert all("errors" not in s and s["reward"] == 1.0 for s in samples if s not in failed)


def test_a_grader_that_keeps_failing_fails_the_run_naming_it(numbered, tmp_path):
    source = "import time\ndef reward(completion, example):\n    time.sleep(60)\n"
    config = make_config(
        numbered, tmp_path / "run", reward=python_reward(source, "slowpoke"), training__reward_error_steps=2
    )
    recorder = EventRecorder()
    with pytest.raises(RewardErrorRateExceeded) as caught:
        Trainer(config, [recorder], sandbox_limits=LIMITS).train()
    message = str(caught.value)
    assert message.startswith("reward grader 'slowpoke' failed on more than 50% of the samples for 2 steps")
    assert "time limit of 0.5 s" in message  # the deployment's limit reached the trainer
    assert [m["reward_errors"] for m in recorder.steps] == [8]  # it failed during step 2
    assert recorder.events and recorder.events[0][2]["grader"] == "slowpoke"
    assert isinstance(caught.value, InvalidInput)  # the worker reports it as invalid input, not a crash
