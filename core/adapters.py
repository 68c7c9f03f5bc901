"""Adapters: PEFT prefix tuning (default) and LoRA, and their state for checkpoints.

A fresh prefix adapter is initialised from the key/value activations of real tokens (by default
the start every chat prompt shares: the system turn and the user turn's header). Zero or random
initialisation is not neutral: zero keys still take softmax mass and dilute attention.

The prefix then stands in for those tokens: a prompt that starts with them is fed without them
(`without_replaced_start`), in training and in serving alike. PEFT places the prompt after the
prefix, so a fresh adapter reads exactly the base model's sequence (in float32, per-token KL
6.4e-10 on SmolLM2; docs/benchmarks.md). Were the prompt fed whole, the model would read its
start twice: KL 1.4e-2. An exported adapter records what it stands in for in
`REPLACED_START_FILE`, beside PEFT's files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model
from peft.utils import set_peft_model_state_dict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from core.base_models import published_name
from core.config import ConfigError, LoraAdapterConfig, PrefixAdapterConfig, Problem
from core.errors import InvalidInput
from core.prompt_tokens import shared_start
from core.prompt_tokens import without_replaced_start as without_replaced_start  # re-exported


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


REPLACED_START_FILE = "replaced_prompt_start.json"


def replaced_prompt_start(
    tokenizer: PreTrainedTokenizerBase, config: PrefixAdapterConfig | LoraAdapterConfig
) -> tuple[int, ...]:
    """The prompt tokens a prefix adapter stands in for: its init tokens, taken as they are.

    Empty for LoRA and for a prefix whose init tokens were cycled or cut to another length
    (then the prefix is not those tokens' activations, and prompts are fed whole).
    """
    if config.type != "prefix":
        return ()
    ids = tuple(_init_text_ids(tokenizer, config.init_text))
    return ids if config.num_virtual_tokens in (None, len(ids)) else ()


def kv_prefix_init_ids(tokenizer: PreTrainedTokenizerBase, length: int | None, text: str | None) -> list[int]:
    """Token ids whose activations initialise the prefix: `text`, or what every chat prompt starts with.

    Cycled or cut to exactly `length` tokens when a length is given.
    """
    ids = _init_text_ids(tokenizer, text)
    if not ids:
        raise ConfigError([Problem("adapter.init_text", "must contain at least one token")])
    length = length or len(ids)
    return [ids[i % len(ids)] for i in range(length)]


def _init_text_ids(tokenizer: PreTrainedTokenizerBase, text: str | None) -> list[int]:
    if text is not None:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return chat_prompt_start(tokenizer)


def chat_prompt_start(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens every one-turn chat prompt starts with: the system turn if the template adds one,
    and the user turn's header (the tokens that chats with different messages share); else BOS."""
    if tokenizer.chat_template:
        chats = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": content}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
            )["input_ids"]
            for content in ("Hello", "1", "?")
        ]
        if start := shared_start(chats):
            return start
    token = tokenizer.bos_token or tokenizer.eos_token or " "
    return tokenizer(token, add_special_tokens=False)["input_ids"]


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


def export_adapter(
    model: PeftModel, directory: str | Path, base_model: str, replaced_start: Sequence[int] = ()
) -> Path:
    """Save a standard PEFT directory that `PeftModel.from_pretrained(base, dir)` loads as is; its
    `base_model_name_or_path` is the base model's hub id where it is published (`published_name`).

    `replaced_start` (see `replaced_prompt_start`) goes into REPLACED_START_FILE: whoever serves
    the adapter drops these tokens from the start of a prompt, as training did.
    """
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    config_path = directory / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = published_name(base_model)
    adapter_config["inference_mode"] = True
    config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
    if replaced_start:
        note = "The prefix stands in for these prompt tokens: drop them from the start of a prompt."
        replaced = {"token_ids": list(replaced_start), "about": note}
        (directory / REPLACED_START_FILE).write_text(json.dumps(replaced, indent=2))
    return directory


def read_replaced_start(directory: str | Path) -> tuple[int, ...]:
    """The prompt tokens an exported adapter stands in for (none for adapters that record none)."""
    path = Path(directory) / REPLACED_START_FILE
    if not path.is_file():
        return ()
    try:
        ids = json.loads(path.read_text())["token_ids"]
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(f"{path} is not a list of token ids: {exc}") from None
    if not isinstance(ids, list) or not all(isinstance(i, int) and i >= 0 for i in ids):
        raise InvalidInput(f"{path}: token_ids must be a list of non-negative integers")
    return tuple(ids)


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
