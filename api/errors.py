"""OpenAI-style error bodies: `{"error": {"type", "code", "message", "param"}}` for every failure."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

_TYPES = {401: "authentication_error", 404: "invalid_request_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.code, self.message, self.param, self.details = status, code, message, param, details
        self.headers = headers


def not_found(kind: str, resource_id: str, param: str | None = None) -> APIError:
    return APIError(404, f"{kind}_not_found", f"no {kind} with id {resource_id!r}", param)


def error_body(
    status: int,
    code: str,
    message: str,
    param: str | None = None,
    details: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    error: dict[str, Any] = {
        "type": _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error"),
        "code": code,
        "message": message,
        "param": param,
    }
    if details:
        error["details"] = details
    return {"error": error}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        body = error_body(exc.status, exc.code, exc.message, exc.param, exc.details)
        return JSONResponse(body, exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI reads the body before the key is checked; a caller without a key hears that first.
        if request.url.path.startswith("/v1/") and not request.headers.get("authorization"):
            return JSONResponse(error_body(401, *MISSING_KEY), 401, headers=BEARER_CHALLENGE)
        details = [_validation_detail(e) for e in exc.errors()]
        message = "; ".join(f"{d['param']}: {d['message']}" if d["param"] else d["message"] for d in details)
        first = details[0]["param"] if details else None
        return JSONResponse(error_body(422, "invalid_request", message, first, details), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        body = error_body(exc.status_code, code, str(exc.detail))
        return JSONResponse(body, exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, "internal_error", "internal server error"), 500)


MISSING_KEY = ("missing_api_key", "send an API key as 'Authorization: Bearer <key>'")
BEARER_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def _validation_detail(error: dict[str, Any]) -> dict[str, Any]:
    if error["type"] == "json_invalid":
        reason = error.get("ctx", {}).get("error", "")
        return {"param": None, "message": f"the request body is not valid JSON ({reason})".replace(" ()", "")}
    if error["type"] == "missing" and tuple(error["loc"]) == ("body",):
        return {"param": None, "message": "a JSON request body is required"}
    return {"param": _param(error["loc"]), "message": error["msg"].removeprefix("Value error, ")}


def _param(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """`("body", "hyperparameters", "steps")` -> `hyperparameters.steps`; list indices as `[0]`."""
    parts = [p for p in loc if p not in ("body", "query", "path", "header")]
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or None
