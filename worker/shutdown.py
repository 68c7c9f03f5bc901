"""Graceful shutdown: SIGTERM to the worker makes the running job checkpoint and go back to the queue.

Celery answers SIGTERM with a warm shutdown: it stops taking messages and waits for the running
task, which for a training job can take hours (and the container is killed long before). So the
main process passes the signal on to its pool processes, and while a job runs, its process only
raises a flag on SIGTERM; the job reads it between steps, saves a checkpoint, releases the job
for another worker and returns. A second SIGTERM stops the process at once (a cold shutdown).
This is for the prefork pool that `prefix-rft serve` and the worker image run.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import billiard.process
from celery.signals import worker_shutting_down

log = logging.getLogger(__name__)

requested = threading.Event()


@contextmanager
def stop_between_steps_on_sigterm() -> Iterator[None]:
    """While a job runs in this process, SIGTERM sets `requested` instead of ending the process.

    (Set here, per job: billiard resets a pool process's SIGTERM handler after its initialiser.)"""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame) -> None:
        if not requested.is_set():
            requested.set()
            return
        signal.signal(signum, previous)  # asked twice: do what the process did before
        signal.raise_signal(signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@worker_shutting_down.connect
def _pass_sigterm_to_pool_processes(sig: str, how: str, **_kwargs) -> None:
    if how != "Warm":
        return
    for child in billiard.process.active_children():
        log.info("passing %s on to pool process %s", sig, child.pid)
        os.kill(child.pid, signal.SIGTERM)
