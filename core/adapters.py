"""Adapters: PEFT prefix tuning (default) and LoRA, and their state for checkpoints.

A fresh prefix adapter is initialised from the key/value activations of real tokens (the start
of the chat template by default), so before any training the model behaves as the base model
reading that text: greedy outputs are kept. Zero or random initialisation is not neutral: zero
keys still take softmax mass and dilute attention.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model
from peft.utils import set_peft_model_state_dict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from core.config import ConfigError, LoraAdapterConfig, PrefixAdapterConfig, Problem
from core.errors import InvalidInput


def attach_adapter(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: PrefixAdapterConfig | LoraAdapterConfig,
) -> PeftModel:
    """Wrap the frozen base model with a fresh, trainable adapter."""
    if config.type == "lora":
        peft_config = LoraConfig(
            task_type="CAUSAL_LM",
            r=config.r,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=config.target_modules,
        )
        return get_peft_model(model, peft_config)

    init_ids = kv_prefix_init_ids(tokenizer, config.num_virtual_tokens, config.init_text)
    peft_config = PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=len(init_ids),
        prefix_projection=config.prefix_projection,
        encoder_hidden_size=model.config.hidden_size,
    )
    peft_model = get_peft_model(model, peft_config)
    # get_peft_model creates the encoder in the default dtype; keep trainable params in fp32.
    encoder = peft_model.prompt_encoder["default"].float()
    init_kv_prefix(encoder, kv_prefix_activations(model, init_ids))
    return peft_model


def kv_prefix_init_ids(tokenizer: PreTrainedTokenizerBase, length: int | None, text: str | None) -> list[int]:
    """Token ids whose activations initialise the prefix: `text`, or the chat template's start.

    Cycled or cut to exactly `length` tokens when a length is given.
    """
    if text is None:
        text = default_init_text(tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError([Problem("adapter.init_text", "must contain at least one token")])
    length = length or len(ids)
    return [ids[i % len(ids)] for i in range(length)]


def default_init_text(tokenizer: PreTrainedTokenizerBase) -> str:
    """What every chat prompt starts with (system turn included), else the BOS token."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": ""}], tokenize=False)
        eos = tokenizer.eos_token
        # Up to the end of the template's first turn: a system prompt when it adds one.
        end = text.find(eos) if eos else -1
        return text[: end + len(eos)] if end > 0 else text
    return tokenizer.bos_token or tokenizer.eos_token or " "


@torch.no_grad()
def kv_prefix_activations(model: PreTrainedModel, ids: list[int]) -> torch.Tensor:
    """Keys and values of `ids` at every layer, laid out as PEFT's prefix embedding rows.

    Row i is [layer0 key, layer0 value, layer1 key, ...], each (kv_heads * head_dim) wide:
    shape [num_virtual_tokens, num_layers * 2 * kv_heads * head_dim].
    """
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([ids], device=device), use_cache=True)
    rows = []
    for layer in out.past_key_values.layers:
        keys, values = layer.keys[0], layer.values[0]  # [kv_heads, N, head_dim]
        rows += [keys.permute(1, 0, 2).flatten(1), values.permute(1, 0, 2).flatten(1)]
    return torch.cat(rows, dim=1).float()


@torch.no_grad()
def init_kv_prefix(encoder: torch.nn.Module, activations: torch.Tensor) -> None:
    """Make the prefix encoder output `activations` exactly.

    Without projection the embedding is the prefix. With the MLP projection, token i's embedding
    is the one-hot e_i, the first layer passes it through (tanh(1) e_i) and the last layer's
    column i is activations_i / tanh(1).
    """
    n_tokens = activations.shape[0]
    if not encoder.prefix_projection:
        encoder.embedding.weight.copy_(activations)
        return
    first, last = encoder.transform[0], encoder.transform[2]
    token_dim, hidden = first.in_features, first.out_features
    if n_tokens > min(token_dim, hidden):
        problem = f"at most {min(token_dim, hidden)} with prefix_projection"
        raise ConfigError([Problem("adapter.num_virtual_tokens", problem)])
    encoder.embedding.weight.zero_()
    encoder.embedding.weight[:, :n_tokens].copy_(torch.eye(n_tokens))
    first.weight.zero_()
    first.weight[:n_tokens, :n_tokens].copy_(torch.eye(n_tokens))
    first.bias.zero_()
    last.weight.zero_()
    last.weight[:, :n_tokens].copy_(activations.T / torch.tanh(torch.tensor(1.0)))
    last.bias.zero_()


def trainable_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter's trainable tensors, detached copies (for checkpoints and the KL reference)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = set(state) - set(params)
    if missing:
        raise ValueError(f"checkpoint does not match the adapter: unknown tensors {sorted(missing)[:3]}")
    for name, tensor in state.items():
        params[name].copy_(tensor)


@contextmanager
def swapped_adapter_weights(model: PeftModel, state: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily run the model with other adapter weights (e.g. the frozen initial adapter)."""
    current = trainable_state(model)
    load_trainable_state(model, state)
    try:
        yield
    finally:
        load_trainable_state(model, current)


def export_adapter(model: PeftModel, directory: str | Path, base_model: str) -> Path:
    """Save a standard PEFT directory that `PeftModel.from_pretrained(base, dir)` loads as is."""
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    config_path = directory / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = base_model
    adapter_config["inference_mode"] = True
    config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
    return directory


def load_exported_adapter(model: PeftModel, directory: str | Path) -> None:
    """Load the weights of an exported PEFT directory into a model with the same adapter config."""
    from safetensors.torch import load_file

    weights_file = Path(directory) / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise InvalidInput(f"{directory} is not a PEFT adapter directory (no adapter_model.safetensors)")
    try:
        set_peft_model_state_dict(model, load_file(weights_file))
    except RuntimeError as exc:
        raise InvalidInput(f"adapter at {directory} does not match the configured adapter: {exc}") from None
