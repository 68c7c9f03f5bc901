"""OpenAI-style error bodies: `{"error": {"type", "code", "message", "param"}}` for every failure.

Both HTTP servers install these handlers; the API adds its own on top (api/errors.py).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

log = logging.getLogger(__name__)

_TYPES = {
    401: "authentication_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


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


def joined(details: list[dict[str, Any]]) -> str:
    """One message for several problems, each `param: message`."""
    return "; ".join(f"{d['param']}: {d['message']}" if d["param"] else d["message"] for d in details)


InvalidRequest = Callable[[Request, list[dict[str, Any]]], Awaitable[JSONResponse]]


def invalid_request_response(status: int, details: list[dict[str, Any]]) -> JSONResponse:
    """Every problem of a request body that failed validation; `param` is the first one's."""
    first = details[0]["param"] if details else None
    return JSONResponse(error_body(status, "invalid_request", joined(details), first, details), status)


async def answer_422(_request: Request, details: list[dict[str, Any]]) -> JSONResponse:
    return invalid_request_response(422, details)


def install_error_handlers(app: FastAPI, invalid_request: InvalidRequest = answer_422) -> None:
    """Every failure answers the error body; `invalid_request` answers a body that fails validation."""

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        body = error_body(exc.status, exc.code, exc.message, exc.param, exc.details)
        return JSONResponse(body, exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await invalid_request(request, [_validation_detail(e) for e in exc.errors()])

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.__cause__ is not None:
            # FastAPI's answer to a JSON body it could not decode (not UTF-8, nested too deeply):
            # the same answer as to any other body that is not JSON.
            reason = f"{type(exc.__cause__).__name__}: {exc.__cause__}"[:200]
            error = {"type": "json_invalid", "loc": ("body",), "msg": "", "ctx": {"error": reason}}
            return await invalid_request(request, [_validation_detail(error)])
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        body = error_body(exc.status_code, code, str(exc.detail))
        headers = exc.headers
        if exc.status_code == 405 and (allowed := allowed_methods(request)):
            # Starlette's Allow names only the first route whose path matched, but GET and POST
            # /v1/files are two routes: the header must list every method of the resource.
            headers = {**(headers or {}), "Allow": ", ".join(allowed)}
        return JSONResponse(body, exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, "internal_error", "internal server error"), 500)


def _validation_detail(error: dict[str, Any]) -> dict[str, Any]:
    if error["type"] == "json_invalid":
        reason = error.get("ctx", {}).get("error", "")
        return {"param": None, "message": f"the request body is not valid JSON ({reason})".replace(" ()", "")}
    if error["type"] == "missing" and tuple(error["loc"]) == ("body",):
        return {"param": None, "message": "a JSON request body is required"}
    return {"param": _param(error["loc"]), "message": error["msg"].removeprefix("Value error, ")}


def _param(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """`("body", "hyperparameters", "steps")` -> `hyperparameters.steps`; list indices as `[0]`.

    Pydantic names the member of a union that failed (`content.constrained-str`,
    `content.list[TextPart]`); those names are not fields and are left out.
    """
    parts = [p for p in loc if p not in ("body", "query", "path", "header") and not _union_member(p)]
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or None


def _union_member(part: Any) -> bool:
    if not isinstance(part, str):
        return False
    return (
        any(c in part for c in "[]") or part.startswith(("constrained-", "function-")) or part in _TYPE_TAGS
    )


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "list", "dict"})

_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> list[str]:
    """Every method that some route of the app serves at the request's path."""
    routes = request.app.router.routes
    return [
        method
        for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)
    ]
