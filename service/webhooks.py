"""Webhooks: a project hears that its jobs ended, signed per the Standard Webhooks spec.

An ended job (`fine_tuning.job.succeeded`, `.failed`, `.cancelled`: OpenAI's event names and body,
`{"id": "evt_...", "object": "event", "type": ..., "created_at": ..., "data": {"id": "ftjob-..."}}`)
writes one delivery row per endpoint of its project in the same transaction as its final status
(an outbox), so nothing is lost to a crash or a restart. Every API process runs a WebhookSender
that claims due rows (SKIP LOCKED, so several senders share the work), POSTs them with
`webhook-id` (the row's id, the same on every attempt: receivers drop repeats by it),
`webhook-timestamp` and `webhook-signature` (`v1,<base64 HMAC-SHA256(secret, "id.timestamp.body")>`),
and retries a failure on a backoff schedule until it gives up.

Where the service runs for others (`production`), endpoints on private, loopback or link-local
addresses are refused, at registration and again at every delivery.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlsplit

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from service.db import transaction
from service.periodic import Periodic
from service.settings import Settings
from service.tables import Job, JobStatus, WebhookDelivery, WebhookEndpoint, new_id, utcnow

log = logging.getLogger(__name__)

JOB_EVENTS = {
    JobStatus.SUCCEEDED: "fine_tuning.job.succeeded",
    JobStatus.FAILED: "fine_tuning.job.failed",
    JobStatus.CANCELLED: "fine_tuning.job.cancelled",
}
EVENT_TYPES = tuple(JOB_EVENTS.values())
SECRET_PREFIX = "whsec_"
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
BATCH = 20  # deliveries a sender claims at once


# ----- the signature (pure) --------------------------------------------------------------------


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def sign(secret: str, message_id: str, timestamp: int, body: str) -> str:
    """The `webhook-signature` header: `v1,` and the base64 HMAC-SHA256 of `id.timestamp.body`
    under the secret's bytes (the base64 after `whsec_`)."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    digest = hmac.new(key, f"{message_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def retry_delay(attempts: int, schedule: list[float]) -> float | None:
    """Seconds before the next try after `attempts` failed ones; None once the schedule is spent."""
    return schedule[attempts - 1] if 1 <= attempts <= len(schedule) else None


# ----- where deliveries may go ------------------------------------------------------------------


class RefusedDestination(ValueError):
    """A URL this deployment does not send webhooks to."""


def check_destination(url: str, allow_private: bool) -> None:
    """http(s) with a host; unless `allow_private`, no address of the host may be private,
    loopback, link-local or otherwise not public (the service must not be a way into its network)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RefusedDestination("must be an http or https URL with a host")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise RefusedDestination(f"its host {parts.hostname!r} does not resolve: {exc}") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if not address.is_global:
            raise RefusedDestination(f"its host resolves to {address}, which is not a public address")


def allows_private(settings: Settings) -> bool:
    if settings.webhook_private_addresses is not None:
        return settings.webhook_private_addresses
    return settings.environment == "local"


# ----- the outbox --------------------------------------------------------------------------------


def enqueue_job_ended(session: Session, job_id: str, status: JobStatus) -> int:
    """In the transaction that ends the job: a delivery for each endpoint that wants this event."""
    event_type = JOB_EVENTS.get(status)
    project_id = session.scalar(select(Job.project_id).where(Job.id == job_id))
    if event_type is None or project_id is None:
        return 0
    endpoints = session.scalars(select(WebhookEndpoint).where(WebhookEndpoint.project_id == project_id)).all()
    now = utcnow()
    event = {
        "id": new_id("evt"),
        "object": "event",
        "type": event_type,
        "created_at": int(now.timestamp()),
        "data": {"id": job_id},
    }
    body = json.dumps(event, separators=(",", ":"))
    wanted = [e for e in endpoints if event_type in e.events]
    for endpoint in wanted:
        session.add(
            WebhookDelivery(endpoint_id=endpoint.id, event_type=event_type, body=body, next_attempt_at=now)
        )
    return len(wanted)


@dataclass(frozen=True)
class _Due:
    id: str
    url: str
    secret: str
    body: str
    attempts: int


def deliver_due(settings: Settings, sessions: sessionmaker[Session], http: httpx.Client) -> dict[str, int]:
    """Send what is due once; returns how many were delivered, retried later, given up."""
    now = utcnow()
    claim = timedelta(seconds=settings.webhook_timeout_seconds * 2 + 5)
    with transaction(sessions) as session:
        rows = session.execute(
            select(WebhookDelivery, WebhookEndpoint.url, WebhookEndpoint.secret)
            .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
            .where(WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= now)
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(BATCH)
            .with_for_update(of=WebhookDelivery, skip_locked=True)
        ).all()
        # Claimed: another sender skips them until this one is surely done or dead.
        due = [_Due(d.id, url, secret, d.body, d.attempts) for d, url, secret in rows]
        for delivery, _, _ in rows:
            delivery.next_attempt_at = now + claim
    counts = {DELIVERED: 0, PENDING: 0, FAILED: 0}
    for item in due:
        outcome = _send(settings, http, item)
        counts[_record(settings, sessions, item, *outcome)] += 1
    return counts


def _send(settings: Settings, http: httpx.Client, item: _Due) -> tuple[int | None, str | None]:
    try:
        check_destination(item.url, allows_private(settings))
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": "prefix-rft-webhooks",
            "webhook-id": item.id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(item.secret, item.id, timestamp, item.body),
        }
        response = http.post(
            item.url, content=item.body.encode(), headers=headers, timeout=settings.webhook_timeout_seconds
        )
    except (httpx.HTTPError, RefusedDestination) as exc:
        return None, f"{type(exc).__name__}: {exc}"[:1000]
    if response.is_success:
        return response.status_code, None
    return response.status_code, f"HTTP {response.status_code}: {response.text[:200]}"


def _record(
    settings: Settings, sessions: sessionmaker[Session], item: _Due, code: int | None, error: str | None
) -> str:
    attempts = item.attempts + 1
    now = utcnow()
    if error is None:
        status, values = DELIVERED, {"delivered_at": now, "next_attempt_at": None}
    elif (delay := retry_delay(attempts, settings.webhook_retry_seconds)) is not None:
        status, values = PENDING, {"next_attempt_at": now + timedelta(seconds=delay)}
    else:
        status, values = FAILED, {"next_attempt_at": None}
        log.warning("webhook %s to %s given up after %d attempts: %s", item.id, item.url, attempts, error)
    with transaction(sessions) as session:
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == item.id, WebhookDelivery.status == PENDING)
            .values(status=status, attempts=attempts, last_status_code=code, last_error=error, **values)
        )
    return status


class WebhookSender(Periodic):
    """deliver_due every settings.webhook_seconds in a daemon thread, until stop()."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]):
        self.http = httpx.Client(follow_redirects=False)
        super().__init__(
            "webhooks",
            settings.webhook_seconds,
            lambda: deliver_due(settings, sessions, self.http),
            stop_timeout=settings.webhook_timeout_seconds + 5,
        )

    def stop(self) -> None:
        super().stop()
        self.http.close()
