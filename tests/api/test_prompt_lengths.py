"""The prompt budget of a job, checked by hand: what the trainer allows a prompt."""

from __future__ import annotations

from api.prompt_lengths import PromptBudget, _lines, prompt_budget
from core.base_models import BaseModelInfo
from core.prompt_tokens import PromptTokenizer
from tests.model_dirs import second_model_dir

BUDGET = PromptBudget(
    max_prompt_tokens=10,
    context_length=40,
    prefix_tokens=4,
    completion_tokens=20,
    replaced_start=(1, 2, 3, 4),
)


def test_the_replaced_start_does_not_count_against_max_prompt_tokens():
    assert BUDGET.problem([1, 2, 3, 4, *range(10, 20)]) is None  # 10 fed after the prefix's 4
    assert BUDGET.problem([*range(10, 21)]) == "11 tokens, over hyperparameters.max_prompt_tokens=10"


def test_prefix_prompt_and_completion_must_fit_the_context():
    roomy = PromptBudget(100, 30, 4, 20, ())
    assert roomy.problem(list(range(6))) is None  # 4 + 6 + 20 = 30
    assert roomy.problem(list(range(7))) == (
        "4 prefix + 7 prompt + 20 completion tokens (max_completion_tokens) make 31, "
        "over the model's context length of 30"
    )


def test_a_bound_that_fits_needs_no_count():
    assert BUDGET.fits(10) and not BUDGET.fits(11)  # 4 + 10 + 20 <= 40
    assert not PromptBudget(100, 30, 4, 20, ()).fits(7)


def test_a_job_s_budget_from_its_config():
    tokenizer = PromptTokenizer(second_model_dir())
    info = BaseModelInfo("mine", "", "LlamaForCausalLM", 1, 512, True)
    config = {
        "training": {"max_prompt_tokens": 100, "max_completion_tokens": 30},
        "eval": {"max_completion_tokens": 50},
        "adapter": {"type": "prefix", "num_virtual_tokens": None, "init_text": None},
    }
    prefix = prompt_budget(config, info, tokenizer)
    start = tuple(tokenizer.chat_prompt_start())
    assert prefix == PromptBudget(100, 512, len(start), 50, start)  # the longer completion: evaluation's
    config["adapter"] = {"type": "lora"}
    assert prompt_budget(config, info, tokenizer) == PromptBudget(100, 512, 0, 50, ())


def test_lines_are_split_across_chunks():
    assert list(_lines([b'{"a"', b": 1}\n{", b'"b": 2}\n\n', b"last"])) == [
        b'{"a": 1}',
        b'{"b": 2}',
        b"",
        b"last",
    ]
