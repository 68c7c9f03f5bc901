"""/v1/fine_tuning/alpha/graders/run and /validate through the official openai client.

The API runs behind uvicorn on PostgreSQL; python graders run in the real sandbox, model graders
ask the scripted judge of tests/conftest.py, mapped by the deployment's judge_models setting.
"""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from service.settings import Settings
from tests.conftest import ApiClient, ScriptedJudge, served

pytestmark = pytest.mark.usefixtures("sandbox_privileges")

OUTPUT = "{{sample.output_text}}"


@pytest.fixture(scope="module")
def client(
    tmp_path_factory: pytest.TempPathFactory,
    migrated_postgres: str,
    redis_url: str,
    scripted_judge: ScriptedJudge,
) -> Iterator[openai.OpenAI]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("graders") / "data",
        database_url=migrated_postgres,
        broker_url=redis_url,
        reaper_seconds=0,
        judge_models={"gpt-4o-2024-08-06": {"base_url": scripted_judge.url, "model": "served-judge"}},
    )
    api = ApiClient(settings)
    with served(api.app) as base_url:
        yield openai.OpenAI(base_url=f"{base_url}/v1", api_key=api.key, max_retries=0)
    api.http.close()


def run(client: openai.OpenAI, grader: dict, sample: str, item: dict | None = None):
    return client.fine_tuning.alpha.graders.run(grader=grader, model_sample=sample, item=item or {})


def test_string_check_as_in_openai_s_guide(client: openai.OpenAI):
    grader = {
        "type": "string_check",
        "name": "string check",
        "input": OUTPUT,
        "reference": "{{item.reference_answer}}",
        "operation": "eq",
    }
    result = run(client, grader, "fuzzy wuzzy", {"reference_answer": "fuzzy wuzzy"})
    assert result.reward == 1.0
    assert result.metadata.name == "string check" and result.metadata.type == "string_check"
    assert not any(v for k, v in result.metadata.errors.model_dump().items() if isinstance(v, bool))
    assert result.sub_rewards == {} and result.metadata.execution_time >= 0
    assert result._request_id  # x-request-id on the response
    assert (
        run(client, {**grader, "operation": "ne"}, "fuzzy wuzzy", {"reference_answer": "fuzzy wuzzy"}).reward
        == 0
    )


def test_text_similarity(client: openai.OpenAI):
    grader = {
        "type": "text_similarity",
        "name": "similarity",
        "input": OUTPUT,
        "reference": "{{item.reference_answer}}",
        "evaluation_metric": "fuzzy_match",
    }
    result = run(client, grader, "fuzzy wuzzy was a bear", {"reference_answer": "fuzzy wuzzy was a bear"})
    assert result.reward == pytest.approx(1.0)
    assert (
        run(
            client, {**grader, "evaluation_metric": "bleu"}, "a b c d", {"reference_answer": "a b c d"}
        ).reward
        == 1
    )


def test_python_grade_sample_item(client: openai.OpenAI):
    source = "def grade(sample, item):\n    return 1.0 if sample['output_text'] == item['reference_answer'] else 0.25\n"
    grader = {"type": "python", "name": "py", "source": source}
    assert run(client, grader, "yes", {"reference_answer": "yes"}).reward == 1.0
    assert run(client, grader, "no", {"reference_answer": "yes"}).reward == 0.25
    broken = run(client, {**grader, "source": "def grade(sample, item):\n    return item['nope']\n"}, "x")
    errors = broken.metadata.errors
    assert broken.reward == 0 and errors.python_grader_runtime_error
    assert "KeyError: 'nope'" in errors.python_grader_runtime_error_details


def test_multi_with_a_formula_reports_its_sub_rewards(client: openai.OpenAI):
    grader = {
        "type": "multi",
        "name": "multi",
        "graders": {
            "name": {
                "type": "string_check",
                "input": "{{sample.output_json.name}}",
                "reference": "{{item.name}}",
                "operation": "eq",
            },
            "email": {
                "type": "text_similarity",
                "input": "{{sample.output_json.email}}",
                "reference": "{{item.email}}",
                "evaluation_metric": "fuzzy_match",
            },
        },
        "calculate_output": "0.5 * name + 0.5 * email",
    }
    item = {"name": "Ada", "email": "ada@example.com"}
    result = run(client, grader, '{"name": "Ada", "email": "ada@example.com"}', item)
    assert result.reward == pytest.approx(1.0)
    assert result.sub_rewards == {"name": 1.0, "email": pytest.approx(1.0)}
    assert result.metadata.scores == result.sub_rewards
    unparsable = run(client, grader, "not json", item)
    assert unparsable.reward == 0 and unparsable.metadata.errors.sample_parse_error


def test_score_model_asks_the_judge_the_deployment_maps(client: openai.OpenAI, scripted_judge: ScriptedJudge):
    scripted_judge.answers["Rate: Paris"] = (
        '{"result": 7, "steps": [{"description": "d", "conclusion": "c"}]}'
    )
    grader = {
        "type": "score_model",
        "name": "judge",
        "model": "gpt-4o-2024-08-06",
        "input": [{"role": "user", "content": "Rate: " + OUTPUT}],
        "range": [0, 10],
    }
    result = run(client, grader, "Paris")
    assert result.reward == 7.0 and result.metadata.sampled_model_name == "served-judge"
    broken = run(client, grader, "Lyon")  # the judge answers 500
    assert broken.reward == 0 and broken.metadata.errors.api_model_grader_server_error
    with pytest.raises(openai.BadRequestError) as caught:
        run(client, {**grader, "model": "o3-mini"}, "Paris")
    assert caught.value.code == "judge_model_unavailable" and caught.value.param == "grader.model"
    assert "served judges: gpt-4o-2024-08-06" in caught.value.message


def test_validate_echoes_a_good_grader_and_points_at_what_is_wrong(client: openai.OpenAI):
    good = {"type": "string_check", "name": "s", "input": OUTPUT, "reference": "x", "operation": "like"}
    assert client.fine_tuning.alpha.graders.validate(grader=good).grader.to_dict() == good
    bad = {
        "type": "multi",
        "graders": {"a": {**good, "operation": "contains"}},
        "calculate_output": "a",
    }
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.alpha.graders.validate(grader=bad)
    assert caught.value.param == "grader.graders.a.operation" and caught.value.code == "invalid_grader"
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.alpha.graders.run(grader=good, model_sample=None)  # type: ignore[arg-type]
    assert caught.value.param == "model_sample"


def test_the_grader_endpoints_need_a_key(client: openai.OpenAI):
    stranger = openai.OpenAI(base_url=str(client.base_url), api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.fine_tuning.alpha.graders.validate(grader={"type": "string_check"})
