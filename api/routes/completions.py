"""OpenAI-compatible inference: `/v1/chat/completions` and `/v1/completions`.

The API checks the key, validates the body (400 naming the field), resolves `model` to a base
model or one of the caller's trained adapters (anything else, another project's adapter
included, is a 404), and forwards to the model server (`inference.server`), relaying its answer
or its event stream byte for byte. This process never loads a model.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from api.deps import ProjectDep, Services, ServicesDep
from api.errors import error_responses
from api.model_names import adapter_job, checkpoint_of, deployment_base_models
from protocol.completions import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    AdapterRef,
    ChatCompletionRequest,
    CompletionRequest,
    ForwardedChat,
    ForwardedCompletion,
    Target,
)
from protocol.disconnects import unless_disconnected
from protocol.errors import APIError
from service.tables import Artifact

router = APIRouter(tags=["inference"])

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The completion; with `stream: true`, server-sent events of chunks ending in `[DONE]`",
        "content": {"application/json": {}, "text/event-stream": {"schema": {"type": "string"}}},
    },
    **error_responses(400, 404, 429, 503),
}


@router.post(CHAT_PATH, responses=_RESPONSES)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, project_id: ProjectDep, services: ServicesDep
) -> Response:
    """A chat completion from a base model or a trained adapter (`model` = its `ft:...` name)."""
    target = await run_in_threadpool(resolve_model, services, project_id, body.model)
    return await _forward(
        services, request, CHAT_PATH, ForwardedChat(target=target, request=body), body.stream
    )


@router.post(COMPLETIONS_PATH, responses=_RESPONSES)
async def completions(
    body: CompletionRequest, request: Request, project_id: ProjectDep, services: ServicesDep
) -> Response:
    """A text completion of `prompt` (no chat template), from a base model or a trained adapter."""
    target = await run_in_threadpool(resolve_model, services, project_id, body.model)
    forwarded = ForwardedCompletion(target=target, request=body)
    return await _forward(services, request, COMPLETIONS_PATH, forwarded, body.stream)


def resolve_model(services: Services, project_id: str, name: str) -> Target:
    """A base model (built in or registered), an adapter of a succeeded job of this project, or one of its
    jobs' checkpoints (`...:ckpt-step-<n>`, while the job keeps it)."""
    if name in deployment_base_models(services.settings):
        return Target(name=name, base_model=name)
    with services.sessions() as session:
        job = adapter_job(session, project_id, name)
        artifact = session.scalar(select(Artifact).where(Artifact.job_id == job.id)) if job else None
        if artifact is not None:
            adapter = AdapterRef(storage_key=artifact.storage_key, sha256=artifact.sha256)
            return Target(name=name, base_model=job.model, adapter=adapter)
        if found := checkpoint_of(session, project_id, name):
            job, checkpoint = found
            adapter = AdapterRef(storage_key=checkpoint.storage_key, sha256=checkpoint.sha256)
            return Target(name=name, base_model=job.model, adapter=adapter)
    raise APIError(
        404,
        "model_not_found",
        f"The model {name!r} does not exist or you do not have access to it "
        "(GET /v1/models lists the base models and your trained adapters).",
        "model",
    )


async def _forward(
    services: Services, request: Request, path: str, forwarded: BaseModel, stream: bool
) -> Response:
    # A client per request: it lives as long as the (streamed) answer, on this request's loop.
    settings = services.settings
    client = httpx.AsyncClient(
        base_url=settings.inference_url, timeout=httpx.Timeout(settings.inference_timeout_seconds, connect=5)
    )
    relaying = False
    try:
        upstream_request = client.build_request("POST", path, json=forwarded.model_dump(mode="json"))
        try:
            upstream = await unless_disconnected(request, client.send(upstream_request, stream=True))
        except httpx.TransportError as exc:
            raise APIError(
                503,
                "inference_unavailable",
                f"the model server is unavailable ({type(exc).__name__}); retry in a few seconds",
                headers={"Retry-After": "5"},
            ) from None
        if upstream is None:  # the caller went away while the model loaded; nothing to answer
            return Response(status_code=499)
        if stream and upstream.status_code == 200:
            relaying = True
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(
                _relay(upstream, client), media_type="text/event-stream", headers=headers
            )
        body = await unless_disconnected(request, upstream.aread())
        media_type = upstream.headers.get("content-type", "application/json")
        # The model server's advice on retrying (a full queue: 429 with Retry-After) reaches the client.
        advice = {k: upstream.headers[k] for k in ("retry-after", "x-should-retry") if k in upstream.headers}
        return Response(body or b"", upstream.status_code, headers=advice, media_type=media_type)
    finally:
        if not relaying:
            await client.aclose()  # closes the upstream response's connection too


async def _relay(upstream: httpx.Response, client: httpx.AsyncClient) -> AsyncIterator[bytes]:
    # Closing the client (the caller disconnected, so Starlette stops this generator) closes the
    # connection to the model server, which then drops the rows from its batch.
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    finally:
        await client.aclose()
