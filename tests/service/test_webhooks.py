"""Webhooks: the signature (hand-checked against the Standard Webhooks test vector), the retry
schedule, the address check, and deliveries from the real API behind uvicorn on PostgreSQL to a
real receiver on loopback, verified by the official openai client's `webhooks.unwrap`."""

from __future__ import annotations

import time

import openai
import pytest

from service.settings import Settings
from service.webhooks import RefusedDestination, check_destination, retry_delay, sign
from tests.conftest import EXACT_ANSWER, ApiClient, WebhookReceiver, job_request, served

LINES = ['{"prompt": "1+1?", "answer": "2"}', '{"prompt": "2+1?", "answer": "3"}']
GRADER = EXACT_ANSWER


def test_the_signature_is_the_standard_webhooks_reference_one():
    # The published test vector of the Standard Webhooks specification.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    signature = sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, '{"test": 2432232314}')
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_failed_deliveries_follow_the_schedule_then_stop():
    schedule = [5.0, 30.0, 120.0]
    assert [retry_delay(n, schedule) for n in (1, 2, 3, 4)] == [5.0, 30.0, 120.0, None]


def test_where_the_service_runs_for_others_private_addresses_are_refused():
    for url in (
        "http://127.0.0.1:9/x",
        "http://10.1.2.3/x",
        "http://169.254.169.254/latest",
        "http://[::1]/x",
    ):
        with pytest.raises(RefusedDestination, match="not a public address"):
            check_destination(url, allow_private=False)
        check_destination(url, allow_private=True)
    check_destination("https://93.184.216.34/hook", allow_private=False)  # a public address
    for url in ("ftp://example.com/x", "file:///etc/passwd", "http:///nohost"):
        with pytest.raises(RefusedDestination, match="http or https"):
            check_destination(url, allow_private=True)


OUTAGE_SECONDS = 60  # how long the receiver is down


def quick(settings: Settings) -> Settings:
    """The production schedule's shape (each wait longer, then steady), in seconds, not hours."""
    schedule = [0.5, 1.0, 2.0, 4.0, 8.0] + [10.0] * 10
    return settings.model_copy(update={"webhook_seconds": 0.1, "webhook_retry_seconds": schedule})


def cancelled_job(api: ApiClient) -> str:
    file_id = api.upload(LINES).json()["id"]
    job_id = api.http.post("/v1/fine_tuning/jobs", json=job_request(file_id, grader=GRADER)).json()["id"]
    api.http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").raise_for_status()  # queued: ended at once
    return job_id


def wait_for_events(receiver: WebhookReceiver, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while len(receiver.received) < count:
        assert time.monotonic() < deadline, f"{len(receiver.received)} of {count} webhooks arrived"
        time.sleep(0.05)


def test_signed_deliveries_survive_a_receiver_outage_and_a_restart(pg_settings, webhook_receiver):
    settings = quick(pg_settings)
    api = ApiClient(settings)
    official = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9")
    with served(api.app):
        made = api.http.post("/v1/webhooks", json={"url": webhook_receiver.url, "description": "ci"})
        assert made.status_code == 200, made.text
        endpoint = made.json()
        secret = endpoint["secret"]
        assert secret.startswith("whsec_") and endpoint["events"] == [
            "fine_tuning.job.succeeded",
            "fine_tuning.job.failed",
            "fine_tuning.job.cancelled",
        ]
        assert api.http.get("/v1/webhooks").json()["data"][0]["secret"] is None  # shown once

        first = cancelled_job(api)
        wait_for_events(webhook_receiver, 1)
        headers, body = webhook_receiver.received[0]
        event = official.webhooks.unwrap(body, headers, secret=secret)  # the signature verifies
        assert event.type == "fine_tuning.job.cancelled" and event.data.id == first
        with pytest.raises(openai.InvalidWebhookSignatureError):
            official.webhooks.unwrap(body + b" ", headers, secret=secret)

        webhook_receiver.stop()  # the receiver goes down ...
        went_down = time.monotonic()
        second, third = cancelled_job(api), cancelled_job(api)
        time.sleep(2)  # ... and its deliveries fail and wait for their retries
    api.http.close()

    # The service restarts (a new API process on the same database) while the receiver is down.
    api2 = ApiClient(settings)
    api2.http.headers["Authorization"] = f"Bearer {api.key}"
    with served(api2.app):
        pending = api2.http.get(f"/v1/webhooks/{endpoint['id']}/deliveries").json()["data"]
        assert {d["status"] for d in pending[:2]} == {"pending"} and all(
            d["attempts"] >= 1 for d in pending[:2]
        )
        assert "ConnectError" in pending[0]["last_error"]
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - went_down)))
        webhook_receiver.start()  # back up
        wait_for_events(webhook_receiver, 3)
        time.sleep(1.5)  # nothing more arrives: each event once
        events = [official.webhooks.unwrap(b, h, secret=secret) for h, b in webhook_receiver.received]
        assert sorted(e.data.id for e in events) == sorted([first, second, third])
        ids = [h["webhook-id"] for h, _ in webhook_receiver.received]
        assert len(ids) == len(set(ids)) == 3
        delivered = api2.http.get(f"/v1/webhooks/{endpoint['id']}/deliveries").json()["data"]
        assert [d["status"] for d in delivered] == ["delivered"] * 3
        assert {d["id"] for d in delivered} == set(ids)  # webhook-id is the delivery's id

        # Deleting the endpoint stops its deliveries; another project cannot see it.
        stranger = api2.other_project()
        assert stranger.http.get(f"/v1/webhooks/{endpoint['id']}").status_code == 404
        assert api2.http.delete(f"/v1/webhooks/{endpoint['id']}").json()["deleted"] is True
        cancelled_job(api2)
        time.sleep(1)
        assert len(webhook_receiver.received) == 3
    api2.http.close()


def test_production_refuses_an_endpoint_inside_its_network(pg_settings, webhook_receiver):
    api = ApiClient(pg_settings.model_copy(update={"webhook_private_addresses": False}))
    refused = api.http.post("/v1/webhooks", json={"url": webhook_receiver.url})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "url"
    assert "not a public address" in refused.json()["error"]["message"]
    bad = api.http.post(
        "/v1/webhooks", json={"url": webhook_receiver.url, "events": ["fine_tuning.job.paused"]}
    )
    assert bad.status_code == 422
    api.http.close()
