"""Continuous batching: one thread per base model drives its engine, requests join between steps.

Request handlers (on the event loop) `submit` rows and get each row's `Progress` through a
callback; the decode thread admits whatever arrived since the last step (one prefill for all of
them), decodes one token for every running row, and hands out the progress. A cancelled row
(its client went away) leaves the batch before the next step.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from core.serving import BatchedEngine, GenerationRequest, Progress
from inference.adapters import AdapterCache

log = logging.getLogger(__name__)

Sink = Callable[[Progress | BaseException], None]  # called on the decode thread; must not block


@dataclass(frozen=True)
class _Submission:
    key: int
    request: GenerationRequest
    sink: Sink


class ModelWorker:
    """One base model in memory, its adapter cache, and the thread that decodes its batch."""

    def __init__(self, name: str, engine: BatchedEngine, adapters: AdapterCache, max_batch: int) -> None:
        self.name = name
        self.engine = engine
        self.adapters = adapters
        self.max_batch = max_batch
        self._keys = itertools.count()
        self._pending: deque[_Submission] = deque()
        self._cancelled: set[int] = set()
        self._sinks: dict[int, Sink] = {}  # rows in the batch
        self._wake = threading.Condition()
        self._stopping = False
        self.steps = 0
        self._thread = threading.Thread(target=self._run, name=f"decode-{name}", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest, sink: Sink) -> int:
        self.engine.check(request)  # a request that cannot run is refused now, not on the decode thread
        with self._wake:
            key = next(self._keys)
            self._pending.append(_Submission(key, request, sink))
            self._wake.notify()
        return key

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
                "adapter_cache_bytes": self.adapters.size_bytes,
            }

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def _run(self) -> None:
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
            for key in cancelled:
                if self._sinks.pop(key, None) is not None:
                    self.engine.cancel(key)
            try:
                self._advance(arriving)
            except Exception as exc:  # the batch is lost; every row's client hears why
                log.exception("decoding failed on %s; the running requests are ended", self.name)
                for key, sink in list(self._sinks.items()):
                    self.engine.cancel(key)
                    sink(exc)
                self._sinks.clear()
            self._uninstall_evicted_lora()
        for sink in self._sinks.values():
            sink(RuntimeError("the model server is shutting down"))

    def _advance(self, arriving: list[_Submission]) -> None:
        progress: list[Progress] = []
        if arriving:
            self._sinks.update((s.key, s.sink) for s in arriving)
            progress += self.engine.add([(s.key, s.request) for s in arriving])
        if self.engine.running:
            progress += self.engine.step()
            self.steps += 1
        for p in progress:
            sink = self._sinks.get(p.key)
            if sink is None:
                continue
            if p.completion is not None:
                del self._sinks[p.key]
            sink(p)

    def _uninstall_evicted_lora(self) -> None:
        """A LoRA adapter evicted from the cache leaves the model once no row uses it."""
        stale = self.engine.installed_lora - self.adapters.names() - self.engine.lora_in_use
        for name in stale:
            self.engine.remove_lora(name)
