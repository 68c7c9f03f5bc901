"""OpenAI-style error bodies: `{"error": {"type", "code", "message", "param"}}` for every failure."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
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
        # The OpenAI-compatible routes answer 400, as OpenAI does (its clients raise BadRequestError).
        status = 400 if request.url.path in OPENAI_COMPATIBLE_PATHS else 422
        return JSONResponse(error_body(status, "invalid_request", message, first, details), status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.__cause__ is not None:
            # FastAPI's answer to a JSON body it could not decode (not UTF-8, nested too deeply):
            # the same answer as to any other body that is not JSON.
            reason = f"{type(exc.__cause__).__name__}: {exc.__cause__}"[:200]
            error = {"type": "json_invalid", "loc": ("body",), "msg": "", "ctx": {"error": reason}}
            return await _validation_error(request, RequestValidationError([error]))
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        body = error_body(exc.status_code, code, str(exc.detail))
        headers = exc.headers
        if exc.status_code == 405 and (allowed := allowed_methods(request)):
            # Starlette's Allow names only the first route whose path matched, but GET and POST
            # /v1/datasets are two routes: the header must list every method of the resource.
            headers = {**(headers or {}), "Allow": ", ".join(allowed)}
        return JSONResponse(body, exc.status_code, headers=headers)

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _database_unavailable(request: Request, exc: DBAPIError) -> JSONResponse:
        # The database is down or restarting: say so and when to retry; the pool reconnects by itself.
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc.orig)
        body = error_body(503, "database_unavailable", "the database is unavailable; retry in a few seconds")
        return JSONResponse(body, 503, headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, "internal_error", "internal server error"), 500)


OPENAI_COMPATIBLE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
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


# ----- errors in the OpenAPI schema ------------------------------------------------------------


class ErrorObject(BaseModel):
    type: str = Field(description="authentication_error, invalid_request_error, service_unavailable, ...")
    code: str = Field(description="What went wrong, for programs: dataset_not_found, invalid_dataset, ...")
    message: str = Field(description="What went wrong and what to change, for people.")
    param: str | None = Field(description="The request field at fault, when there is one.")
    details: list[dict[str, Any]] | None = Field(
        None, description="Every problem found, e.g. each bad dataset line as {line, field, message}."
    )


class ErrorResponse(BaseModel):
    error: ErrorObject


ERROR_DESCRIPTIONS = {
    400: "The request is malformed: an upload that is not multipart/form-data, or an invalid body of an "
    "OpenAI-compatible route (those answer 400 where the others answer 422).",
    401: "No API key, or one that is unknown or revoked.",
    404: "No such resource in the caller's project.",
    409: "The resource's state does not allow this.",
    413: "The upload is larger than the limit.",
    429: "Too many requests wait for the model; retry after `Retry-After` seconds.",
    422: "Invalid input; `details` lists every problem.",
    503: "A dependency (the database, the reward sandbox, the model server) is unavailable; retry later.",
}
_ERROR_HEADERS = {
    401: {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "string"}}},
    503: {"Retry-After": {"description": "Seconds to wait, when known.", "schema": {"type": "string"}}},
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A route's `responses=` for the statuses it answers with the error body (409, 413, ...)."""
    return {
        status: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]}
        | ({"headers": _ERROR_HEADERS[status]} if status in _ERROR_HEADERS else {})
        for status in statuses
    }


def document_error_responses(app: FastAPI) -> None:
    """Put the errors every route shares into the app's OpenAPI schema.

    FastAPI documents 422 with its own `HTTPValidationError`, a body this API never sends, and
    cannot see the bearer key that `current_project` reads. So: every 422 gets the error body;
    every /v1 operation the bearer scheme, 401 and 503 (a dependency down); every operation with a
    path id 404. Errors of one route only (409, 413, ...) are on the route: `error_responses`.
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        return _with_shared_errors(generate())  # FastAPI caches the schema; this is idempotent

    app.openapi = openapi


def _with_shared_errors(schema: dict[str, Any]) -> dict[str, Any]:
    components = schema.setdefault("components", {})
    models = components.setdefault("schemas", {})
    if ErrorResponse.__name__ not in models:
        definition = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
        models.update(definition.pop("$defs", {}))
        models[ErrorResponse.__name__] = definition
    components.setdefault("securitySchemes", {})["projectKey"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "A project's API key: `Authorization: Bearer prk_...`.",
    }
    for path, item in schema.get("paths", {}).items():
        for operation in item.values():
            responses = operation.setdefault("responses", {})
            if "422" in responses:
                responses["422"] = _error_response(422)
            if "{" in path:
                responses.setdefault("404", _error_response(404))
            if path.startswith("/v1/"):
                operation["security"] = [{"projectKey": []}]
                responses.setdefault("401", _error_response(401))
                responses.setdefault("503", _error_response(503))
    for unused in ("HTTPValidationError", "ValidationError"):  # only FastAPI's 422 pointed at them
        models.pop(unused, None)
    return schema


def _error_response(status: int) -> dict[str, Any]:
    """The OpenAPI response object of an error status."""
    ref = {"$ref": f"#/components/schemas/{ErrorResponse.__name__}"}
    response: dict[str, Any] = {
        "description": ERROR_DESCRIPTIONS[status],
        "content": {"application/json": {"schema": ref}},
    }
    if status in _ERROR_HEADERS:
        response["headers"] = _ERROR_HEADERS[status]
    return response


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> list[str]:
    """Every method that some route of the app serves at the request's path."""
    routes = request.app.router.routes
    return [
        method
        for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)
    ]
