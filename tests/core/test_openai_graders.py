"""OpenAI's grader objects scored as documented, through the same reward specs as training.

Model graders ask a judge over HTTP: the scripted chat server of tests/conftest.py stands in for
a judge model that answers in JSON (no such model runs on this machine).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from core.config import ConfigError, parse_grader
from core.rewards import JudgeUnavailable, RewardSpec, SandboxLimits, SandboxPool, score_completions
from core.rewards.spec import spec_of_grader
from service.judge import ChatJudge, JudgeEndpoint
from tests.conftest import ScriptedJudge

OUTPUT = "{{sample.output_text}}"


def score(grader: dict, completion: str, item: dict | None = None, **kwargs) -> tuple[float, dict]:
    spec = parse_grader(grader)
    result = score_completions(spec, [completion], [item or {}], **kwargs)
    return result.totals[0], result.error_kinds(spec)


def check(operation: str, reference: str = "{{item.answer}}") -> dict:
    return {
        "type": "string_check",
        "name": "s",
        "input": OUTPUT,
        "reference": reference,
        "operation": operation,
    }


@pytest.mark.parametrize(
    ("operation", "completion", "expected"),
    [
        ("eq", "Paris", 1.0),
        ("eq", "paris", 0.0),  # case-sensitive
        ("eq", "Paris ", 0.0),  # exact: no stripping
        ("ne", "Lyon", 1.0),
        ("ne", "Paris", 0.0),
        ("like", "It is Paris, of course", 1.0),  # input contains reference
        ("like", "it is paris", 0.0),
        ("ilike", "it is PARIS", 1.0),
        ("ilike", "Lyon", 0.0),
    ],
)
def test_string_check(operation, completion, expected):
    assert score(check(operation), completion, {"answer": "Paris"}) == (expected, {})


def test_text_similarity_scores_by_its_metric():
    grader = {
        "type": "text_similarity",
        "name": "t",
        "input": OUTPUT,
        "reference": "{{item.reference}}",
        "evaluation_metric": "rouge_1",
        "pass_threshold": 0.5,  # an evals field: accepted, ignored
    }
    total, errors = score(grader, "the cat sat on the mat", {"reference": "the cat is on the mat"})
    assert total == pytest.approx(5 / 6) and errors == {}
    fuzzy = {**grader, "evaluation_metric": "fuzzy_match"}
    assert score(fuzzy, "abcd", {"reference": "abce"})[0] == pytest.approx(0.75)


def test_unresolved_variables_and_unparsable_samples_score_0_and_are_counted_by_kind():
    total, errors = score(check("eq", "{{item.missing}}"), "x", {"answer": "x"})
    assert total == 0.0 and errors == {"s": {"invalid_variable_error": 1}}
    json_check = check("eq", "{{sample.output_json.city}}")
    total, errors = score({**json_check, "input": "Paris"}, "not json")
    assert total == 0.0 and errors == {"s": {"sample_parse_error": 1}}
    assert score({**json_check, "input": "Paris"}, '{"city": "Paris"}') == (1.0, {})


MULTI_GRADERS = {
    "name_ok": check("eq", "{{item.name}}"),
    "close": {
        "type": "text_similarity",
        "input": OUTPUT,
        "reference": "{{item.name}}",
        "evaluation_metric": "fuzzy_match",
    },
}


@pytest.mark.parametrize(
    "shape",
    [
        {"graders": MULTI_GRADERS},  # the guides: a map, keyed by the names the formula uses
        {"graders": [{**g, "name": k} for k, g in MULTI_GRADERS.items()]},  # the API spec: a list
    ],
)
def test_multi_computes_its_formula_over_named_sub_graders(shape):
    grader = {"type": "multi", "name": "m", "calculate_output": "0.5 * name_ok + 0.5 * close ^ 2", **shape}
    spec = parse_grader(grader)
    assert spec.labels == ["name_ok", "close"] and not spec.is_binary
    result = score_completions(spec, ["abcd", "abce"], [{"name": "abcd"}, {"name": "abcd"}])
    assert result.totals == pytest.approx([1.0, 0.5 * 0.75**2])
    assert result.per_grader == {"name_ok": [1.0, 0.0], "close": pytest.approx([1.0, 0.75])}


def test_multi_with_a_single_grader_as_the_client_types_it():
    one = {**check("eq"), "name": "only"}
    spec = spec_of_grader({"type": "multi", "graders": one, "calculate_output": "2 * only"})
    assert score_completions(spec, ["7"], [{"answer": "7"}]).totals == [2.0]


def test_a_formula_that_fails_on_a_sample_scores_it_0_and_counts_a_formula_error():
    grader = {"type": "multi", "graders": MULTI_GRADERS, "calculate_output": "1 / name_ok"}
    spec = parse_grader(grader)
    result = score_completions(spec, ["abcd", "zz"], [{"name": "abcd"}, {"name": "abcd"}])
    assert result.totals == [1.0, 0.0]
    assert result.error_kinds(spec) == {"calculate_output": {"formula_parse_error": 1}}
    assert "ZeroDivisionError" in result.failures["calculate_output"][1]


@pytest.mark.parametrize(
    ("grader", "param", "message"),
    [
        (check("eqq"), "operation", "Input should be 'eq', 'ne', 'like' or 'ilike'"),
        ({**check("eq"), "reference": "{{answer}}"}, None, "the namespace must be item or sample"),
        (
            {"type": "text_similarity", "input": OUTPUT, "reference": "x", "evaluation_metric": "cosine"},
            "evaluation_metric",
            "cosine needs an embedding model",
        ),
        (
            {"type": "multi", "graders": {"a": check("bad")}, "calculate_output": "a"},
            "graders.a.operation",
            "Input should be",
        ),
        (
            {"type": "multi", "graders": {"a": check("eq")}, "calculate_output": "a + b"},
            "calculate_output",
            "names 'b', which is no grader here (graders: a)",
        ),
        (
            {"type": "multi", "graders": [{"type": "multi"}], "calculate_output": "1"},
            "graders",
            "cannot contain another multi grader",
        ),
        ({"type": "multi", "graders": {"a": check("eq")}}, "graders", "`calculate_output`"),
        ({"type": "dpo_thing"}, "type", "unknown grader type 'dpo_thing'; one of string_check"),
        ("string_check", "type", "a grader is an object with a `type`"),
        (
            {
                "type": "label_model",
                "name": "l",
                "model": "j",
                "input": [{"role": "user", "content": "x"}],
                "labels": ["a"],
                "passing_labels": ["b"],
            },
            None,
            "passing_labels must be among labels; not labels: b",
        ),
        (
            {
                "type": "score_model",
                "name": "s",
                "model": "j",
                "input": [{"role": "user", "content": "x"}],
                "range": [1, 0],
            },
            "range",
            "min < max",
        ),
    ],
)
def test_invalid_graders_say_what_and_where(grader, param, message):
    with pytest.raises(ConfigError) as caught:
        parse_grader(grader)
    [problem] = caught.value.details
    assert problem.param == param and message in problem.message


def test_a_grader_reads_the_item_fields_its_templates_name():
    spec = parse_grader({"type": "multi", "graders": MULTI_GRADERS, "calculate_output": "name_ok"})
    assert spec.fields_needed() == {"name"}


def test_our_graders_and_openai_graders_mix_in_one_weighted_spec():
    spec = RewardSpec.model_validate(
        {"graders": [{**check("ilike"), "weight": 0.5}, {"type": "numeric", "name": "n", "weight": 2}]}
    )
    assert score_completions(spec, ["answer: 12"], [{"answer": "12"}]).totals == [2.5]


@pytest.mark.usefixtures("sandbox_privileges")
def test_python_graders_with_grade_get_openai_s_sample_and_item():
    source = (
        "def grade(sample, item):\n"
        "    parsed = sample['output_json'] or {}\n"
        "    return float(parsed.get('total') == item['a'] + item['b'] and 'prompt' not in item)\n"
    )
    spec = parse_grader({"type": "python", "name": "sum", "source": source, "image_tag": "2025-05-08"})
    assert spec.graders[0].form == "openai"
    with _pool() as pool:
        result = score_completions(
            spec, ['{"total": 5}', '{"total": 6}', "no json"], [{"a": 2, "b": 3}] * 3, sandbox=pool
        )
    assert result.totals == [1.0, 0.0, 0.0] and result.error_count == 0
    raising = parse_grader(
        {"type": "python", "name": "boom", "source": "def grade(sample, item):\n    return 1 / 0\n"}
    )
    with _pool() as pool:
        failed = score_completions(raising, ["x"], [{}], sandbox=pool)
    assert failed.error_kinds(raising) == {"boom": {"python_grader_runtime_error": 1}}


class _pool:
    def __enter__(self) -> SandboxPool:
        self.pool = SandboxPool(SandboxLimits(timeout_seconds=5))
        return self.pool

    def __exit__(self, *exc) -> None:
        self.pool.close()


# ----- model graders --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def judge(scripted_judge: ScriptedJudge) -> Iterator[ChatJudge]:
    chat = ChatJudge({"gpt-4o-mini": JudgeEndpoint(base_url=scripted_judge.url, model="served-judge")})
    yield chat
    chat.close()


def judged(kind: str, **fields) -> dict:
    return {
        "type": kind,
        "name": "judge",
        "model": "gpt-4o-mini",
        "input": [
            {"role": "system", "content": "You grade answers."},
            {"role": "user", "content": [{"type": "input_text", "text": "Q: {{item.q}} A: " + OUTPUT}]},
        ],
        **fields,
    }


def test_score_model_asks_the_judge_and_clamps_its_result(judge: ChatJudge, scripted_judge: ScriptedJudge):
    scripted_judge.answers.update(
        {
            "Q: 2+2 A: 4": '{"result": 0.9, "steps": []}',
            "Q: 2+2 A: 5": 'Sure! {"result": -3}',  # text around the JSON; clamped to the range
            "Q: 2+2 A: 7": "I think it is fine.",
            "Q: 2+2 A: 8": '{"result": "high"}',
        }
    )
    spec = parse_grader(judged("score_model", range=[0, 1], sampling_params={"temperature": 0.2, "seed": 3}))
    result = score_completions(spec, ["4", "5", "7", "8", "9"], [{"q": "2+2"}] * 5, judge=judge)
    assert result.totals == [0.9, 0.0, 0.0, 0.0, 0.0]
    assert result.error_kinds(spec) == {
        "judge": {"model_grader_parse_error": 2, "model_grader_server_error": 1}
    }
    asked = scripted_judge.requests[-1]
    assert asked["model"] == "served-judge" and asked["temperature"] == 0.2 and asked["seed"] == 3
    assert asked["messages"][0] == {"role": "system", "content": "You grade answers."}
    assert '"result"' in asked["messages"][-1]["content"]  # the answer format is asked for


def test_label_model_passes_the_passing_labels(judge: ChatJudge, scripted_judge: ScriptedJudge):
    scripted_judge.answers.update(
        {
            "Q: c A: ok": '{"result": "correct"}',
            "Q: c A: no": '{"result": "wrong"}',
            "Q: c A: ?": '{"result": "maybe"}',
        }
    )
    spec = parse_grader(judged("label_model", labels=["correct", "wrong"], passing_labels=["correct"]))
    result = score_completions(spec, ["ok", "no", "?"], [{"q": "c"}] * 3, judge=judge)
    assert result.totals == [1.0, 0.0, 0.0]
    assert result.error_kinds(spec) == {"judge": {"model_grader_parse_error": 1}}


def test_a_judge_is_not_asked_when_a_variable_does_not_resolve(
    judge: ChatJudge, scripted_judge: ScriptedJudge
):
    before = len(scripted_judge.requests)
    spec = parse_grader(judged("score_model"))
    result = score_completions(spec, ["4"], [{}], judge=judge)
    assert result.error_kinds(spec) == {"judge": {"invalid_variable_error": 1}}
    assert len(scripted_judge.requests) == before


def test_model_graders_need_a_judge_and_name_one_that_is_served(judge: ChatJudge):
    spec = parse_grader(judged("score_model"))
    assert spec.judge_models == {"gpt-4o-mini"}
    with pytest.raises(JudgeUnavailable):
        score_completions(spec, ["4"], [{"q": "2+2"}])
    assert judge.missing({"gpt-4o-mini", "o3"}) == ["o3"]
