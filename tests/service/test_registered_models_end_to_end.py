"""A registered base model through the real parts: a job on it trained by a Celery worker process,
then the base model and the trained adapter answering chat requests through the API and the model
server."""

from __future__ import annotations

import pytest

from core.base_models import register_model
from inference.server import create_model_server
from tests.conftest import ApiClient, served
from tests.model_dirs import second_model_dir
from tests.service.test_end_to_end import JOBS, addition_lines, finished, job_body, wait_for

pytestmark = pytest.mark.slow


def test_a_registered_model_is_trained_by_a_worker_and_served(pg_settings, start_worker):
    register_model(str(second_model_dir()), "mine", directory=pg_settings.data_dir)
    model_server = create_model_server(pg_settings.model_copy(update={"inference_dtype": "float32"}))
    with served(model_server) as url:
        api = ApiClient(pg_settings.model_copy(update={"inference_url": url}))
        worker = start_worker(pg_settings)
        file_id = api.upload(addition_lines(8)).json()["id"]
        body = job_body(file_id, steps=1, max_completion_tokens=4)
        created = api.http.post(JOBS, json={**body, "model": "mine"})
        assert created.status_code == 200, created.text

        job = wait_for(api.http, created.json()["id"], finished, worker=worker)
        assert job["status"] == "succeeded", (job, worker.log()[-3000:])
        assert job["fine_tuned_model"] == f"ft:mine:e2e:{job['id']}"

        for model in ("mine", job["fine_tuned_model"]):
            chat = {
                "model": model,
                "messages": [{"role": "user", "content": "What is 2 + 3?"}],
                "max_tokens": 4,
            }
            answer = api.http.post("/v1/chat/completions", json=chat)
            assert answer.status_code == 200, answer.text
            assert answer.json()["model"] == model and answer.json()["usage"]["completion_tokens"] >= 1
        api.http.close()
