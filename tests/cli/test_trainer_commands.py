"""The `prefix-rft` command line, run in-process on the tiny model."""

from __future__ import annotations

import json

import pytest
import yaml

from cli.main import main
from core.models import ModelNotFound, resolve_model_dir


@pytest.fixture
def job(tmp_path):
    rows = [
        {"prompt": f"add {i} and 1", "demonstration": f"it is {i + 1}", "answer": str(i + 1)}
        for i in range(12)
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "model": "tiny-random",
        "data": {"train": "train.jsonl", "eval_size": 4},
        "reward": {"graders": [{"type": "numeric"}]},
        "training": {"steps": 2, "prompts_per_step": 2, "rollouts_per_prompt": 2, "max_completion_tokens": 6},
        "checkpoint": {"every": 1},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_train_writes_an_adapter_and_a_summary(job, capsys):
    assert main(["train", str(job)]) == 0
    out = capsys.readouterr().out
    assert "finished after 2 steps" in out and "adapter:" in out
    run = job.parent / "run"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "summary.json").read_text())["steps"] == 2


def test_train_resumes_and_overrides(job, capsys):
    assert main(["train", str(job), "--set", "training.steps=1"]) == 0
    assert main(["train", str(job), "--resume", str(job.parent / "run")]) == 0
    metrics = (job.parent / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2]


def test_a_bad_config_names_the_field(job, capsys):
    config = yaml.safe_load(job.read_text())
    config["training"]["lerning_rate"] = 0.1
    job.write_text(yaml.safe_dump(config))
    assert main(["train", str(job)]) == 2
    err = capsys.readouterr().err
    assert "training.lerning_rate" in err and "did you mean 'learning_rate'" in err


def test_validate_reports_bad_lines_and_token_lengths(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "hello", "demonstration": "hi"}\n{"prompt": 3}\n')
    assert main(["data", "validate", str(data), "--model", "tiny-random"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["examples"] == 1 and report["with_demonstration"] == 1
    assert report["errors"] == [
        {"line": 2, "field": "prompt", "message": "must be a non-empty string, got number"}
    ]
    assert report["prompt_tokens"]["max"] > 0 and report["demonstration_tokens"]["max"] == 3  # "hi" + EOS


def test_eval_scores_an_exported_adapter_and_shows_what_the_model_said(job, capsys, tmp_path):
    assert main(["train", str(job)]) == 0
    capsys.readouterr()
    out = tmp_path / "completions.jsonl"
    adapter = job.parent / "run" / "adapter"
    assert main(["eval", str(job), "--adapter", str(adapter), "--out", str(out), "--show", "2"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads(printed[printed.index("\n{") + 1 : printed.rindex("}") + 1])
    assert metrics["examples"] == 4 and "accuracy" in metrics
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4
    assert {"line", "prompt", "completion", "reward", "rewards", "correct"} <= set(rows[0])
    assert sum(r["correct"] for r in rows) / 4 == metrics["accuracy"]
    assert printed.count("--- line ") == 2 and rows[0]["prompt"] in printed


def test_models_lists_the_registry(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "134.5M params, 8192 tokens" in out


def test_unknown_and_unloadable_models_get_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFound, match="unknown model 'no-such-model'"):
        resolve_model_dir("no-such-model")
    with pytest.raises(ModelNotFound, match=r"no config\.json"):
        resolve_model_dir(str(tmp_path))
