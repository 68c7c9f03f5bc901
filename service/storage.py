"""Object storage for datasets, checkpoints and adapters: a local directory or an S3 bucket.

Both backends speak the same small interface, addressed by keys such as
`jobs/job_1/adapter.tar.gz`. One machine uses a directory; production uses S3 or any
S3-compatible server (MinIO, ...). Objects are written whole: a reader sees the old object or
the new one, never a partial one.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import secrets
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 1 << 20
_KEY_SEGMENT = re.compile(r"[A-Za-z0-9._=-]+")
# Temporary files carry a character that keys may not contain, so listings can never mistake one
# for an object.
_TEMP_MARK = "~"
# S3 answers a missing object with one of these, depending on the call (HEAD has no error body).
_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}
_DELETE_BATCH = 1000  # the most keys one DeleteObjects request accepts


class StorageError(Exception):
    """A storage operation failed."""


class ObjectNotFound(StorageError):
    def __init__(self, key: str) -> None:
        super().__init__(f"no object stored under key {key!r}")
        self.key = key


class StorageUnavailable(StorageError):
    """The storage cannot be reached or used (readiness failures)."""


def validate_key(key: str) -> str:
    """Return the key if it is a relative '/'-separated path of plain segments, else raise ValueError.

    Keys become file paths on the local backend, so anything that could climb out of the root
    ('..', absolute paths, backslashes) is refused, and both backends accept the same keys.
    """
    if not isinstance(key, str) or not key:
        raise ValueError("a storage key must be a non-empty string")
    if key.startswith("/"):
        raise ValueError(f"storage key {key!r} must be relative (no leading '/')")
    for segment in key.split("/"):
        if not segment:
            raise ValueError(f"storage key {key!r} has an empty segment")
        if segment in {".", ".."}:
            raise ValueError(f"storage key {key!r} has a '.' or '..' segment")
        if not _KEY_SEGMENT.fullmatch(segment):
            raise ValueError(f"storage key {key!r} may only contain A-Z a-z 0-9 . _ = - and '/' separators")
    return key


def validate_prefix(prefix: str) -> str:
    """Like validate_key, but '' (everything) and a trailing '/' are allowed."""
    if prefix == "":
        return prefix
    validate_key(prefix.removesuffix("/"))
    return prefix


class Storage(ABC):
    """Where the service keeps its objects."""

    @abstractmethod
    def put_file(self, key: str, source: Path) -> None:
        """Store a local file under key, streaming it."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Store data under key."""

    @abstractmethod
    def download(self, key: str, target: Path) -> None:
        """Write the object to a local file, creating its parent directories. Raises ObjectNotFound."""

    @abstractmethod
    def iter_chunks(self, key: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
        """The object's bytes in chunks. Raises ObjectNotFound when called, before the first chunk.

        Consume the iterator or close it: it holds an open file or connection until then.
        """

    @abstractmethod
    def size(self, key: str) -> int:
        """The object's size in bytes. Raises ObjectNotFound."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; a missing object is not an error."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Remove every object whose key starts with prefix (e.g. 'jobs/job_1/')."""

    @abstractmethod
    def list_keys(self, prefix: str) -> list[str]:
        """The keys starting with prefix, sorted."""

    @abstractmethod
    def prepare(self) -> None:
        """Create the directory or bucket if missing. Idempotent; run by the one-off init step."""

    @abstractmethod
    def check(self) -> None:
        """Readiness probe: raise StorageUnavailable if the storage cannot be reached or used. Fast."""


def _require_deletable_prefix(prefix: str) -> str:
    # An empty prefix would wipe the whole store; nothing in the service needs that.
    if not validate_prefix(prefix):
        raise ValueError("delete_prefix needs a non-empty prefix")
    return prefix


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")


class LocalStorage(Storage):
    """Objects as files under a root directory."""

    def __init__(self, root: Path | str) -> None:
        # Absolute, so a later change of working directory cannot move the store.
        self.root = Path(root).expanduser().absolute()

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def _open_object(self, key: str) -> BinaryIO:
        try:
            return self._path(key).open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None
        except OSError as exc:  # unreadable, an I/O error: as S3's failures are, a StorageError
            raise StorageError(f"reading {key!r} under {self.root} failed: {exc}") from exc

    def _write_object(self, key: str, write: Callable[[BinaryIO], object]) -> None:
        try:
            _write_atomically(self._path(key), write)
        except OSError as exc:  # a full disk, a read-only mount
            raise StorageError(f"storing {key!r} under {self.root} failed: {exc}") from exc

    def put_file(self, key: str, source: Path) -> None:
        with Path(source).open("rb") as reader:
            self._write_object(key, lambda writer: shutil.copyfileobj(reader, writer, DEFAULT_CHUNK_SIZE))
        logger.debug("stored %s from %s", key, source)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write_object(key, lambda writer: writer.write(data))
        logger.debug("stored %s (%d bytes)", key, len(data))

    def download(self, key: str, target: Path) -> None:
        with self._open_object(key) as reader:
            _write_atomically(
                Path(target), lambda writer: shutil.copyfileobj(reader, writer, DEFAULT_CHUNK_SIZE)
            )

    def iter_chunks(self, key: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
        _check_chunk_size(chunk_size)
        # Opened here rather than in the generator, so a missing object fails at the call.
        return _read_chunks(self._open_object(key), chunk_size)

    def size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(key)
        return path.stat().st_size

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            path.unlink()
            logger.debug("deleted %s", key)

    def delete_prefix(self, prefix: str) -> None:
        _require_deletable_prefix(prefix)
        keys = self.list_keys(prefix)
        for key in keys:
            (self.root / key).unlink(missing_ok=True)
        self._remove_empty_directories(prefix)
        logger.debug("deleted %d objects under %s", len(keys), prefix)

    def list_keys(self, prefix: str) -> list[str]:
        validate_prefix(prefix)
        # Only the directory holding the prefix's last segment needs walking.
        start = self.root / prefix.rpartition("/")[0]
        keys = []
        for directory, _, names in os.walk(start):
            for name in names:
                if _TEMP_MARK in name:
                    continue
                key = (Path(directory) / name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def _remove_empty_directories(self, prefix: str) -> None:
        start = self.root / prefix.rpartition("/")[0]
        for directory, _, _ in os.walk(start, topdown=False):
            path = Path(directory)
            if path != self.root and (path.relative_to(self.root).as_posix() + "/").startswith(prefix):
                with contextlib.suppress(OSError):  # not empty: still holds other objects
                    path.rmdir()
        # Then the directories above the prefix, as far up as they became empty.
        for path in [start, *start.parents]:
            if path == self.root or not path.is_relative_to(self.root):
                break
            try:
                path.rmdir()
            except FileNotFoundError:
                continue
            except OSError:
                break

    def prepare(self) -> None:
        if not self.root.is_dir():
            self.root.mkdir(parents=True, exist_ok=True)
            logger.info("created storage directory %s", self.root)

    def check(self) -> None:
        if not self.root.is_dir():
            raise StorageUnavailable(f"storage directory {self.root} does not exist")
        try:
            # Writing a scratch file proves more than os.access (which root always passes).
            with tempfile.TemporaryFile(dir=self.root, prefix=_TEMP_MARK):
                pass
        except OSError as exc:
            raise StorageUnavailable(f"storage directory {self.root} is not writable: {exc}") from exc


def _read_chunks(reader: BinaryIO, chunk_size: int) -> Iterator[bytes]:
    with reader:
        while chunk := reader.read(chunk_size):
            yield chunk


def _write_atomically(target: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through a temporary file in the target's directory, then rename it into place.

    The rename is atomic within a directory, so readers see the old file or the new one whole.
    """
    temp = target.with_name(f"{_TEMP_MARK}{target.name}.{secrets.token_hex(6)}.part")
    for attempt in range(3):
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            # 0o666 before the umask, like any newly created file (mkstemp would force 0o600).
            descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileNotFoundError:
            # A concurrent delete_prefix removed the directory just made; make it again.
            if attempt == 2:
                raise
    try:
        with os.fdopen(descriptor, "wb") as writer:
            write(writer)
            writer.flush()
            os.fsync(writer.fileno())  # the data is on disk before the name points at it
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


class S3Storage(Storage):
    """Objects in an S3 bucket, optionally under a key prefix shared by all keys.

    Credentials come from boto3's usual chain (AWS_ACCESS_KEY_ID and friends, profiles, instance
    roles). Uploads and downloads above `multipart_threshold` go in parallel parts.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_attempts: int = 5,
        check_timeout: float = 2.0,
        multipart_threshold: int = 8 << 20,
        page_size: int = 1000,
    ) -> None:
        if not bucket:
            raise ValueError("an S3 bucket name is needed")
        self.bucket = bucket
        prefix = prefix.strip("/")
        self.prefix = f"{validate_key(prefix)}/" if prefix else ""
        self.endpoint_url = endpoint_url
        self.page_size = page_size
        # Parts below 5 MiB are refused by S3 (all but the last part).
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold, multipart_chunksize=max(multipart_threshold, 5 << 20)
        )
        self._region = region
        self._check_timeout = check_timeout
        self._client = self._make_client(endpoint_url, region, connect_timeout, read_timeout, max_attempts)

    @functools.cached_property
    def _probe(self) -> Any:
        # Its own client: short timeouts and no retries, so an outage fails readiness fast.
        return self._make_client(self.endpoint_url, self._region, self._check_timeout, self._check_timeout, 1)

    @staticmethod
    def _make_client(
        endpoint_url: str | None,
        region: str | None,
        connect_timeout: float,
        read_timeout: float,
        attempts: int,
    ) -> Any:
        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"mode": "standard", "total_max_attempts": attempts},
            # S3-compatible servers on a plain host name or IP address cannot do virtual-hosted buckets.
            s3={"addressing_style": "path"} if endpoint_url else None,
        )
        # A session of its own: boto3's default session is not safe to share between threads.
        session = boto3.session.Session()
        return session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)

    def __repr__(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"S3Storage('s3://{self.bucket}/{self.prefix}'{where})"

    def _full_key(self, key: str) -> str:
        return self.prefix + validate_key(key)

    @contextlib.contextmanager
    def _translate_errors(self, action: str, key: str) -> Iterator[None]:
        """Turn boto3's exceptions into the storage ones, so callers catch one family."""
        try:
            yield
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND_CODES:
                raise ObjectNotFound(key) from exc
            raise StorageError(f"S3 {action} of {key!r} in bucket {self.bucket!r} failed: {exc}") from exc
        except (BotoCoreError, Boto3Error) as exc:
            raise StorageError(f"S3 {action} of {key!r} in bucket {self.bucket!r} failed: {exc}") from exc

    def put_file(self, key: str, source: Path) -> None:
        full_key = self._full_key(key)
        with self._translate_errors("upload", key):
            self._client.upload_file(str(source), self.bucket, full_key, Config=self._transfer)
        logger.debug("stored %s from %s", key, source)

    def put_bytes(self, key: str, data: bytes) -> None:
        full_key = self._full_key(key)
        with self._translate_errors("upload", key):
            self._client.put_object(Bucket=self.bucket, Key=full_key, Body=data)
        logger.debug("stored %s (%d bytes)", key, len(data))

    def download(self, key: str, target: Path) -> None:
        full_key = self._full_key(key)
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        # boto3 writes to a temporary name and renames it on success, so no partial file is left.
        with self._translate_errors("download", key):
            self._client.download_file(self.bucket, full_key, str(target), Config=self._transfer)

    def iter_chunks(self, key: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
        _check_chunk_size(chunk_size)
        full_key = self._full_key(key)
        # The GET happens here rather than in the generator, so a missing object fails at the call.
        with self._translate_errors("read", key):
            body = self._client.get_object(Bucket=self.bucket, Key=full_key)["Body"]
        return self._stream(body, key, chunk_size)

    def _stream(self, body: Any, key: str, chunk_size: int) -> Iterator[bytes]:
        try:
            with self._translate_errors("read", key):
                yield from body.iter_chunks(chunk_size)
        finally:
            body.close()  # hands the connection back even when the reader stops early

    def size(self, key: str) -> int:
        full_key = self._full_key(key)
        with self._translate_errors("size lookup", key):
            return self._client.head_object(Bucket=self.bucket, Key=full_key)["ContentLength"]

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except ObjectNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        full_key = self._full_key(key)
        with self._translate_errors("delete", key):
            self._client.delete_object(Bucket=self.bucket, Key=full_key)  # S3 deletes are idempotent
        logger.debug("deleted %s", key)

    def delete_prefix(self, prefix: str) -> None:
        _require_deletable_prefix(prefix)
        deleted = 0
        # Each page is deleted before the next is fetched; the continuation token survives that.
        for page in self._pages(prefix):
            for start in range(0, len(page), _DELETE_BATCH):
                batch = page[start : start + _DELETE_BATCH]
                with self._translate_errors("delete", prefix):
                    response = self._client.delete_objects(
                        Bucket=self.bucket,
                        Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True},
                    )
                if errors := response.get("Errors"):
                    raise StorageError(
                        f"S3 could not delete {len(errors)} objects under {prefix!r}: {errors[0]}"
                    )
                deleted += len(batch)
        logger.debug("deleted %d objects under %s", deleted, prefix)

    def list_keys(self, prefix: str) -> list[str]:
        validate_prefix(prefix)
        skip = len(self.prefix)
        return sorted(full_key[skip:] for page in self._pages(prefix) for full_key in page)

    def _pages(self, prefix: str) -> Iterator[list[str]]:
        """The full keys under prefix, one list_objects_v2 page at a time."""
        paginator = self._client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self.bucket, Prefix=self.prefix + prefix, PaginationConfig={"PageSize": self.page_size}
        )
        with self._translate_errors("listing", prefix):
            for page in pages:
                yield [item["Key"] for item in page.get("Contents", [])]

    def prepare(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _error_code(exc) not in _NOT_FOUND_CODES:
                raise self._unavailable(exc) from exc
        except BotoCoreError as exc:
            raise self._unavailable(exc) from exc
        region = self._client.meta.region_name
        options: dict[str, Any] = {}
        # us-east-1 is the default location and refuses to be named as a constraint.
        if region and region not in {"us-east-1", "aws-global"}:
            options["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._client.create_bucket(Bucket=self.bucket, **options)
        except ClientError as exc:
            # Another init step may have won the race; that bucket is as good as ours.
            if _error_code(exc) != "BucketAlreadyOwnedByYou":
                raise StorageError(f"could not create S3 bucket {self.bucket!r}: {exc}") from exc
        logger.info("created S3 bucket %s", self.bucket)

    def check(self) -> None:
        try:
            self._probe.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            raise self._unavailable(exc) from exc

    def _unavailable(self, exc: Exception) -> StorageUnavailable:
        where = self.endpoint_url or "the default AWS endpoint"
        if isinstance(exc, ClientError):
            code = _error_code(exc)
            if code in _NOT_FOUND_CODES or code == "NoSuchBucket":
                return StorageUnavailable(f"S3 bucket {self.bucket!r} does not exist at {where}")
            if code in {"403", "AccessDenied"}:
                return StorageUnavailable(f"access to S3 bucket {self.bucket!r} at {where} is denied")
            return StorageUnavailable(f"S3 bucket {self.bucket!r} at {where} is not usable: {exc}")
        return StorageUnavailable(f"S3 endpoint {where} is unreachable: {exc}")


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def open_storage(url: str, *, s3_endpoint_url: str | None = None, s3_region: str | None = None) -> Storage:
    """The storage a URL names: 'file:///abs/dir' or a plain path (local), 's3://bucket[/prefix]' (S3)."""
    accepted = "file:///absolute/dir, a plain directory path, or s3://bucket[/prefix]"
    if not url:
        raise ValueError(f"empty storage URL; use {accepted}")
    if "://" not in url:
        return LocalStorage(Path(url))
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in {"", "localhost"} or not parts.path:
            raise ValueError(f"storage URL {url!r} names no local directory; use {accepted}")
        # Path.as_uri() percent-encodes characters such as spaces; undo that.
        return LocalStorage(Path(unquote(parts.path)))
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"storage URL {url!r} names no bucket; use s3://bucket[/prefix]")
        return S3Storage(parts.netloc, parts.path, endpoint_url=s3_endpoint_url, region=s3_region)
    raise ValueError(f"unsupported storage URL {url!r}; use {accepted}")
