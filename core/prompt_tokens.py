"""Prompt tokens as the trainer counts them, without torch or transformers: for the API, which
refuses a job whose prompts are too long before a worker finds out.

The trainer chat-formats a prompt with transformers' `apply_chat_template` and tokenizes the text
without adding special tokens (core/rollout.py `encode_example`). Here the same template renders
with jinja2 in the environment transformers builds for it (sandboxed, `trim_blocks`,
`lstrip_blocks`, loop controls, its `tojson`, `raise_exception` and `strftime_now`, the named special
tokens as variables), and the `tokenizers` package, which transformers' fast tokenizers wrap,
tokenizes it. tests/core/test_prompt_tokens.py checks the counts against transformers'.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer, pre_tokenizers

from core.base_models import chat_template_of

# The special tokens transformers passes to a chat template (v5: the named ones only).
_NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment


class ChatTemplateError(ValueError):
    """The model's chat template refused a chat (its `raise_exception`, or a template error)."""


class PromptTokenizer:
    """A model directory's tokenizer.json and chat template, enough to count prompt tokens."""

    def __init__(self, directory: Path) -> None:
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{directory} has no tokenizer.json")
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        template = chat_template_of(directory)
        if template is None:
            raise ValueError(f"{directory} has no chat template")
        self.template = _environment().from_string(template)
        config_file = directory / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        self.special_tokens = {
            name: value["content"] if isinstance(value, dict) else value
            for name in _NAMED_SPECIAL_TOKENS
            if isinstance(value := config.get(name), str | dict)
        }

        # Byte-level BPE with no normalizer (GPT-2's, Llama 3's, SmolLM2's) never makes more tokens
        # than the text has UTF-8 bytes (+1 for an added prefix space): a short prompt needs no count.
        self.byte_level = self.tokenizer.normalizer is None and isinstance(
            self.tokenizer.pre_tokenizer, pre_tokenizers.ByteLevel
        )

    def render(self, prompt: str | list[dict[str, str]]) -> str:
        """An example's prompt (text, or chat messages) chat-formatted as a generation prompt."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        try:
            return self.template.render(messages=messages, add_generation_prompt=True, **self.special_tokens)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"the model's chat template refused it: {exc}") from None

    def most_tokens(self, text: str) -> int | None:
        """An upper bound of the tokens of `text` found without tokenizing it, where there is one."""
        return len(text.encode("utf-8")) + 1 if self.byte_level else None

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """A chat as a generation prompt, token for token as the trainer encodes it."""
        return self.text_ids(self.render(messages))

    def prompt_ids(self, prompt: str | list[dict[str, str]]) -> list[int]:
        """An example's prompt (text, or chat messages) as the trainer formats and tokenizes it."""
        return self.text_ids(self.render(prompt))

    def chat_prompt_start(self) -> list[int]:
        """What every one-turn chat prompt starts with (core.adapters.chat_prompt_start)."""
        chats = [self.chat_ids([{"role": "user", "content": content}]) for content in ("Hello", "1", "?")]
        if start := shared_start(chats):
            return start
        return self.text_ids(
            self.special_tokens.get("bos_token") or self.special_tokens.get("eos_token") or " "
        )

    def replaced_start(self, adapter: dict[str, Any]) -> tuple[int, ...]:
        """The prompt tokens a prefix adapter (its config as JSON) stands in for
        (core.adapters.replaced_prompt_start)."""
        if adapter.get("type", "prefix") != "prefix":
            return ()
        text = adapter.get("init_text")
        ids = tuple(self.text_ids(text) if text is not None else self.chat_prompt_start())
        return ids if adapter.get("num_virtual_tokens") in (None, len(ids)) else ()


def shared_start(rows: Sequence[Sequence[int]]) -> list[int]:
    """The longest start every row has."""
    n = 0
    while all(len(row) > n and row[n] == rows[0][n] for row in rows):
        n += 1
    return list(rows[0][:n])


def without_replaced_start(prompt_ids: Sequence[int], replaced: Sequence[int]) -> list[int]:
    """The prompt as the model reads it after the prefix: without the start the prefix stands in for.

    A prompt that does not start with those tokens (its own system turn, say) is fed whole, as is
    one that is nothing but them (the model needs a token to continue from).
    """
    n = len(replaced)
    if n and len(prompt_ids) > n and tuple(prompt_ids[:n]) == tuple(replaced):
        return list(prompt_ids[n:])
    return list(prompt_ids)
