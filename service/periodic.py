"""A task that runs every few seconds in a daemon thread of an API process (the reaper, the webhook
sender). A round that fails is logged and the next one runs: the database or broker may be away."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Periodic:
    def __init__(self, name: str, seconds: float, round_: Callable[[], object], stop_timeout: float = 30):
        self.name, self.seconds, self.round, self.stop_timeout = name, seconds, round_, stop_timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.stop_timeout)

    def _loop(self) -> None:
        while not self._stop.wait(self.seconds):
            try:
                self.round()
            except Exception as exc:
                log.warning("%s: round failed (%s: %s); retrying", self.name, type(exc).__name__, exc)
