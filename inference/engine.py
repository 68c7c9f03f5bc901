"""Continuous batched decoding over one base model, each request with its own adapter (or none).

The engine of the OpenAI-compatible model server: requests for different adapters are decoded
together, one forward pass per token for the whole batch, and a request that arrives while
others decode joins the running batch at the next step. The forward is `core.decoding`'s, the
one the trainer samples its rollouts with: row r of the batch owns slot r of a preallocated KV
cache holding `[ prefix_r | prompt_r | generated ... ]` from column 0, so a row that joins is
prefilled into a free slot and a row that leaves gives its slot to the last row; nobody else's
cache moves. A prefix adapter is nothing but the first columns of its rows' slots; a LoRA adapter
is installed once (its factors referenced by every projection it adapts) and applied per row.
Positions are those PEFT gives a lone request (prompt token j at n_prefix + j), so greedy outputs
match `PeftModel.generate` on that adapter alone.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from core.adapters import read_replaced_start
from core.algorithm import sample_categorical
from core.decoding import Decoder, LoraWeight, lora_rows
from core.errors import InvalidInput
from core.rollout import stop_token_ids

FinishReason = Literal["stop", "length"]


class UnsupportedAdapter(ValueError):
    """The adapter cannot be served (an unknown PEFT type, or made for another base model)."""


@dataclass(frozen=True)
class PrefixKV:
    """A prefix adapter in memory: its key/value tensors, [layers, 2 (key, value), kv_heads, n, head_dim].

    `replaced_start`: the prompt tokens it stands in for, dropped from a prompt that starts with
    them, as in training (`core.adapters.without_replaced_start`).
    """

    name: str
    kv: torch.Tensor
    replaced_start: tuple[int, ...] = ()

    @property
    def length(self) -> int:
        return self.kv.shape[3]


def prefix_kv_from_embedding(
    name: str,
    embedding: torch.Tensor,
    num_layers: int,
    kv_heads: int,
    head_dim: int,
    replaced_start: tuple[int, ...] = (),
) -> PrefixKV:
    """Unpack PEFT's prefix embedding [n, layers * 2 * kv_heads * head_dim] into a PrefixKV.

    Row i of the embedding is [layer0 key, layer0 value, layer1 key, ...], each kv_heads * head_dim
    wide, heads major (the layout of `PeftModel.get_prompt` and `core.adapters.kv_prefix_activations`).
    """
    n = embedding.shape[0]
    if embedding.dim() != 2 or embedding.shape[1] != num_layers * 2 * kv_heads * head_dim:
        raise UnsupportedAdapter(
            f"adapter {name!r}: prefix width {tuple(embedding.shape)} does not match the base model "
            f"({num_layers} layers x 2 x {kv_heads} kv heads x {head_dim} head dim); "
            "was it trained on another base model?"
        )
    kv = embedding.view(n, num_layers * 2, kv_heads, head_dim).permute(1, 2, 0, 3)
    # A view, no copy: the model server loads adapters off the decode thread, and a copy there
    # would start a second OpenMP team that slows every decode step (inference/scheduler.py).
    return PrefixKV(name, kv.reshape(num_layers, 2, kv_heads, n, head_dim), replaced_start)


@dataclass(frozen=True)
class LoraWeights:
    """A LoRA adapter in memory, ready to be installed into the engine's base model."""

    name: str
    config: Any  # peft.LoraConfig
    state: dict[str, torch.Tensor]


Adapter = PrefixKV | LoraWeights


def adapter_bytes(adapter: Adapter) -> int:
    """Memory an adapter holds (what the model server's adapter cache counts)."""
    if isinstance(adapter, PrefixKV):
        return adapter.kv.nbytes
    return sum(t.nbytes for t in adapter.state.values())


def load_adapter(directory: str | Path, model: PreTrainedModel, name: str | None = None) -> Adapter:
    """Read a directory written by `core.adapters.export_adapter` (safetensors only, never pickle)."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    directory = Path(directory)
    name = name or directory.name
    config_file, weights_file = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise FileNotFoundError(
            f"{directory} is not an exported PEFT adapter (needs adapter_config.json and "
            "adapter_model.safetensors; pickled adapter_model.bin is not loaded)"
        )
    peft_type = json.loads(config_file.read_text()).get("peft_type")
    weights = load_file(weights_file)
    if peft_type == "LORA":
        config = LoraConfig.from_pretrained(directory)
        config.inference_mode = True
        return LoraWeights(name, config, {k: v.float() for k, v in weights.items()})
    if peft_type != "PREFIX_TUNING":
        raise UnsupportedAdapter(
            f"adapter {name!r} is {peft_type}; prefix-tuning and LoRA adapters are served"
        )
    if "prompt_embeddings" not in weights:
        raise UnsupportedAdapter(f"adapter {name!r}: no prompt_embeddings tensor in {weights_file}")
    try:
        replaced_start = read_replaced_start(directory)
    except InvalidInput as exc:
        raise UnsupportedAdapter(f"adapter {name!r}: {exc}") from None
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return prefix_kv_from_embedding(
        name,
        weights["prompt_embeddings"].float(),
        config.num_hidden_layers,
        kv_heads,
        head_dim,
        replaced_start,
    )


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings, with OpenAI's meanings."""

    max_tokens: int = 16  # completion tokens at most (an EOS token counts)
    temperature: float = 1.0  # 0 is greedy (argmax)
    top_p: float = 1.0  # nucleus sampling: the smallest set of tokens with at least this mass
    stop: tuple[str, ...] = ()  # the text ends before the first of these; the token that completes it is kept
    seed: int | None = None  # same seed and request, same completion (whatever else is in the batch)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    adapter: Adapter | None = None  # None: the base model
    params: SamplingParams = SamplingParams()


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Progress:
    """What one step did for one row: its new text, and its completion once it has finished."""

    key: Hashable  # the caller's name for the row, given to `BatchedEngine.add`
    text: str  # text not reported before (text that may begin a stop string is held back)
    completion: Completion | None  # set on the row's last progress


def nucleus_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the smallest top set whose mass reaches `top_p`, renormalised.

    `probs` is one row [V]. The most likely token is always kept.
    """
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(0) - sorted_probs
    sorted_probs = torch.where(mass_before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
    kept = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return kept / kept.sum()


def choose_tokens(logits: torch.Tensor, params: list[SamplingParams], uniform: torch.Tensor) -> list[int]:
    """One token per row of `logits` [B, V], under each row's temperature and top_p.

    The draw inverts each row's CDF at `uniform[i]` (the sampler the trainer uses); temperature 0
    is argmax.
    """
    tokens = logits.argmax(-1)
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        temperature = torch.tensor([params[i].temperature for i in sampled], device=logits.device)
        log_probs = torch.log_softmax(logits.index_select(0, index).float() / temperature[:, None], dim=-1)
        for k, i in enumerate(sampled):
            if params[i].top_p < 1.0:
                log_probs[k] = nucleus_filter(log_probs[k].exp(), params[i].top_p).log()
        tokens[index] = sample_categorical(log_probs, uniform.index_select(0, index))
    return tokens.tolist()


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` could be the start of a stop string.

    A stream must not show them yet: the next token may complete the stop string, and the
    completion ends before it.
    """
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


class _Row:
    """Decoding state of one request: its tokens, its text so far, and the token to feed next."""

    def __init__(self, key: Hashable, request: GenerationRequest, device: torch.device) -> None:
        self.key = key
        self.request = request
        self.tokens: list[int] = []
        self.next_token = -1  # the last chosen token, fed at the next step
        self.text = ""
        self.finish_reason: FinishReason | None = None
        self.reported = 0  # characters of `text` given out in Progress
        self.stop_checked = 0  # characters of `text` searched for stop strings
        # Incremental detokenisation: text is decoded in a window of the last tokens, and a token
        # that ends in the middle of a character waits for the next (no "\ufffd" is ever shown).
        self.window_start = 0
        self.window_read = 0
        self.generator = None
        if request.params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(request.params.seed)

    @property
    def lora(self) -> str | None:
        adapter = self.request.adapter
        return adapter.name if isinstance(adapter, LoraWeights) else None

    def uniform(self) -> float:
        """The uniform number this row's next token is drawn at (its own stream when seeded)."""
        return float(torch.rand(1, dtype=torch.float64, generator=self.generator))

    def append(self, token: int, stop_ids: set[int], tokenizer: PreTrainedTokenizerBase) -> Progress:
        params = self.request.params
        self.tokens.append(token)
        if token in stop_ids:
            self.finish_reason = "stop"
        elif len(self.tokens) >= params.max_tokens:
            self.finish_reason = "length"
        self.text += self._new_text(tokenizer, flush=self.finish_reason is not None)
        if params.stop:
            self._cut_at_stop_string()
        end = len(self.text) if self.finish_reason else len(self.text) - held_back(self.text, params.stop)
        delta, self.reported = self.text[self.reported : end], max(self.reported, end)
        return Progress(self.key, delta, self._completion() if self.finish_reason else None)

    def _new_text(self, tokenizer: PreTrainedTokenizerBase, flush: bool) -> str:
        before = tokenizer.decode(self.tokens[self.window_start : self.window_read], skip_special_tokens=True)
        after = tokenizer.decode(self.tokens[self.window_start :], skip_special_tokens=True)
        if len(after) <= len(before) or (after.endswith("\ufffd") and not flush):
            return ""
        self.window_start, self.window_read = self.window_read, len(self.tokens)
        return after[len(before) :]

    def _cut_at_stop_string(self) -> None:
        stops = self.request.params.stop
        start = max(0, self.stop_checked - max(len(s) for s in stops) + 1)  # only new text can complete one
        hits = [i for i in (self.text.find(s, start) for s in stops) if i >= 0]
        if hits:
            self.text, self.finish_reason = self.text[: min(hits)], "stop"
        self.stop_checked = len(self.text)

    def _completion(self) -> Completion:
        assert self.finish_reason is not None
        prompt = len(self.request.prompt_ids)
        return Completion(self.text, list(self.tokens), self.finish_reason, prompt, len(self.tokens))


class BatchedEngine:
    """Decodes many requests at once over one frozen base model; each row carries its own adapter.

    `add` admits requests (one prefill forward for them) and `step` decodes one token for every
    running row; both return each row's `Progress`. A caller serving a stream of requests calls
    `add` whenever requests arrive and `step` while anything runs (`inference.scheduler` does);
    `generate` does both for one fixed list of requests. Not thread-safe: one thread drives it.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        self.decoder = Decoder(model)
        self._cache = self.decoder.new_cache()
        self._rows: list[_Row] = []  # row i decodes in slot i of the cache
        self._lora: set[str] = set()

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def cache_width(self) -> int:
        """Columns the running batch attends over (its longest row; rows that left take theirs along)."""
        return int(self._cache.lengths[: len(self._rows)].max()) if self._rows else 0

    @property
    def installed_lora(self) -> set[str]:
        return set(self._lora)

    @property
    def lora_in_use(self) -> set[str]:
        return {row.lora for row in self._rows} - {None}

    def check(self, request: GenerationRequest) -> None:
        if not request.prompt_ids:
            raise ValueError("a request needs at least one prompt token")
        prefix = request.adapter.length if isinstance(request.adapter, PrefixKV) else 0
        total = prefix + len(request.prompt_ids) + request.params.max_tokens
        if self.max_positions is not None and total > self.max_positions:
            raise ValueError(
                f"prefix ({prefix}) + prompt ({len(request.prompt_ids)}) + max_tokens "
                f"({request.params.max_tokens}) is {total} tokens, more than the model's {self.max_positions}"
            )

    @torch.inference_mode()
    def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        """Decode every request to its own end; completions come back in request order."""
        if self.running:
            raise RuntimeError("generate needs an idle engine; a batch is running")
        done: dict[Hashable, Completion] = {}
        progress = self.add(list(enumerate(requests)))
        while True:
            done.update((p.key, p.completion) for p in progress if p.completion is not None)
            if not self.running:
                break
            progress = self.step()
        return [done[i] for i in range(len(requests))]

    @torch.inference_mode()
    def add(self, requests: list[tuple[Hashable, GenerationRequest]]) -> list[Progress]:
        """Prefill new rows into free slots and choose their first tokens; the unfinished ones join."""
        for _, request in requests:
            self.check(request)
        if not requests:
            return []
        rows = [_Row(key, request, self.device) for key, request in requests]
        for row in rows:
            if isinstance(row.request.adapter, LoraWeights):
                self._install_lora(row.request.adapter)
        first = len(self._rows)
        slots = torch.arange(first, first + len(rows), device=self.device)
        longest = max(
            len(r.request.prompt_ids) + self._prefix_length(r) + r.request.params.max_tokens for r in rows
        )
        self._cache.reserve(first + len(rows), longest)  # room for whole completions: steps never grow it
        self._cache.clear(slots)
        for slot, row in zip(slots.tolist(), rows, strict=True):
            if isinstance(row.request.adapter, PrefixKV):
                self._cache.write_prefix(slot, row.request.adapter.kv)
        logits = self.decoder.prefill(
            self._cache, slots, [row.request.prompt_ids for row in rows], self._lora_rows(rows)
        )
        progress = self._choose(rows, logits)
        self._rows = self._rows + rows
        self._keep([i for i, row in enumerate(self._rows) if row.finish_reason is None])
        return progress

    @torch.inference_mode()
    def step(self) -> list[Progress]:
        """Feed every running row its last token and choose the next one."""
        if not self._rows:
            return []
        tokens = torch.tensor([row.next_token for row in self._rows], device=self.device)
        logits = self.decoder.step(self._cache, tokens, self._lora_rows(self._rows))
        progress = self._choose(self._rows, logits)
        self._keep([i for i, row in enumerate(self._rows) if row.finish_reason is None])
        return progress

    def cancel(self, key: Hashable) -> bool:
        """Drop a running row (its client went away); True if it was running."""
        kept = [i for i, row in enumerate(self._rows) if row.key != key]
        if len(kept) == len(self._rows):
            return False
        self._keep(kept)
        return True

    def remove_lora(self, name: str) -> None:
        """Uninstall a LoRA adapter; it must not be in use by a running row."""
        if name in self.lora_in_use:
            raise RuntimeError(f"LoRA adapter {name!r} is in use by a running request")
        self.decoder.remove_lora(name)
        self._lora.discard(name)

    # ----- internals ------------------------------------------------------------------------

    @staticmethod
    def _prefix_length(row: _Row) -> int:
        return row.request.adapter.length if isinstance(row.request.adapter, PrefixKV) else 0

    def _lora_rows(self, rows: list[_Row]):
        return lora_rows([row.lora for row in rows], self.device)

    def _choose(self, rows: list[_Row], logits: torch.Tensor) -> list[Progress]:
        params = [row.request.params for row in rows]
        uniform = torch.tensor(
            [row.uniform() if p.temperature > 0 else 0.0 for row, p in zip(rows, params, strict=True)]
        )
        tokens = choose_tokens(logits, params, uniform.to(logits.device))
        progress = []
        for row, token in zip(rows, tokens, strict=True):
            row.next_token = token
            progress.append(row.append(token, self.stop_ids, self.tokenizer))
        return progress

    def _keep(self, kept: list[int]) -> None:
        """Keep these rows, in order, in slots 0..len(kept)-1 (only rows whose slot changes are copied)."""
        if len(kept) == len(self._rows):
            return
        moves = [(new, old) for new, old in enumerate(kept) if new != old]
        if moves:
            destination, source = (
                torch.tensor(side, device=self.device) for side in zip(*moves, strict=True)
            )
            self._cache.copy_rows(destination, source)
        self._rows = [self._rows[i] for i in kept]

    def _install_lora(self, adapter: LoraWeights) -> None:
        if adapter.name in self._lora:
            return
        self.decoder.add_lora(adapter.name, lora_factors(adapter))
        self._lora.add(adapter.name)


_LORA_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


def lora_factors(adapter: LoraWeights) -> dict[tuple[int, str], LoraWeight]:
    """A PEFT LoRA state dict as the decoder's factors by (layer, projection); refuses what it cannot run."""
    config = adapter.config
    unsupported = [
        what
        for what, present in (
            ("DoRA", getattr(config, "use_dora", False)),
            ("LoRA bias", getattr(config, "lora_bias", False)),
            ("per-module alpha", bool(getattr(config, "alpha_pattern", None))),
        )
        if present
    ]
    if unsupported:
        raise UnsupportedAdapter(
            f"adapter {adapter.name!r} uses {', '.join(unsupported)}, which is not served"
        )
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in adapter.state.items():
        match = _LORA_KEY.search(key)
        if match is None:
            raise UnsupportedAdapter(
                f"adapter {adapter.name!r}: tensor {key!r} is not on a decoder projection"
            )
        layer, projection, factor = int(match[1]), match[2], match[3]
        pairs.setdefault((layer, projection), {})[factor] = tensor
    factors = {}
    for place, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise UnsupportedAdapter(
                f"adapter {adapter.name!r}: layer {place[0]} {place[1]} lacks lora_A or lora_B"
            )
        rank = pair["A"].shape[0]
        scale = config.lora_alpha / (math.sqrt(rank) if config.use_rslora else rank)
        factors[place] = LoraWeight(pair["A"].float(), pair["B"].float(), scale)
    return factors
