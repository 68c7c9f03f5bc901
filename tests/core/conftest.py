"""Fixtures of the trainer's tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture
def letters(tmp_path) -> Path:
    """A trivially learnable task: answer with a text that contains the letter 'a'."""
    rows = [
        {"prompt": f"write something {i}", "demonstration": "a banana and a llama", "answer": "a"}
        for i in range(24)
    ]
    path = tmp_path / "letters.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
