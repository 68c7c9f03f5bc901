"""Continuous batching: one thread per base model drives its engine, requests join between steps.

Request handlers (on the event loop) `submit` rows and get each row's `Progress` through a
callback; the decode thread admits whatever arrived since the last step (one prefill for all of
them), decodes one token for every running row, and hands out the progress. A cancelled row
(its client went away) leaves the batch before the next step.

A step's progress for all rows goes to the event loop in one hop: on two cores, a wake-up of the
loop per row per step costs the decode thread more GIL hand-overs than the loop's work itself.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
from prometheus_client import Counter, Gauge, Histogram

from inference.adapter_cache import AdapterCache
from inference.engine import BatchedEngine, GenerationRequest, Progress

log = logging.getLogger(__name__)

# Served on the model server's GET /metrics.
ROWS = Counter("prefix_rft_inference_rows", "Rows (choices) ended, by how", ["model", "end"])
TOKENS = Counter("prefix_rft_inference_tokens", "Prompt and completion tokens", ["model", "kind"])
BATCH_ROWS = Gauge("prefix_rft_inference_batch_rows", "Rows being decoded", ["model"])
QUEUED_ROWS = Gauge("prefix_rft_inference_queued_rows", "Rows waiting for a place in the batch", ["model"])
STEP_SECONDS = Histogram(
    "prefix_rft_inference_step_seconds",
    "One decode iteration: the prefill of arriving rows, if any, and one token for every row",
    ["model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
FIRST_TOKEN_SECONDS = Histogram(
    "prefix_rft_inference_time_to_first_token_seconds",
    "From a row's submission to its first token (queue wait and prefill)",
    ["model"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

# Called with a row's key and its progress (or the error that ended it): on the worker's event
# loop when it has one, else on the decode thread. Must not block.
Sink = Callable[[int, Progress | BaseException], None]


class Overloaded(RuntimeError):
    """Too many rows wait already: the caller should retry later (429)."""


@dataclass(frozen=True)
class _Submission:
    key: int
    request: GenerationRequest
    sink: Sink
    submitted: float  # time.perf_counter()


class ModelWorker:
    """One base model in memory, its adapter cache, and the thread that owns them.

    The thread loads the model and decodes with it, and no other thread of the process runs
    parallel torch work (adapters are unpacked as views, see inference.engine): torch's OpenMP
    workers belong to the thread that starts parallel work, and once a second thread has its own,
    libgomp counts more threads than cores, stops spinning, and every decode step pays for
    waking its workers. On two cores the benchmark batch took 7.1 s that way instead of 5.1 s.
    """

    def __init__(
        self,
        name: str,
        load: Callable[[], tuple[BatchedEngine, AdapterCache]],
        max_batch: int,
        loop: asyncio.AbstractEventLoop | None = None,
        max_queue: int = 256,
    ) -> None:
        self.name = name
        self.loop = loop
        self.max_batch = max_batch
        self.max_queue = max_queue  # rows waiting for a place in the batch; more are refused
        self._keys = itertools.count()
        self._pending: deque[_Submission] = deque()
        self._cancelled: set[int] = set()
        self._sinks: dict[int, Sink] = {}  # rows in the batch
        self._wake = threading.Condition()
        self._stopping = False
        self.steps = 0
        self.busy_seconds = 0.0  # time spent in forward passes and sampling
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(load,), name=f"decode-{name}", daemon=True)
        self._thread.start()
        self._loaded.wait()
        if self._load_error is not None:
            raise self._load_error

    def submit(self, requests: list[GenerationRequest], sink: Sink) -> list[int]:
        """Queue a request's rows (all or none); their keys, in order."""
        for request in requests:
            self.engine.check(request)  # a request that cannot run is refused now, not on the decode thread
        with self._wake:
            if len(self._pending) + len(requests) > self.max_queue:
                raise Overloaded(f"{len(self._pending)} rows are waiting for {self.name}; retry shortly")
            keys = [next(self._keys) for _ in requests]
            now = time.perf_counter()
            self._pending.extend(_Submission(k, r, sink, now) for k, r in zip(keys, requests, strict=True))
            QUEUED_ROWS.labels(self.name).set(len(self._pending))
            self._wake.notify()
        return keys

    def cancel(self, key: int) -> None:
        with self._wake:
            self._cancelled.add(key)
            self._wake.notify()

    def stats(self) -> dict[str, int]:
        with self._wake:
            return {
                "running": len(self._sinks),
                "queued": len(self._pending),
                "steps": self.steps,
                "busy_seconds": round(self.busy_seconds, 3),
                "adapter_cache_bytes": self.adapters.size_bytes,
            }

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def _run(self, load: Callable[[], tuple[BatchedEngine, AdapterCache]]) -> None:
        try:
            self.engine, self.adapters = load()
        except BaseException as exc:
            self._load_error = exc
            return
        finally:
            self._loaded.set()
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not (self._stopping or self._pending or self._sinks or self._cancelled):
                    self._wake.wait()
                if self._stopping:
                    break
                cancelled, self._cancelled = self._cancelled, set()
                room = max(0, self.max_batch - len(self._sinks))
                arriving = []
                while self._pending and len(arriving) < room:
                    submission = self._pending.popleft()
                    if submission.key in cancelled:
                        continue
                    arriving.append(submission)
            QUEUED_ROWS.labels(self.name).set(len(self._pending))
            for key in cancelled:
                if self._sinks.pop(key, None) is not None:
                    self.engine.cancel(key)
                    ROWS.labels(self.name, "cancelled").inc()
            started = time.perf_counter()
            try:
                self._advance(arriving)
            except Exception as exc:  # the batch is lost; every row's client hears why
                log.exception("decoding failed on %s; the running requests are ended", self.name)
                for key in list(self._sinks):
                    self.engine.cancel(key)
                self._deliver([(sink, key, exc) for key, sink in self._sinks.items()])
                self._sinks.clear()
            elapsed = time.perf_counter() - started
            self.busy_seconds += elapsed
            STEP_SECONDS.labels(self.name).observe(elapsed)
            BATCH_ROWS.labels(self.name).set(self.engine.running)
            self._uninstall_evicted_lora()
        stopping = RuntimeError("the model server is shutting down")
        self._deliver([(sink, key, stopping) for key, sink in self._sinks.items()])

    def _advance(self, arriving: list[_Submission]) -> None:
        progress: list[Progress] = []
        if arriving:
            self._sinks.update((s.key, s.sink) for s in arriving)
            progress += self.engine.add([(s.key, s.request) for s in arriving])
            now = time.perf_counter()
            for s in arriving:
                FIRST_TOKEN_SECONDS.labels(self.name).observe(now - s.submitted)
                TOKENS.labels(self.name, "prompt").inc(len(s.request.prompt_ids))
        if self.engine.running:
            progress += self.engine.step()
            self.steps += 1
        deliveries = []
        for p in progress:
            sink = self._sinks.get(p.key)
            if sink is None:
                continue
            if p.completion is not None:
                del self._sinks[p.key]
                ROWS.labels(self.name, p.completion.finish_reason).inc()
                TOKENS.labels(self.name, "completion").inc(p.completion.completion_tokens)
            deliveries.append((sink, p.key, p))
        self._deliver(deliveries)

    def _deliver(self, deliveries: list[tuple[Sink, int, Progress | BaseException]]) -> None:
        if not deliveries:
            return
        if self.loop is None:
            _call_sinks(deliveries)
        else:
            self.loop.call_soon_threadsafe(_call_sinks, deliveries)

    def _uninstall_evicted_lora(self) -> None:
        """A LoRA adapter evicted from the cache leaves the model once no row uses it."""
        stale = self.engine.installed_lora - self.adapters.names() - self.engine.lora_in_use
        for name in stale:
            self.engine.remove_lora(name)


def _call_sinks(deliveries: list[tuple[Sink, int, Progress | BaseException]]) -> None:
    for sink, key, item in deliveries:
        sink(key, item)
