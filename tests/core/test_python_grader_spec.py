"""Python graders in reward specs: refused at creation with the line, or read for how to call them.

No sandbox here: everything checked before any user code runs. Also: declarative regexes, which
run in the service's own processes, stop instead of backtracking for hours.
"""

from __future__ import annotations

import time

import pytest

from core.config import ConfigError, parse_reward_spec
from core.rewards import PythonGrader, RewardSpec, SandboxLimits, score_completions
from core.rewards.extract import USER_PATTERN_TIMEOUT_SECONDS
from core.rewards.graders import MAX_SOURCE_BYTES


def problems(source: str, **fields) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_reward_spec({"graders": [{"type": "python", "source": source, **fields}]})
    return caught.value.problems


def test_a_syntax_error_is_reported_with_its_line():
    [problem] = problems("def reward(completion, example):\n    return = 1\n")
    assert problem.startswith("graders.0.source: line 2, column")
    assert "'return = 1'" in problem


def test_a_compile_error_that_parses_is_reported_too():
    [problem] = problems("return 1\ndef reward(c, e):\n    return 1\n")
    assert problem == "graders.0.source: line 1, column 1: 'return' outside function: 'return 1'"


def test_imports_off_the_list_are_refused_with_their_lines():
    [problem] = problems(
        "import json, numpy\nimport torch\n\ndef reward(c, e):\n    from transformers import x\n    return 1\n"
    )
    assert "line 2: module 'torch' cannot be imported" in problem
    assert "line 5: module 'transformers' cannot be imported" in problem
    assert "standard library, math_verify, numpy, regex, jsonschema" in problem
    assert "json" not in problem.split("(")[0] and "numpy" not in problem.split("(")[0]
    [relative] = problems("from . import x\ndef reward(c, e):\n    return 1\n")
    assert "line 1: module '.' cannot be imported" in relative


def test_the_source_size_limit_is_256_kb():
    body = "def reward(c, e):\n    return 1\n"
    padding = "#" * (MAX_SOURCE_BYTES - len(body)) + "\n"
    [problem] = problems(padding + body)
    assert f"source is {MAX_SOURCE_BYTES + 1} bytes, over the limit of {MAX_SOURCE_BYTES} (256 kB)" in problem
    parse_reward_spec({"graders": [{"type": "python", "source": padding[1:] + body}]})  # exactly 256 kB


def test_the_function_must_exist_and_take_a_sample_or_a_batch():
    [missing] = problems("def score(c, e):\n    return 1\n")
    assert missing.startswith("graders.0.function: the source defines no top-level function 'reward'")
    [one_arg] = problems("def reward(c):\n    return 1\n")
    assert "must take (completion, example)" in one_arg
    [coroutine] = problems("async def reward(c, e):\n    return 1\n")
    assert "not async def" in coroutine
    assert problems("x = 1", function="not valid")[0].startswith("graders.0.function:")


def test_the_calling_convention_is_read_from_the_signature():
    def grader(source: str, function: str = "reward") -> PythonGrader:
        return PythonGrader(source=source, function=function)

    assert grader("def reward(completion, example):\n    return 1\n").form == "sample"
    assert grader("def reward(*args):\n    return 1\n").form == "sample"
    assert grader("def f(completions, **kwargs):\n    return []\n", "f").form == "batch"
    assert grader("def f(prompts, completions, answer):\n    return []\n", "f").form == "batch"
    trl = grader("def format_reward(completions, **kwargs):\n    return []\n", "format_reward")
    assert trl.program.form == "batch" and trl.program.function == "format_reward"


def test_python_graders_are_continuous_and_read_no_declared_fields():
    spec = RewardSpec.model_validate(
        {
            "graders": [
                {"type": "exact_match", "field": "answer"},
                {"type": "python", "name": "style", "source": "def reward(c, e):\n    return 0.5\n"},
            ]
        }
    )
    assert spec.runs_user_code and not spec.is_binary and spec.fields_needed() == {"answer"}
    assert spec.labels == ["exact_match", "style"]


def test_python_graders_never_run_without_a_sandbox():
    spec = RewardSpec.model_validate(
        {"graders": [{"type": "python", "source": "def reward(c, e):\n    return 1\n"}]}
    )
    with pytest.raises(RuntimeError, match="need a sandbox pool"):
        score_completions(spec, ["x"], [{}])


def test_a_catastrophic_regex_is_stopped_and_counted_as_an_error():
    # With the standard `re`, (x+x+)+y on 5,000 x's backtracks for longer than anyone waits.
    spec = RewardSpec.model_validate(
        {
            "graders": [
                {"type": "regex", "pattern": "(x+x+)+y"},
                {"type": "exact_match", "extract_pattern": "(x+x+)+y", "name": "extracted"},
                {"type": "contains", "value": "x", "name": "plain"},
            ]
        }
    )
    started = time.perf_counter()
    result = score_completions(spec, ["x" * 5000], [{"answer": "x"}])
    assert time.perf_counter() - started < 4 * USER_PATTERN_TIMEOUT_SECONDS + 1
    assert result.errors == {"regex": 1, "extracted": 1}
    assert "TimeoutError" in result.failures["regex"][0]
    assert result.totals == [1.0]  # the other grader still scored


def test_the_deployment_settings_default_to_the_sandbox_defaults():
    from service.settings import Settings

    assert SandboxLimits.from_settings(Settings()) == SandboxLimits()
    custom = Settings(sandbox_timeout_seconds=2.5, sandbox_memory_mb=512, sandbox_require_isolation=False)
    limits = SandboxLimits.from_settings(custom)
    assert (limits.timeout_seconds, limits.memory_mb, limits.require_isolation) == (2.5, 512, False)
