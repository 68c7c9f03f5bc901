"""GET /v1/fine_tuning/jobs/{id}/events/stream: server-sent events from the real API behind
uvicorn on PostgreSQL, read with httpx as a client would, while another thread writes events as
a worker does."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from cli.client import _server_sent_events
from service.db import transaction
from service.lifecycle import add_event
from tests.conftest import EXACT_ANSWER, ApiClient, job_request, served

LINES = [json.dumps({"prompt": f"{i}+1?", "answer": str(i + 1)}) for i in range(8)]
GRADER = EXACT_ANSWER


@pytest.fixture
def deployment(pg_settings) -> Iterator[tuple[ApiClient, httpx.Client]]:
    settings = pg_settings.model_copy(update={"stream_poll_seconds": 0.05, "stream_keepalive_seconds": 0.3})
    api = ApiClient(settings)
    with served(api.app) as base_url:
        http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {api.key}"}, timeout=30)
        yield api, http
        http.close()
    api.http.close()


def new_job(api: ApiClient) -> str:
    file_id = api.upload(LINES).json()["id"]
    created = api.http.post("/v1/fine_tuning/jobs", json=job_request(file_id, grader=GRADER))
    assert created.status_code == 200, created.text
    return created.json()["id"]


def write_events(api: ApiClient, job_id: str, messages: list[str], pause: float = 0.0) -> None:
    for message in messages:
        with transaction(api.sessions) as session:
            add_event(session, job_id, message)
        time.sleep(pause)


def stream(http: httpx.Client, job_id: str, last_event_id: int | str | None = None):
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    return http.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events/stream", headers=headers)


def open_streams(http: httpx.Client) -> float:
    return next(
        float(line.split()[-1])
        for line in http.get("/metrics").text.splitlines()
        if line.startswith("prefix_rft_event_streams ")
    )


def test_a_dropped_stream_resumes_from_last_event_id_without_loss_or_duplicates(deployment):
    api, http = deployment
    job_id = new_job(api)
    writer = threading.Thread(target=write_events, args=(api, job_id, [f"e{i}" for i in range(30)], 0.01))
    writer.start()
    seen: list[tuple[int, str]] = []
    with stream(http, job_id) as response:  # the first connection drops after 10 events
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for number, kind, event in _server_sent_events(response.iter_lines()):
            assert (
                kind == "message"
                and event["id"] == f"ftevent-{number}"
                and event["object"] == "fine_tuning.job.event"
            )
            seen.append((number, event["message"]))
            if len(seen) == 10:
                break
    writer.join()
    api.http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").raise_for_status()  # the job ends
    with stream(http, job_id, last_event_id=seen[-1][0]) as response:
        kinds = []
        for number, kind, event in _server_sent_events(response.iter_lines()):
            kinds.append(kind)
            if kind != "end":
                seen.append((number, event["message"]))
    assert kinds[-1] == "end"  # and then the server closed the stream
    listed = api.http.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    assert [m for _, m in seen] == [e["message"] for e in reversed(listed)]  # all, once, in order
    assert [n for n, _ in seen] == sorted({n for n, _ in seen})
    assert [m for _, m in seen][1:31] == [f"e{i}" for i in range(30)]


def test_a_quiet_stream_keeps_alive_and_a_gone_client_frees_it(deployment):
    api, http = deployment
    job_id = new_job(api)
    before = open_streams(http)
    with stream(http, job_id) as response:
        lines = response.iter_lines()
        started = time.monotonic()
        comments = []
        for line in lines:
            if line.startswith(":"):
                comments.append(line)
                if len(comments) == 2:
                    break
        assert comments == [": keep-alive", ": keep-alive"] and time.monotonic() - started < 5
        assert open_streams(http) == before + 1
    # The client went away: the server notices and the stream's resources go.
    deadline = time.monotonic() + 5
    while open_streams(http) != before:
        assert time.monotonic() < deadline, "the stream outlived its client"
        time.sleep(0.05)


def test_metrics_events_carry_the_step_and_an_ended_job_s_stream_ends(deployment):
    api, http = deployment
    job_id = new_job(api)
    with transaction(api.sessions) as session:
        step = {"split": "train", "total_steps": 3, "step": 1, "loss": 0.5, "reward_mean": 0.25}
        add_event(session, job_id, "step 1/3", data=step, type="metrics")
    api.http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").raise_for_status()
    with stream(http, job_id) as response:
        events = list(_server_sent_events(response.iter_lines()))
    kinds = [kind for _, kind, _ in events]
    assert kinds[-1] == "end" and events[-1][2] == {"status": "cancelled"}
    metrics = [e for _, kind, e in events if kind == "metrics"]
    assert len(metrics) == 1 and metrics[0]["data"]["train_loss"] == 0.5 and metrics[0]["data"]["step"] == 1


def test_the_stream_is_the_project_s_own_and_ignores_a_foreign_cursor(deployment):
    api, http = deployment
    job_id = new_job(api)
    stranger = api.other_project()
    assert stranger.http.get(f"/v1/fine_tuning/jobs/{job_id}/events/stream").status_code == 404
    with stream(http, job_id, last_event_id=None) as response:
        assert response.status_code == 200
    # An id that is none of ours is ignored: the stream starts from the beginning (never a loss).
    api.http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").raise_for_status()
    with stream(http, job_id, last_event_id="yesterday") as response:
        events = list(_server_sent_events(response.iter_lines()))
    assert events[0][2]["message"].startswith("job created") and events[-1][1] == "end"
    stranger.http.close()
