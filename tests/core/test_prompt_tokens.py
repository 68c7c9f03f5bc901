"""Prompt tokens counted without transformers are the trainer's, token for token."""

from __future__ import annotations

import shutil

import pytest
from transformers import AutoTokenizer

from core.adapters import chat_prompt_start, replaced_prompt_start
from core.config import LoraAdapterConfig, PrefixAdapterConfig
from core.data import Example
from core.models import tiny_random_dir
from core.prompt_tokens import ChatTemplateError, PromptTokenizer, shared_start, without_replaced_start
from core.rollout import encode_example
from tests.model_dirs import second_model_dir

PROMPTS = [
    "Hello",
    "What is 27 + 38?\n  tabs\t, accents é and emoji 🎉",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "<|im_end|> special tokens in text"},
    ],
]
ADAPTERS = [
    PrefixAdapterConfig(),
    PrefixAdapterConfig(init_text="Answer briefly."),
    PrefixAdapterConfig(num_virtual_tokens=3),
    LoraAdapterConfig(),
]


@pytest.fixture(params=["second-model", "tiny-random"])
def model_dir(request):
    return second_model_dir() if request.param == "second-model" else tiny_random_dir()


def test_prompts_are_encoded_as_the_trainer_encodes_them(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    light = PromptTokenizer(model_dir)
    for prompt in PROMPTS:
        trainer = encode_example(tokenizer, Example(prompt, None, {}, 1), tokenizer.eos_token_id)
        assert light.prompt_ids(prompt) == trainer.prompt_ids
        most = light.most_tokens(light.render(prompt))
        assert most is not None and most >= len(trainer.prompt_ids)  # byte-level BPE: a true bound


def test_the_replaced_start_is_the_adapter_s(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    light = PromptTokenizer(model_dir)
    assert light.chat_prompt_start() == chat_prompt_start(tokenizer)
    for adapter in ADAPTERS:
        expected = replaced_prompt_start(tokenizer, adapter)
        assert light.replaced_start(adapter.model_dump(mode="json")) == expected, adapter


def test_the_second_model_s_prompt_start_is_its_system_turn():
    light = PromptTokenizer(second_model_dir())
    start = light.tokenizer.decode(light.chat_prompt_start(), skip_special_tokens=False)
    assert start.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert start.endswith("<|im_start|>user\n")


def test_shared_start_and_without_replaced_start():
    assert shared_start([[1, 2, 3], [1, 2, 4], [1, 2]]) == [1, 2]
    assert shared_start([[1], [2]]) == []
    assert without_replaced_start([1, 2, 3, 4], (1, 2)) == [3, 4]
    assert without_replaced_start([1, 3, 2, 4], (1, 2)) == [1, 3, 2, 4]
    assert without_replaced_start([1, 2], (1, 2)) == [1, 2]


def test_a_chat_the_template_refuses_is_an_error_that_says_so(tmp_path):
    directory = tmp_path / "strict"
    shutil.copytree(tiny_random_dir(), directory)
    (directory / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    light = PromptTokenizer(directory)
    assert light.prompt_ids("fine") == light.text_ids("fine")
    with pytest.raises(ChatTemplateError, match="chat template refused it: System role not supported"):
        light.prompt_ids([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])
