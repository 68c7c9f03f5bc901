"""Trained adapters in the model server's memory: loaded from object storage on first use, kept in
an LRU cache bounded in bytes.

An adapter is known by its archive's sha256, so it is verified once and never confused with
another; the engine names a LoRA adapter by that digest too.
"""

from __future__ import annotations

import hashlib
import logging
import tarfile
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

from transformers import PreTrainedModel

from inference.engine import Adapter, adapter_bytes, load_adapter
from protocol.completions import AdapterRef
from service.storage import ObjectNotFound, Storage, StorageError

log = logging.getLogger(__name__)


class AdapterUnavailable(RuntimeError):
    """The adapter's archive is missing, corrupt, or not a servable adapter."""


class StorageOutage(AdapterUnavailable):
    """The object store could not be read just now; the same request may work shortly."""


class AdapterCache:
    def __init__(self, storage: Storage, model: PreTrainedModel, capacity_bytes: int, scratch: Path) -> None:
        self.storage = storage
        self.model = model
        self.capacity_bytes = capacity_bytes
        self.scratch = scratch
        self._entries: OrderedDict[str, Adapter] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}  # one download per adapter, however many ask

    @property
    def size_bytes(self) -> int:
        with self._lock:
            return sum(adapter_bytes(a) for a in self._entries.values())

    def names(self) -> set[str]:
        with self._lock:
            return {a.name for a in self._entries.values()}

    def get(self, ref: AdapterRef) -> Adapter:
        """The adapter, from memory or loaded now (blocking: call it off the event loop)."""
        with self._lock:
            if ref.sha256 in self._entries:
                self._entries.move_to_end(ref.sha256)
                return self._entries[ref.sha256]
            loading = self._loading.setdefault(ref.sha256, threading.Lock())
        with loading:
            with self._lock:
                if ref.sha256 in self._entries:  # another request loaded it meanwhile
                    return self._entries[ref.sha256]
            adapter = self._load(ref)
            with self._lock:
                self._entries[ref.sha256] = adapter
                self._evict(keep=ref.sha256)
                self._loading.pop(ref.sha256, None)
            return adapter

    def _evict(self, keep: str) -> None:
        total = sum(adapter_bytes(a) for a in self._entries.values())
        for digest in list(self._entries):
            if total <= self.capacity_bytes:
                break
            if digest != keep:
                total -= adapter_bytes(self._entries.pop(digest))
                log.info("adapter %s evicted from the cache", digest[:12])

    def _load(self, ref: AdapterRef) -> Adapter:
        self.scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.scratch) as tmp:
            archive = Path(tmp) / "adapter.tar.gz"
            try:
                self.storage.download(ref.storage_key, archive)
            except StorageError as exc:
                if isinstance(exc, ObjectNotFound):
                    raise AdapterUnavailable(f"the adapter's archive could not be read: {exc}") from exc
                raise StorageOutage(f"the adapter's archive could not be read: {exc}") from exc
            digest = hashlib.sha256(archive.read_bytes()).hexdigest()
            if digest != ref.sha256:
                raise AdapterUnavailable(f"the adapter's archive has sha256 {digest}, expected {ref.sha256}")
            try:
                with tarfile.open(archive) as tar:
                    tar.extractall(tmp, filter="data")
                adapter = load_adapter(
                    Path(tmp) / ref.directory, self.model, name=f"adapter-{ref.sha256[:24]}"
                )
            except (tarfile.TarError, OSError, ValueError) as exc:
                raise AdapterUnavailable(f"the adapter could not be loaded: {exc}") from exc
        log.info("adapter %s loaded (%d bytes)", ref.sha256[:12], adapter_bytes(adapter))
        return adapter
