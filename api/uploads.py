"""Streaming multipart uploads with a size limit counted while the bytes arrive.

Starlette's form parsing puts no cap on file size, so the body is parsed here chunk by chunk
with python-multipart: the file part goes straight to a temporary file, hashed on the way, and
the upload stops with 413 as soon as it passes the limit. Memory stays flat for any size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from protocol.errors import APIError

FILE_FIELD = "file"
MAX_FIELD_CHARS = 1024  # text fields (name) are short
_MAX_FIELD_BYTES = 4 * MAX_FIELD_CHARS  # UTF-8 takes at most 4 bytes a character
_BODY_OVERHEAD = 64 * 1024  # boundaries, part headers and text fields around the file

# The request body for the OpenAPI schema (the route's `openapi_extra`): the route reads the stream
# itself, so FastAPI cannot infer it.
UPLOAD_OPENAPI: dict = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [FILE_FIELD],
                    "properties": {
                        FILE_FIELD: {
                            "type": "string",
                            "format": "binary",
                            "description": "JSONL, one example per line.",
                            "examples": ['{"prompt": "What is 2 + 2?", "answer": "4"}\n'],
                        },
                        "name": {
                            "type": "string",
                            "maxLength": MAX_FIELD_CHARS,
                            "description": "Display name; default: the file's name.",
                        },
                    },
                }
            }
        },
    }
}


@dataclass
class ReceivedUpload:
    filename: str | None = None
    bytes: int = 0
    sha256: str = ""
    fields: dict[str, str] = field(default_factory=dict)


class _PartCollector:
    """python-multipart callbacks: headers of each part, the file part's bytes to disk."""

    def __init__(self, target: Path, limit: int):
        self.handle = target.open("wb")
        self.digest = hashlib.sha256()
        self.limit = limit
        self.upload = ReceivedUpload()
        self.pending: list[bytes] = []  # file bytes parsed from the current chunk, written in a thread
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._part_name: str | None = None
        self._is_file = False
        self.seen_file = False
        self._text = bytearray()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._add("_header_field", d[s:e]),
            "on_header_value": lambda d, s, e: self._add("_header_value", d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _add(self, attr: str, data: bytes) -> None:
        setattr(self, attr, getattr(self, attr) + data)

    def _part_begin(self) -> None:
        self._headers, self._part_name, self._is_file, self._text = {}, None, False, bytearray()

    def _header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        self._part_name = name
        if name == FILE_FIELD:
            if self.seen_file:
                raise APIError(400, "invalid_upload", "send exactly one 'file' part", FILE_FIELD)
            self._is_file = self.seen_file = True
            filename = options.get(b"filename")
            self.upload.filename = filename.decode("utf-8", "replace") if filename else None

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._is_file:
            self.upload.bytes += len(chunk)
            if self.upload.bytes > self.limit:
                raise APIError(
                    413,
                    "file_too_large",
                    f"the file is larger than the limit of {self.limit:,} bytes",
                    FILE_FIELD,
                )
            self.digest.update(chunk)
            self.pending.append(chunk)
        else:
            self._text += chunk
            if len(self._text) > _MAX_FIELD_BYTES:
                raise self._field_too_long()

    def _part_end(self) -> None:
        if not self._is_file and self._part_name:
            text = self._text.decode("utf-8", "replace")
            if len(text) > MAX_FIELD_CHARS:  # the byte cap above only bounds memory
                raise self._field_too_long()
            self.upload.fields[self._part_name] = text

    def _field_too_long(self) -> APIError:
        message = f"form field {self._part_name!r} is too long (the limit is {MAX_FIELD_CHARS:,} characters)"
        return APIError(400, "invalid_upload", message, self._part_name)

    def flush(self) -> None:
        for chunk in self.pending:
            self.handle.write(chunk)
        self.pending.clear()


async def receive_file(request: Request, target: Path, limit: int) -> ReceivedUpload:
    """Write the `file` part of a multipart request to `target`; text parts land in `fields`."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise APIError(
            400,
            "invalid_upload",
            "send the dataset as multipart/form-data with a 'file' part (curl -F file=@data.jsonl)",
        )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + _BODY_OVERHEAD:
        raise APIError(
            413, "file_too_large", f"the upload is larger than the limit of {limit:,} bytes", FILE_FIELD
        )

    collector = _PartCollector(target, limit)
    parser = MultipartParser(boundary, collector.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            if collector.pending:
                await run_in_threadpool(collector.flush)  # disk writes stay off the event loop
        parser.finalize()
        collector.flush()
        if parser.state != MultipartState.END:  # the parser itself does not check for the closing boundary
            raise APIError(400, "invalid_upload", "the multipart body ended before its closing boundary")
    except ClientDisconnect as exc:
        raise APIError(
            400, "upload_interrupted", "the client disconnected before the upload finished"
        ) from exc
    except APIError:
        raise
    except Exception as exc:  # the multipart parser's own errors: a malformed body
        raise APIError(400, "invalid_upload", f"malformed multipart body: {exc}") from exc
    finally:
        collector.handle.close()
    if not collector.seen_file:
        raise APIError(400, "invalid_upload", "the form has no 'file' part", FILE_FIELD)
    collector.upload.sha256 = collector.digest.hexdigest()
    return collector.upload
