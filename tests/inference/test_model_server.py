"""The model server's parts in this process: the adapter cache (local storage) and the decode thread."""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from core.adapters import attach_adapter, export_adapter
from core.config import LoraAdapterConfig, PrefixAdapterConfig
from core.models import load_base_model
from inference.adapter_cache import AdapterCache, AdapterUnavailable, StorageOutage
from inference.engine import BatchedEngine, GenerationRequest, Progress, SamplingParams, adapter_bytes
from inference.scheduler import ModelWorker, Overloaded
from protocol.completions import AdapterRef
from service.storage import LocalStorage, S3Storage
from tests.conftest import free_port
from worker.runner import write_archive


class CountingStorage(LocalStorage):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.downloads = 0

    def download(self, key: str, target: Path) -> None:
        self.downloads += 1
        time.sleep(0.05)  # long enough for concurrent requests to overlap
        super().download(key, target)


def store(storage: LocalStorage, tmp: Path, name: str, kind: str = "prefix") -> AdapterRef:
    model, tokenizer = load_base_model("tiny-random")
    config = PrefixAdapterConfig(num_virtual_tokens=4) if kind == "prefix" else LoraAdapterConfig(r=2)
    directory = export_adapter(attach_adapter(model, tokenizer, config), tmp / name, "tiny-random")
    archive = tmp / f"{name}.tar.gz"
    write_archive(directory, archive, arcname="adapter")
    storage.put_file(f"adapters/{name}.tar.gz", archive)
    return AdapterRef(
        storage_key=f"adapters/{name}.tar.gz", sha256=hashlib.sha256(archive.read_bytes()).hexdigest()
    )


def test_adapters_load_once_are_verified_and_the_least_recently_used_goes(tmp_path: Path):
    storage = CountingStorage(tmp_path / "objects")
    model, _ = load_base_model("tiny-random")
    refs = {name: store(storage, tmp_path, name) for name in "abc"}
    one = 2 * 2 * 2 * 4 * 24 * 4  # layers x (key, value) x kv heads x 4 tokens x head dim x fp32 bytes
    cache = AdapterCache(storage, model, capacity_bytes=2 * one, scratch=tmp_path / "scratch")

    with ThreadPoolExecutor(8) as pool:  # eight requests for a new adapter: one download
        loaded = list(pool.map(lambda _: cache.get(refs["a"]), range(8)))
    assert storage.downloads == 1 and all(x is loaded[0] for x in loaded)
    assert adapter_bytes(loaded[0]) == one

    cache.get(refs["b"])
    cache.get(refs["a"])  # a is now the most recently used
    cache.get(refs["c"])  # over the bound: b goes
    assert cache.size_bytes == 2 * one
    assert storage.downloads == 3
    cache.get(refs["a"])
    assert storage.downloads == 3  # still cached
    cache.get(refs["b"])
    assert storage.downloads == 4  # evicted, so loaded again

    tampered = AdapterRef(storage_key=refs["a"].storage_key, sha256="0" * 64)
    with pytest.raises(AdapterUnavailable, match="expected 0000"):
        cache.get(tampered)
    with pytest.raises(AdapterUnavailable, match="could not be read") as missing:
        cache.get(AdapterRef(storage_key="adapters/missing.tar.gz", sha256="1" * 64))
    assert not isinstance(missing.value, StorageOutage)  # gone for good: no use retrying
    assert not list((tmp_path / "scratch").iterdir())  # nothing left behind


def test_an_object_store_that_cannot_be_reached_is_an_outage_to_retry(tmp_path: Path):
    """The model server answers 503 with Retry-After for a StorageOutage (inference/server.py)."""
    nothing_there = S3Storage("adapters", endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=1)
    model, _ = load_base_model("tiny-random")
    cache = AdapterCache(nothing_there, model, capacity_bytes=1 << 20, scratch=tmp_path / "scratch")
    with pytest.raises(StorageOutage, match="could not be read"):
        cache.get(AdapterRef(storage_key="adapters/a.tar.gz", sha256="1" * 64))
    assert cache.size_bytes == 0 and not list((tmp_path / "scratch").iterdir())


def test_an_evicted_lora_adapter_leaves_the_model_once_no_row_uses_it(tmp_path: Path):
    storage = LocalStorage(tmp_path / "objects")
    model, tokenizer = load_base_model("tiny-random")
    first, second = store(storage, tmp_path, "l1", "lora"), store(storage, tmp_path, "l2", "lora")
    cache = AdapterCache(storage, model, capacity_bytes=1, scratch=tmp_path / "scratch")  # one at a time
    worker = ModelWorker("tiny-random", lambda: (BatchedEngine(model, tokenizer), cache), max_batch=8)
    try:

        def run(adapter) -> None:
            done = threading.Event()
            last: list[Progress | BaseException] = []

            def sink(_key: int, item: Progress | BaseException) -> None:
                if isinstance(item, BaseException) or item.completion is not None:
                    last.append(item)
                    done.set()

            worker.submit([GenerationRequest([5, 6, 7], adapter, SamplingParams(max_tokens=3))], sink)
            assert done.wait(30)
            assert isinstance(last[0], Progress), last

        lora = cache.get(first)
        run(lora)
        assert worker.engine.installed_lora == {lora.name}
        cache.get(second)  # evicts the first from the cache ...
        run(None)  # ... and the next decode loop takes it out of the model
        deadline = time.monotonic() + 5
        while worker.engine.installed_lora and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker.engine.installed_lora == set()
        assert worker.stats()["running"] == 0
        run(lora)  # a request still holding the evicted adapter installs it again and is served
    finally:
        worker.stop()
    assert torch.is_grad_enabled()  # the decode thread's setting stays on its thread


def test_a_full_queue_refuses_a_whole_request_and_the_worker_goes_on(tmp_path: Path):
    model, tokenizer = load_base_model("tiny-random")
    cache = AdapterCache(LocalStorage(tmp_path), model, capacity_bytes=1 << 20, scratch=tmp_path / "scratch")
    gate = threading.Event()
    engine = BatchedEngine(model, tokenizer)
    real_add = engine.add

    def slow_add(requests):  # the decode thread holds on, so that rows pile up in the queue
        gate.wait(10)
        return real_add(requests)

    engine.add = slow_add
    worker = ModelWorker("tiny-random", lambda: (engine, cache), max_batch=1, max_queue=3)
    finished = []

    def sink(key: int, item) -> None:
        if isinstance(item, BaseException) or item.completion is not None:
            finished.append(key)

    row = GenerationRequest([5, 6], None, SamplingParams(max_tokens=2, temperature=0))
    try:
        first = worker.submit([row], sink)  # taken by the decode thread, which waits at the gate
        deadline = time.monotonic() + 5
        while worker.stats()["queued"] and time.monotonic() < deadline:
            time.sleep(0.01)
        queued = worker.submit([row, row, row], sink)  # fills the queue
        with pytest.raises(Overloaded, match="3 rows are waiting"):
            worker.submit([row], sink)
        assert worker.stats()["queued"] == 3  # the refused request left nothing behind
        gate.set()
        deadline = time.monotonic() + 10
        while len(finished) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(finished) == sorted(first + queued)
        assert worker.submit([row], sink)  # room again
    finally:
        gate.set()
        worker.stop()
