"""A small client of the REST API, used by `prefix-rft files|jobs ...`."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


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


def _error(response: httpx.Response) -> ClientError:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        error = {"code": "http_error", "message": response.text[:500]}
    return ClientError(response.status_code, error)
