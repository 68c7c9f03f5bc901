"""The model server: its own process, the only one that holds models. The API forwards to it.

    prefix-rft model-server --port 8001        (`prefix-rft serve` starts one on the same machine)

It answers `POST /v1/chat/completions` and `POST /v1/completions` with OpenAI's response and
stream-chunk formats, for a `Forwarded*` body: the caller's validated request plus the model the
API resolved for it (base model, and the adapter's object key and digest). It trusts that body,
so it must only be reachable by the API (compose keeps it on the internal network).
Base models load on their first request; adapters load on first use into an LRU cache.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from core.adapters import without_replaced_start
from core.base_models import base_models
from core.models import ModelNotFound, load_base_model, resolve_dtype
from inference.adapter_cache import AdapterCache, AdapterUnavailable, StorageOutage
from inference.engine import BatchedEngine, Completion, GenerationRequest, Progress, SamplingParams
from inference.scheduler import ModelWorker, Overloaded
from protocol.completions import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    MAX_CHOICES,
    ChatCompletionRequest,
    CompletionRequest,
    ForwardedChat,
    ForwardedCompletion,
    Target,
)
from protocol.disconnects import unless_disconnected
from protocol.errors import APIError, install_error_handlers
from protocol.request_ids import RequestIds
from service.settings import Settings, get_settings
from service.storage import open_storage

log = logging.getLogger(__name__)


class ModelPool:
    """The base models this process has loaded, each with its decode thread; loaded on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.storage = open_storage(
            settings.storage_url, s3_endpoint_url=settings.s3_endpoint_url, s3_region=settings.s3_region
        )
        self.workers: dict[str, ModelWorker] = {}
        self._lock = asyncio.Lock()

    async def get(self, name: str) -> ModelWorker:
        async with self._lock:
            if name not in self.workers:
                loop = asyncio.get_running_loop()
                self.workers[name] = await run_in_threadpool(self._start, name, loop)
            return self.workers[name]

    def _start(self, name: str, loop: asyncio.AbstractEventLoop) -> ModelWorker:
        started = time.perf_counter()

        def load() -> tuple[BatchedEngine, AdapterCache]:  # on the worker's own thread
            try:
                device = "cuda" if torch.cuda.is_available() else "cpu"
                dtype = resolve_dtype(self.settings.inference_dtype, device)
                models = base_models(self.settings.data_dir, self.settings.base_models)
                model, tokenizer = load_base_model(name, dtype=dtype, device=device, models=models)
            except ModelNotFound as exc:
                raise APIError(404, "model_not_found", str(exc), "model") from None
            capacity = self.settings.inference_adapter_cache_mb << 20
            adapters = AdapterCache(self.storage, model, capacity, self.settings.scratch_dir / "inference")
            return BatchedEngine(model, tokenizer), adapters

        settings = self.settings
        worker = ModelWorker(name, load, settings.inference_max_batch, loop, settings.inference_max_queue)
        log.info("model %s loaded in %.1f s", name, time.perf_counter() - started)
        return worker

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop()


def create_model_server(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    pool = ModelPool(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        pool.stop()

    app = FastAPI(title="Prefix-RFT model server", version="0.1.0", lifespan=lifespan)
    app.state.pool = pool
    install_error_handlers(app)
    app.add_middleware(RequestIds)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus: rows, tokens, batch and queue sizes, step time, time to first token."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        """Per loaded base model: rows decoding, rows waiting, steps taken, adapter cache bytes."""
        return {name: worker.stats() for name, worker in pool.workers.items()}

    @app.post(CHAT_PATH)
    async def chat_completions(body: ForwardedChat, request: Request):
        worker, adapter = await _model_and_adapter(pool, body.target)
        prompt = await run_in_threadpool(_chat_prompt_ids, worker.engine, body.request)
        rows = _generation_requests(worker.engine, [prompt], adapter, body.request, "messages")
        return await _respond(request, worker, rows, body.target, body.request, len(prompt), chat=True)

    @app.post(COMPLETIONS_PATH)
    async def completions(body: ForwardedCompletion, request: Request):
        if len(body.request.prompts) * body.request.n > MAX_CHOICES:
            raise APIError(
                400, "invalid_request", f"n x the number of prompts must be at most {MAX_CHOICES}", "n"
            )
        worker, adapter = await _model_and_adapter(pool, body.target)
        tokenizer = worker.engine.tokenizer
        prompts = await run_in_threadpool(lambda: [tokenizer(t)["input_ids"] for t in body.request.prompts])
        rows = _generation_requests(worker.engine, prompts, adapter, body.request, "prompt")
        prompt_tokens = sum(len(p) for p in prompts)
        return await _respond(request, worker, rows, body.target, body.request, prompt_tokens, chat=False)

    return app


async def _model_and_adapter(pool: ModelPool, target: Target):
    worker = await pool.get(target.base_model)
    if target.adapter is None:
        return worker, None
    try:
        return worker, await run_in_threadpool(worker.adapters.get, target.adapter)
    except StorageOutage as exc:  # the API relays the 503 and its Retry-After
        log.warning("adapter of %s not loaded, the object store is unavailable: %s", target.name, exc)
        raise APIError(
            503,
            "storage_unavailable",
            f"the model {target.name!r} cannot be loaded while the object store is unavailable; retry shortly",
            headers={"Retry-After": "5"},
        ) from None
    except AdapterUnavailable as exc:
        log.error("adapter of %s unavailable: %s", target.name, exc)
        raise APIError(
            500, "adapter_unavailable", f"the model {target.name!r} could not be loaded: {exc}"
        ) from None


def _chat_prompt_ids(engine: BatchedEngine, request: ChatCompletionRequest) -> list[int]:
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in request.messages
    ]
    try:
        encoded = engine.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
    except Exception as exc:  # a template that refuses this sequence of roles, say
        raise APIError(
            400, "invalid_request", f"the messages cannot be formatted: {exc}", "messages"
        ) from None
    return list(encoded["input_ids"])


def _generation_requests(
    engine: BatchedEngine,
    prompts: list[list[int]],
    adapter,
    request: ChatCompletionRequest | CompletionRequest,
    prompt_param: str,
) -> list[GenerationRequest]:
    """n rows per prompt; the i-th of them sampled with seed + i, so choices differ but reproduce."""
    prefix = getattr(adapter, "length", 0)
    replaced_start = getattr(adapter, "replaced_start", ())
    window = engine.max_positions or 1 << 31
    rows = []
    for sent in prompts:
        if not sent:
            raise APIError(400, "invalid_request", "the prompt is empty", prompt_param)
        prompt = without_replaced_start(sent, replaced_start)  # as the adapter was trained
        limit = request.token_limit or window - prefix - len(prompt)
        if prefix + len(prompt) + limit > window or limit < 1:
            raise APIError(
                400,
                "context_length_exceeded",
                f"This model's maximum context length is {window} tokens. However, you requested "
                f"{prefix + len(prompt) + max(limit, 0)} tokens ({len(prompt)} in the {prompt_param}, "
                f"{prefix} in the adapter's prefix, {max(limit, 0)} in the completion). Please reduce "
                f"the length of the {prompt_param} or the completion.",
                prompt_param if prefix + len(prompt) >= window else "max_tokens",  # what to shorten
            )
        for i in range(request.n):
            params = SamplingParams(
                max_tokens=limit,
                temperature=request.temperature,
                top_p=request.top_p,
                stop=request.stop_strings,
                seed=None if request.seed is None else request.seed + i,
            )
            rows.append(GenerationRequest(prompt, adapter, params))
    return rows


async def _respond(
    http: Request,
    worker: ModelWorker,
    rows: list[GenerationRequest],
    target: Target,
    request: ChatCompletionRequest | CompletionRequest,
    prompt_tokens: int,
    chat: bool,
):
    """`prompt_tokens`: as sent, counted once however many choices a prompt has (n), as OpenAI does."""
    queue: asyncio.Queue[tuple[int, Progress | BaseException]] = asyncio.Queue()

    def sink(key: int, item: Progress | BaseException) -> None:  # runs on this loop
        if request.stream or not isinstance(item, Progress) or item.completion is not None:
            queue.put_nowait((key, item))

    try:
        keys = worker.submit(rows, sink)
    except Overloaded as exc:
        raise APIError(429, "rate_limit_exceeded", str(exc), headers={"Retry-After": "1"}) from None
    reply = _Reply(target.name, chat, {key: index for index, key in enumerate(keys)}, prompt_tokens)
    if request.stream:
        return StreamingResponse(
            _stream(worker, queue, keys, reply, request.include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    completions: dict[int, Completion] = {}

    async def collect() -> dict[int, Completion]:  # the sink passes only last progress and errors
        while len(completions) < len(keys):
            key, item = await queue.get()
            if isinstance(item, BaseException):
                raise APIError(500, "inference_failed", f"decoding failed: {item}")
            completions[key] = item.completion
        return completions

    try:
        finished = await unless_disconnected(http, collect())
    finally:
        for key in keys:
            if key not in completions:
                worker.cancel(key)
    if finished is None:
        log.info("client went away; %d row(s) cancelled", len(keys) - len(completions))
        return None
    return reply.whole([finished[key] for key in keys])


async def _stream(worker, queue, keys: list[int], reply: _Reply, include_usage: bool) -> AsyncIterator[str]:
    finished: dict[int, Completion] = {}
    try:
        if reply.chat:
            for index in range(len(keys)):
                yield reply.event(reply.chunk(index, {"role": "assistant", "content": ""}))
        while len(finished) < len(keys):
            key, item = await queue.get()
            if isinstance(item, BaseException):
                yield reply.event(
                    {"error": {"type": "server_error", "code": "inference_failed", "message": str(item)}}
                )
                return
            index = reply.index[key]
            if item.text:
                yield reply.event(reply.chunk(index, {"content": item.text} if reply.chat else item.text))
            if item.completion is not None:
                finished[key] = item.completion
                empty = {} if reply.chat else ""
                yield reply.event(reply.chunk(index, empty, item.completion.finish_reason))
        if include_usage:
            yield reply.event(
                {**reply.header(), "choices": [], "usage": reply.usage(list(finished.values()))}
            )
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or the stream ended): rows still decoding leave the batch
        for key in keys:
            if key not in finished:
                worker.cancel(key)


class _Reply:
    """OpenAI's response objects for one request."""

    def __init__(self, model: str, chat: bool, index: dict[int, int], prompt_tokens: int) -> None:
        self.model, self.chat, self.index, self.prompt_tokens = model, chat, index, prompt_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def header(self) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def chunk(
        self, index: int, delta: dict[str, str] | str, finish_reason: str | None = None
    ) -> dict[str, Any]:
        if self.chat:
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**self.header(), "choices": [choice]}

    @staticmethod
    def event(data: dict[str, Any]) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def usage(self, completions: list[Completion]) -> dict[str, int]:
        completion_tokens = sum(c.completion_tokens for c in completions)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def whole(self, completions: list[Completion]) -> dict[str, Any]:
        if self.chat:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": None,
                    "finish_reason": c.finish_reason,
                }
                for i, c in enumerate(completions)
            ]
        else:
            choices = [
                {"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                for i, c in enumerate(completions)
            ]
        kind = "chat.completion" if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(completions),
        }
