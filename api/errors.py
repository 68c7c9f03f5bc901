"""The API's errors on top of the shared ones (protocol/errors.py): a missing key before a bad
body, 400 on the OpenAI-compatible routes, 503 while the database or the object store is away,
and the error bodies in the OpenAPI schema."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from protocol.errors import APIError, error_body, install_error_handlers, invalid_request_response
from service.storage import ObjectNotFound, StorageError

log = logging.getLogger(__name__)

OPENAI_COMPATIBLE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
OPENAI_COMPATIBLE_PREFIXES = ("/v1/fine_tuning/", "/v1/files")
STORAGE_RETRY_SECONDS = 5
MISSING_KEY = ("missing_api_key", "send an API key as 'Authorization: Bearer <key>'")
BEARER_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def not_found(kind: str, resource_id: str, param: str | None = None) -> APIError:
    return APIError(404, f"{kind}_not_found", f"no {kind} with id {resource_id!r}", param)


def install_api_error_handlers(app: FastAPI) -> None:
    install_error_handlers(app, invalid_request=_invalid_request)

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _database_unavailable(request: Request, exc: DBAPIError) -> JSONResponse:
        # The database is down or restarting: say so and when to retry; the pool reconnects by itself.
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc.orig)
        body = error_body(503, "database_unavailable", "the database is unavailable; retry in a few seconds")
        return JSONResponse(body, 503, headers={"Retry-After": "5"})

    @app.exception_handler(StorageError)
    async def _storage_unavailable(request: Request, exc: StorageError) -> JSONResponse:
        if isinstance(exc, ObjectNotFound):  # a row whose object is gone: lost data, not an outage
            log.error("object missing on %s %s: %s", request.method, request.url.path, exc)
            return JSONResponse(error_body(500, "internal_error", "a stored object is missing"), 500)
        # The object store is down or refusing: say so and when to retry; its client reconnects.
        log.warning("storage unavailable on %s %s: %s", request.method, request.url.path, exc)
        body = error_body(
            503, "storage_unavailable", "the object store is unavailable; retry in a few seconds"
        )
        return JSONResponse(body, 503, headers={"Retry-After": str(STORAGE_RETRY_SECONDS)})


async def _invalid_request(request: Request, details: list[dict[str, Any]]) -> JSONResponse:
    # FastAPI reads the body before the key is checked; a caller without a key hears that first.
    if request.url.path.startswith("/v1/") and not request.headers.get("authorization"):
        return JSONResponse(error_body(401, *MISSING_KEY), 401, headers=BEARER_CHALLENGE)
    # The OpenAI-compatible routes answer 400, as OpenAI does (its clients raise BadRequestError).
    return invalid_request_response(400 if is_openai_path(request.url.path) else 422, details)


def is_openai_path(path: str) -> bool:
    """A route of OpenAI's API, whose invalid requests answer 400 as OpenAI's do."""
    return path in OPENAI_COMPATIBLE_PATHS or path.startswith(OPENAI_COMPATIBLE_PREFIXES)


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
    503: "A dependency (the database, the object store, the reward sandbox, the model server) is unavailable; retry later.",
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
            if "422" in responses and is_openai_path(path):
                del responses["422"]
                responses["400"] = _error_response(400)
            elif "422" in responses:
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
