"""Prompt lengths checked when a job is created: every prompt of its files, counted with the base
model's own tokenizer and chat template as the trainer counts it (core/prompt_tokens.py, no
torch), against the job's max_prompt_tokens and the model's context length. A job that a worker
would fail on its first line is refused with the line and the field instead. The context check is
this API's own: the trainer does not stop a sequence that runs past the context, which the model
would then decode beyond the positions it was trained on.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from core.base_models import BaseModelInfo
from core.data import Example, read_jsonl
from core.prompt_tokens import ChatTemplateError, PromptTokenizer, without_replaced_start
from protocol.errors import APIError
from service.storage import Storage
from service.tables import Dataset

log = logging.getLogger(__name__)

_BATCH_LINES = 2048  # lines read and tokenized at once
_MAX_REPORTED = 100  # lines named in an error's details, as uploads report


@dataclass(frozen=True)
class PromptBudget:
    """What the trainer allows a prompt: `max_prompt_tokens` after the prefix adapter's replaced
    start is dropped, and the whole sequence (prefix, prompt, completion) within the context."""

    max_prompt_tokens: int
    context_length: int
    prefix_tokens: int  # the prefix adapter's slots (0 for LoRA)
    completion_tokens: int  # the longest completion the job samples (training or evaluation)
    replaced_start: tuple[int, ...]

    def fits(self, most_tokens: int) -> bool:
        """Whether any prompt of at most this many tokens fits (its replaced start kept, or not)."""
        return most_tokens <= self.max_prompt_tokens and (
            self.prefix_tokens + most_tokens + self.completion_tokens <= self.context_length
        )

    def problem(self, prompt_ids: list[int]) -> str | None:
        """Why the trainer would refuse (or overrun the context with) this prompt, or None."""
        fed = len(without_replaced_start(prompt_ids, self.replaced_start))
        if fed > self.max_prompt_tokens:
            return f"{fed:,} tokens, over hyperparameters.max_prompt_tokens={self.max_prompt_tokens:,}"
        total = self.prefix_tokens + fed + self.completion_tokens
        if total > self.context_length:
            prefix = f"{self.prefix_tokens} prefix + " if self.prefix_tokens else ""
            return (
                f"{prefix}{fed:,} prompt + {self.completion_tokens:,} completion tokens (max_completion_tokens) "
                f"make {total:,}, over the model's context length of {self.context_length:,}"
            )
        return None


def prompt_budget(config: dict, info: BaseModelInfo, tokenizer: PromptTokenizer) -> PromptBudget:
    """A job's budget from its trainer config (as JSON) and its base model."""
    training, evaluation, adapter = config["training"], config["eval"], config["adapter"]
    prefix_tokens = 0
    if adapter["type"] == "prefix":
        init = adapter.get("init_text")
        prefix_tokens = adapter.get("num_virtual_tokens") or len(
            tokenizer.text_ids(init) if init is not None else tokenizer.chat_prompt_start()
        )
    return PromptBudget(
        max_prompt_tokens=training["max_prompt_tokens"],
        context_length=info.context_length,
        prefix_tokens=prefix_tokens,
        completion_tokens=max(
            training["max_completion_tokens"], evaluation.get("max_completion_tokens") or 0
        ),
        replaced_start=tokenizer.replaced_start(adapter),
    )


def model_directory(info: BaseModelInfo, data_dir: Path) -> Path | None:
    """Where the API finds the model's tokenizer: a registered model's directory, or a built-in
    one's in the data directory once a worker or model server there has prepared it."""
    directory = Path(info.path) if info.path else data_dir / "models" / info.name
    return directory if (directory / "tokenizer.json").is_file() else None


def prompt_tokenizer(directory: Path) -> PromptTokenizer:
    stamp = (directory / "tokenizer.json").stat().st_mtime
    return _cached_tokenizer(str(directory), stamp)


@functools.lru_cache(maxsize=16)
def _cached_tokenizer(directory: str, _stamp: float) -> PromptTokenizer:
    return PromptTokenizer(Path(directory))


def check_prompt_lengths(
    storage: Storage,
    config: dict,
    info: BaseModelInfo,
    data_dir: Path,
    files: Iterable[tuple[Dataset, str]],
) -> None:
    """Refuse (422 `prompt_too_long`, each line with its field) a job whose files hold a prompt
    the trainer would refuse. `files`: (dataset, where the request names it). Skipped, with a log
    line, where this process has no copy of the model's tokenizer."""
    directory = model_directory(info, data_dir)
    if directory is None:
        log.info("prompt lengths not checked: no tokenizer of %s in this process's data directory", info.name)
        return
    try:
        tokenizer = prompt_tokenizer(directory)
        budget = prompt_budget(config, info, tokenizer)
    except Exception as exc:  # tokenizers raises plain Exceptions; the worker fails such a job itself
        log.warning("prompt lengths not checked: the tokenizer of %s does not load: %s", info.name, exc)
        return
    for dataset, param in files:
        details, count = [], 0
        for example in _examples(storage, dataset):
            try:
                text = tokenizer.render(example.prompt)
            except ChatTemplateError as exc:  # the trainer would fail on it just the same
                problem = str(exc)
            else:
                most = tokenizer.most_tokens(text)
                if most is not None and budget.fits(most):
                    continue  # short enough that counting cannot find a problem
                problem = budget.problem(tokenizer.text_ids(text))
            if problem is None:
                continue
            count += 1
            if len(details) < _MAX_REPORTED:
                field = "prompt" if isinstance(example.prompt, str) else "messages"
                details.append({"line": example.line, "field": field, "message": problem})
        if details:
            first = details[0]
            message = (
                f"{count} prompt(s) of dataset {dataset.id!r} do not fit the job on {info.name}; the "
                f"first: line {first['line']}, field {first['field']!r}: {first['message']}"
            )
            raise APIError(422, "prompt_too_long", message, param, details)


def _examples(storage: Storage, dataset: Dataset) -> Iterator[Example]:
    """A stored dataset's examples, a batch of lines at a time (memory stays flat)."""
    batch: list[bytes] = []
    offset = 0
    for line in _lines(storage.iter_chunks(dataset.storage_key)):
        batch.append(line)
        if len(batch) == _BATCH_LINES:
            yield from _parsed(batch, offset)
            offset += len(batch)
            batch = []
    yield from _parsed(batch, offset)


def _parsed(lines: list[bytes], offset: int) -> Iterator[Example]:
    # Validated at upload: every line parses; numbered from the batch's first.
    for example in read_jsonl(lines, max_line_bytes=1 << 62).examples:
        yield Example(example.prompt, example.demonstration, example.fields, example.line + offset)


def _lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    rest = b""
    for chunk in chunks:
        *complete, rest = (rest + chunk).split(b"\n")
        yield from complete
    if rest:
        yield rest
