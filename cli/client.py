"""A small client of the REST API, used by `prefix-rft files|jobs ...`."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
RECONNECTS = 5  # dropped event streams resumed in a row before giving up


class ClientError(Exception):
    """The API's error, as its message says it (and the parameter it names)."""

    def __init__(self, status: int, error: dict[str, Any]):
        self.status, self.error = status, error
        param = f" (param: {error['param']})" if error.get("param") else ""
        details = ""
        for detail in error.get("details") or []:
            line = f"line {detail['line']}" if detail.get("line") else None
            where = ", ".join(x for x in (line, detail.get("field") or detail.get("param")) if x)
            details += f"\n  - {where}: {detail['message']}" if where else f"\n  - {detail['message']}"
        super().__init__(f"{status} {error.get('code')}: {error.get('message')}{param}{details}")


class Client:
    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = 60):
        base_url = base_url or os.environ.get("PREFIX_RFT_API_URL", DEFAULT_URL)
        api_key = api_key or os.environ.get("PREFIX_RFT_API_KEY", "")
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"), headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout
        )

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        if response.is_error:
            raise _error(response)
        return response.json()

    def upload_file(self, path: Path) -> dict[str, Any]:
        """POST /v1/files: a JSONL training file, validated by the service as it streams in."""
        with path.open("rb") as handle:
            return self.request(
                "POST", "/v1/files", files={"file": (path.name, handle)}, data={"purpose": "fine-tune"}
            )

    def download_adapter(self, job_id: str, target: Path) -> str:
        """Stream the adapter archive to `target`, check its sha256, and return it."""
        digest = hashlib.sha256()
        with self.http.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/adapter") as response:
            if response.is_error:
                response.read()
                raise _error(response)
            expected = response.headers.get("x-content-sha256", "")
            with target.open("wb") as handle:
                for chunk in response.iter_bytes(1 << 20):
                    digest.update(chunk)
                    handle.write(chunk)
        if expected and digest.hexdigest() != expected:
            target.unlink()
            raise ClientError(
                0, {"code": "checksum_mismatch", "message": "the download's sha256 does not match"}
            )
        return digest.hexdigest()

    def stream_events(self, job_id: str, after: int = 0) -> Iterator[tuple[int, str, dict[str, Any]]]:
        """The job's events as they happen, oldest first, as (number, type, event) until the job
        ends; a dropped connection is resumed from the last event seen (`Last-Event-ID`)."""
        last, drops = after, 0
        while True:
            headers = {"Last-Event-ID": str(last)} if last else {}
            try:
                with self.http.stream(
                    "GET", f"/v1/fine_tuning/jobs/{job_id}/events/stream", headers=headers, timeout=None
                ) as response:
                    if response.is_error:
                        response.read()
                        raise _error(response)
                    for number, kind, data in _server_sent_events(response.iter_lines()):
                        if kind == "end":
                            return
                        last, drops = number or last, 0
                        yield last, kind, data
            except httpx.TransportError:
                drops += 1
                if drops > RECONNECTS:
                    raise
                time.sleep(min(2.0**drops, 30))


def _server_sent_events(lines: Iterator[str]) -> Iterator[tuple[int | None, str, dict[str, Any]]]:
    """(id, event, JSON data) of each event in a text/event-stream; comments and `retry:` skipped."""
    number, kind, data = None, "message", []
    for line in lines:
        if not line:
            if data:
                yield number, kind, json.loads("\n".join(data))
            number, kind, data = None, "message", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "id" and value.isdigit():
                number = int(value)
            elif field == "event":
                kind = value
            elif field == "data":
                data.append(value)


def _error(response: httpx.Response) -> ClientError:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        error = {"code": "http_error", "message": response.text[:500]}
    return ClientError(response.status_code, error)
