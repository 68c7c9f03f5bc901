"""`prefix-rft models add | remove`: registering base models from the command line, and training
one by its registered name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from cli.main import main
from core.base_models import read_registry
from tests.model_dirs import fake_model_dir, second_model_dir


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    second_model_dir()  # built in the session's data directory first, once
    data = tmp_path / "data"
    monkeypatch.setenv("PREFIX_RFT_DATA_DIR", str(data))
    return data


def test_add_lists_and_removes_a_local_directory(data_dir, capsys):
    assert main(["models", "add", str(second_model_dir()), "--name", "mine"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("registered mine: LlamaForCausalLM, 1.6M params, 512 tokens of context")
    assert read_registry(data_dir) == {"mine": {"path": str(second_model_dir()), "hub_id": None}}
    assert main(["models"]) == 0
    listed = capsys.readouterr().out
    assert "mine" in listed and "1.6M params, 512 tokens" in listed and "tiny-random" in listed
    assert main(["models", "remove", "mine"]) == 0 and read_registry(data_dir) == {}
    assert main(["models", "remove", "mine"]) == 2
    assert "no registered model is called 'mine'" in capsys.readouterr().err


def test_add_refuses_with_a_clear_message(data_dir, tmp_path, capsys):
    gpt2 = fake_model_dir(tmp_path / "gpt2", "GPT2LMHeadModel")
    assert main(["models", "add", str(gpt2)]) == 2
    assert "not registered: model 'gpt2' is a GPT2LMHeadModel" in capsys.readouterr().err
    base = fake_model_dir(tmp_path / "base", template=None)
    assert main(["models", "add", str(base)]) == 2
    assert "has no chat template" in capsys.readouterr().err
    assert main(["models", "add", str(second_model_dir()), "--name", "tiny-random"]) == 2
    assert "built-in model's name" in capsys.readouterr().err
    assert read_registry(data_dir) == {}


def test_a_gguf_file_is_converted_once_then_registered(data_dir, tmp_path, monkeypatch, capsys):
    gguf = tmp_path / "My-Model.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    conversions = []

    def convert(source: Path, name: str, target: Path) -> None:  # stands in for transformers' GGUF reader
        conversions.append((source, name, target))
        shutil.copytree(second_model_dir(), target)

    monkeypatch.setattr("core.models.convert_gguf", convert)
    assert main(["models", "add", str(gguf)]) == 0
    target = data_dir / "models" / "gguf" / "my-model.q4_1"
    assert conversions == [(tmp_path, gguf.name, target)]
    assert read_registry(data_dir)["my-model.q4_1"]["path"] == str(target)
    assert main(["models", "add", str(gguf)]) == 0 and len(conversions) == 1  # converted once
    assert "registered my-model.q4_1" in capsys.readouterr().out

    # Another file under the same name is converted anew, not served the old weights.
    other = tmp_path / "other" / "My-Model.Q4_1.gguf"
    other.parent.mkdir()
    other.write_bytes(b"GGUF, another")
    assert main(["models", "add", str(other)]) == 0 and len(conversions) == 2
    assert conversions[-1] == (other.parent, other.name, target)


@pytest.mark.slow
def test_a_registered_model_trains_by_its_name(data_dir, tmp_path):
    assert main(["models", "add", str(second_model_dir()), "--name", "mine"]) == 0
    rows = [
        {"prompt": f"add {i} and 1", "demonstration": f"it is {i + 1}", "answer": str(i + 1)}
        for i in range(8)
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "model": "mine",
        "data": {"train": str(tmp_path / "train.jsonl"), "eval_size": 2},
        "reward": {"graders": [{"type": "numeric"}]},
        "training": {"steps": 1, "prompts_per_step": 2, "rollouts_per_prompt": 2, "max_completion_tokens": 4},
        "output_dir": str(tmp_path / "run"),
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "config.yaml")]) == 0
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(second_model_dir())  # loadable where it was trained
