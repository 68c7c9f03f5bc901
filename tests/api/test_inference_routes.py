"""The API's side of inference, without a model server: validation, model lookup, and the
answer when the model server cannot be reached."""

from __future__ import annotations

import pytest

from tests.conftest import ApiClient, free_port

HELLO = [{"role": "user", "content": "hi"}]


@pytest.fixture
def api_without_model_server(pg_settings):
    settings = pg_settings.model_copy(update={"inference_url": f"http://127.0.0.1:{free_port()}"})
    client = ApiClient(settings)
    yield client
    client.http.close()


def test_an_unreachable_model_server_is_a_503_to_retry(api_without_model_server: ApiClient):
    response = api_without_model_server.http.post(
        "/v1/chat/completions", json={"model": "tiny-random", "messages": HELLO}
    )
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    assert response.json()["error"]["code"] == "inference_unavailable"
    streamed = api_without_model_server.http.post(
        "/v1/completions", json={"model": "tiny-random", "prompt": "x", "stream": True}
    )
    assert streamed.status_code == 503  # a stream that cannot start is an error, not an empty stream


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": HELLO}, "model"),
        ({"model": "tiny-random"}, "messages"),
        ({"model": "tiny-random", "messages": "hi"}, "messages"),
        ({"model": "tiny-random", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": "tiny-random", "messages": [{"content": "hi"}]}, "messages[0].role"),
        ({"model": "tiny-random", "messages": HELLO, "n": 0}, "n"),
        ({"model": "tiny-random", "messages": HELLO, "n": 17}, "n"),
        ({"model": "tiny-random", "messages": HELLO, "top_p": 0}, "top_p"),
        ({"model": "tiny-random", "messages": HELLO, "max_tokens": 0}, "max_tokens"),
        ({"model": "tiny-random", "messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "tiny-random", "messages": HELLO, "stop": ""}, "stop"),
        ({"model": "tiny-random", "messages": HELLO, "tools": []}, "tools"),
        ({"model": "tiny-random", "messages": HELLO, "stream_options": {"x": 1}}, "stream_options.x"),
        (
            {"model": "tiny-random", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content",  # the message says more: `messages[0].content[0].type: ... 'text'`
        ),
    ],
)
def test_malformed_chat_requests_name_the_field(api, body, param):
    response = api.http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_request"
    assert error["param"] == param, error


def test_unknown_models_are_404_before_the_model_server_is_asked(api_without_model_server: ApiClient):
    for model in ("gpt-4o", "ft:tiny-random::job_00000000000000000000000", "ft:", "tiny-random "):
        response = api_without_model_server.http.post("/v1/completions", json={"model": model, "prompt": "x"})
        assert response.status_code == 404, (model, response.text)
        assert response.json()["error"]["code"] == "model_not_found"
    assert api_without_model_server.http.post("/v1/chat/completions", json={"model": "x"}).status_code == 400
    unauthenticated = api_without_model_server.http.post(
        "/v1/chat/completions",
        json={"model": "tiny-random", "messages": HELLO},
        headers={"Authorization": ""},
    )
    assert unauthenticated.status_code == 401


def test_a_content_part_that_is_not_text_is_named_in_the_message(api):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    response = api.http.post("/v1/chat/completions", json={"model": "tiny-random", "messages": messages})
    assert response.status_code == 400
    assert "messages[0].content[0].type: Input should be 'text'" in response.json()["error"]["message"]
