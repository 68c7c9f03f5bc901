"""The object storage: the same behaviour from a local directory and from S3.

The S3 backend talks over real HTTP to moto's S3 server, started on loopback for the session, so
the client's requests, pagination and multipart uploads are exercised as they are in production.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest

from service import storage as storage_module
from service.storage import (
    LocalStorage,
    ObjectNotFound,
    S3Storage,
    Storage,
    StorageError,
    StorageUnavailable,
    open_storage,
    validate_key,
)
from tests.conftest import free_port


def new_bucket_name() -> str:
    return f"test-{uuid.uuid4().hex[:16]}"


@pytest.fixture(params=["local", "s3"])
def make_storage(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Storage]:
    """Makes a storage at a new, not yet prepared location: a directory or a bucket."""
    if request.param == "local":
        counter = iter(range(1000))
        return lambda: LocalStorage(tmp_path / f"objects-{next(counter)}")
    endpoint = request.getfixturevalue("s3_endpoint")
    # A key prefix checks that it is applied and stripped; a page size of 2 makes listings paginate.
    return lambda: S3Storage(new_bucket_name(), "tenant/a", endpoint_url=endpoint, page_size=2)


@pytest.fixture
def storage(make_storage: Callable[[], Storage]) -> Storage:
    store = make_storage()
    store.prepare()
    return store


def write_random_file(path: Path, size: int) -> str:
    """Write size random bytes to path; returns their sha256."""
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for offset in range(0, size, 1 << 20):
            block = os.urandom(min(1 << 20, size - offset))
            digest.update(block)
            out.write(block)
    return digest.hexdigest()


def sha256_of_chunks(chunks: Iterator[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def test_put_file_then_download_and_iter_chunks_give_the_same_bytes(storage: Storage, tmp_path: Path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"0123456789" * 10)
    storage.put_file("jobs/job_1/data.bin", source)

    target = tmp_path / "downloads" / "nested" / "data.bin"  # parents do not exist yet
    storage.download("jobs/job_1/data.bin", target)
    assert target.read_bytes() == source.read_bytes()

    chunks = list(storage.iter_chunks("jobs/job_1/data.bin", chunk_size=32))
    assert b"".join(chunks) == source.read_bytes()
    assert all(len(chunk) <= 32 for chunk in chunks) and len(chunks) >= 4
    assert storage.size("jobs/job_1/data.bin") == 100
    assert storage.exists("jobs/job_1/data.bin")


def test_put_bytes_stores_and_overwrites(storage: Storage):
    storage.put_bytes("datasets/ds_1.jsonl", b"first version")
    storage.put_bytes("datasets/ds_1.jsonl", b"second")
    assert b"".join(storage.iter_chunks("datasets/ds_1.jsonl")) == b"second"
    assert storage.size("datasets/ds_1.jsonl") == 6
    storage.put_bytes("empty", b"")
    assert storage.size("empty") == 0 and b"".join(storage.iter_chunks("empty")) == b""


def test_missing_objects_raise_object_not_found_naming_the_key(storage: Storage, tmp_path: Path):
    missing = "jobs/job_9/adapter.tar.gz"
    assert not storage.exists(missing)
    with pytest.raises(ObjectNotFound, match=re.escape(missing)):
        storage.size(missing)
    with pytest.raises(ObjectNotFound, match=re.escape(missing)):
        storage.download(missing, tmp_path / "out" / "adapter.tar.gz")
    assert not (tmp_path / "out" / "adapter.tar.gz").exists()
    # Raised by the call itself, before anything is iterated, so an API can answer 404 up front.
    with pytest.raises(ObjectNotFound, match=re.escape(missing)):
        storage.iter_chunks(missing)


def test_a_directory_of_objects_is_not_an_object(storage: Storage):
    storage.put_bytes("jobs/job_1/log.txt", b"x")
    assert not storage.exists("jobs/job_1")
    with pytest.raises(ObjectNotFound):
        storage.iter_chunks("jobs/job_1")


def test_delete_is_idempotent(storage: Storage):
    storage.put_bytes("jobs/job_1/log.txt", b"x")
    storage.delete("jobs/job_1/log.txt")
    assert not storage.exists("jobs/job_1/log.txt")
    storage.delete("jobs/job_1/log.txt")
    storage.delete("never/stored")


def test_delete_prefix_removes_only_that_prefix(storage: Storage):
    doomed = [f"jobs/job_1/checkpoints/step_{step}.tar" for step in range(5)] + ["jobs/job_1/adapter.tar.gz"]
    kept = ["jobs/job_10/adapter.tar.gz", "jobs/job_2/adapter.tar.gz", "datasets/job_1"]
    for key in doomed + kept:
        storage.put_bytes(key, key.encode())

    storage.delete_prefix("jobs/job_1/")

    assert storage.list_keys("") == sorted(kept)
    if isinstance(storage, LocalStorage):
        assert not (storage.root / "jobs" / "job_1").exists()  # emptied directories go too
        assert (storage.root / "jobs").is_dir()
    storage.delete_prefix("jobs/job_1/")  # nothing left there: still fine
    storage.delete_prefix("jobs/")
    assert storage.list_keys("") == ["datasets/job_1"]
    if isinstance(storage, LocalStorage):
        assert not (storage.root / "jobs").exists()
        assert storage.root.is_dir()


def test_delete_prefix_refuses_the_empty_prefix(storage: Storage):
    storage.put_bytes("datasets/ds_1.jsonl", b"x")
    with pytest.raises(ValueError, match="non-empty prefix"):
        storage.delete_prefix("")
    assert storage.exists("datasets/ds_1.jsonl")


def test_list_keys_is_sorted_and_matches_the_prefix_as_a_string(storage: Storage):
    keys = ["jobs/job_2/a", "jobs/job_1/b", "jobs/job_10/c", "datasets/d", "jobs/job_1/sub/e", "top"]
    for key in keys:
        storage.put_bytes(key, b"x")
    assert storage.list_keys("") == sorted(keys)
    assert storage.list_keys("jobs/job_1/") == ["jobs/job_1/b", "jobs/job_1/sub/e"]
    assert storage.list_keys("jobs/job_1") == ["jobs/job_1/b", "jobs/job_1/sub/e", "jobs/job_10/c"]
    assert storage.list_keys("to") == ["top"]
    assert storage.list_keys("nothing/") == []


def test_a_20_mb_file_round_trips_with_the_same_sha256(storage: Storage, tmp_path: Path):
    source = tmp_path / "adapter.tar.gz"
    expected = write_random_file(source, 20_000_000)
    storage.put_file("jobs/job_1/adapter.tar.gz", source)
    assert storage.size("jobs/job_1/adapter.tar.gz") == 20_000_000
    assert sha256_of_chunks(storage.iter_chunks("jobs/job_1/adapter.tar.gz")) == expected
    target = tmp_path / "copy" / "adapter.tar.gz"
    storage.download("jobs/job_1/adapter.tar.gz", target)
    assert sha256_of_chunks(iter([target.read_bytes()])) == expected


def test_a_reader_may_stop_early(storage: Storage):
    storage.put_bytes("big", b"x" * 1000)
    chunks = storage.iter_chunks("big", chunk_size=100)
    assert next(chunks) == b"x" * 100
    chunks.close()
    assert storage.size("big") == 1000


@pytest.mark.parametrize("key", ["../x", "/abs", "a//b", "a/./b", "a\\b", "", "a/", "a b", "a/../b", "é"])
def test_validate_key_rejects_unsafe_keys(key: str):
    with pytest.raises(ValueError):
        validate_key(key)


@pytest.mark.parametrize("key", ["jobs/job_1/adapter.tar.gz", "a", "x=1/.hidden", "A-b_c.d"])
def test_validate_key_accepts_plain_relative_keys(key: str):
    assert validate_key(key) == key


def test_every_method_validates_its_key(storage: Storage, tmp_path: Path):
    source = tmp_path / "source"
    source.write_bytes(b"x")
    calls: list[Callable[[], object]] = [
        lambda: storage.put_file("../escape", source),
        lambda: storage.put_bytes("../escape", b"x"),
        lambda: storage.download("../escape", tmp_path / "out"),
        lambda: storage.iter_chunks("../escape"),
        lambda: storage.size("/etc/passwd"),
        lambda: storage.exists("a//b"),
        lambda: storage.delete("a/./b"),
        lambda: storage.delete_prefix("../"),
        lambda: storage.list_keys("/"),
    ]
    for call in calls:
        with pytest.raises(ValueError):
            call()
    assert not (tmp_path / "escape").exists()


def test_prepare_creates_a_missing_location_and_check_then_passes(make_storage: Callable[[], Storage]):
    store = make_storage()
    with pytest.raises(StorageUnavailable, match="does not exist"):
        store.check()
    store.prepare()
    store.check()
    store.prepare()  # idempotent
    store.put_bytes("k", b"v")
    assert store.exists("k")


def test_check_names_the_missing_bucket(s3_endpoint: str):
    store = S3Storage("no-such-bucket", endpoint_url=s3_endpoint)
    with pytest.raises(StorageUnavailable, match="'no-such-bucket' does not exist"):
        store.check()


def test_check_fails_fast_when_nothing_listens_at_the_endpoint():
    endpoint = f"http://127.0.0.1:{free_port()}"  # a free port: no server there
    store = S3Storage("bucket", endpoint_url=endpoint, check_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match="unreachable") as raised:
        store.check()
    assert time.monotonic() - started < 5
    assert endpoint in str(raised.value)


def test_check_reports_a_root_that_is_not_a_directory(tmp_path: Path):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_bytes(b"")
    with pytest.raises(StorageUnavailable, match="does not exist"):
        LocalStorage(not_a_directory).check()


def test_a_failed_local_write_leaves_the_old_object_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    store = LocalStorage(tmp_path / "objects")
    store.put_bytes("jobs/job_1/adapter.tar.gz", b"complete old adapter")
    source = tmp_path / "new-adapter"
    source.write_bytes(b"complete new adapter")

    def copy_half_then_fail(reader, writer, length=0):
        writer.write(reader.read(5))
        raise OSError("disk full")

    monkeypatch.setattr(storage_module.shutil, "copyfileobj", copy_half_then_fail)
    with pytest.raises(StorageError, match="disk full"):  # as S3's failures are
        store.put_file("jobs/job_1/adapter.tar.gz", source)

    assert b"".join(store.iter_chunks("jobs/job_1/adapter.tar.gz")) == b"complete old adapter"
    assert os.listdir(tmp_path / "objects" / "jobs" / "job_1") == ["adapter.tar.gz"]


def test_s3_keys_live_under_the_storage_prefix(s3_endpoint: str):
    bucket = new_bucket_name()
    whole_bucket = S3Storage(bucket, endpoint_url=s3_endpoint)
    whole_bucket.prepare()
    tenant = S3Storage(bucket, "/tenant/a/", endpoint_url=s3_endpoint)
    tenant.put_bytes("jobs/job_1/log.txt", b"x")
    whole_bucket.put_bytes("jobs/job_1/log.txt", b"other")

    assert whole_bucket.list_keys("") == ["jobs/job_1/log.txt", "tenant/a/jobs/job_1/log.txt"]
    assert tenant.list_keys("") == ["jobs/job_1/log.txt"]
    tenant.delete_prefix("jobs/")
    assert whole_bucket.list_keys("") == ["jobs/job_1/log.txt"]


def test_s3_uploads_a_large_file_in_parts(s3_endpoint: str, tmp_path: Path):
    store = S3Storage(new_bucket_name(), endpoint_url=s3_endpoint, multipart_threshold=5 << 20)
    store.prepare()
    source = tmp_path / "adapter.tar.gz"
    expected = write_random_file(source, 11 << 20)
    store.put_file("adapter.tar.gz", source)

    # A multipart object's ETag ends in "-<number of parts>".
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    etag = client.head_object(Bucket=store.bucket, Key="adapter.tar.gz")["ETag"].strip('"')
    assert etag.endswith("-3")
    assert sha256_of_chunks(store.iter_chunks("adapter.tar.gz")) == expected


def test_open_storage_understands_file_urls_and_plain_paths(tmp_path: Path):
    directory = tmp_path / "with space"
    from_url = open_storage(directory.as_uri())  # as_uri() percent-encodes the space
    assert isinstance(from_url, LocalStorage) and from_url.root == directory
    from_path = open_storage(str(directory))
    assert isinstance(from_path, LocalStorage) and from_path.root == directory


def test_open_storage_understands_s3_urls():
    store = open_storage("s3://models", s3_endpoint_url="http://127.0.0.1:9000", s3_region="eu-west-1")
    assert isinstance(store, S3Storage)
    assert (store.bucket, store.prefix, store.endpoint_url) == ("models", "", "http://127.0.0.1:9000")
    prefixed = open_storage("s3://models/some/prefix")
    assert isinstance(prefixed, S3Storage) and (prefixed.bucket, prefixed.prefix) == (
        "models",
        "some/prefix/",
    )


@pytest.mark.parametrize("url", ["", "http://example.com/x", "s3://", "file://otherhost/dir", "gs://bucket"])
def test_open_storage_rejects_other_urls(url: str):
    with pytest.raises(ValueError, match="s3://bucket"):
        open_storage(url)
