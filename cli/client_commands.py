"""Commands that call the REST API at $PREFIX_RFT_API_URL with $PREFIX_RFT_API_KEY.

prefix-rft files upload FILE | list | delete ID
prefix-rft jobs create ... | list | get ID | cancel|pause|resume ID | logs ID [-f] | metrics ID
prefix-rft jobs download ID [-o DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path
from typing import Any

import httpx
import yaml

from cli.client import Client, ClientError
from core.errors import InvalidInput

# Our method names that OpenAI's API spells its own way; the others are sent as they are.
METHOD_TYPES = {"sft": "supervised", "rft": "reinforcement"}
FILE_COLUMNS = ("id", "filename", "examples", "with_demonstration", "bytes", "created_at")
JOB_COLUMNS = ("id", "status", "model", "method", "step", "total_steps", "fine_tuned_model")
EVENTS_PER_PAGE = 100
METRICS_PER_PAGE = 10_000


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Commands that call the REST API at $PREFIX_RFT_API_URL with $PREFIX_RFT_API_KEY."""
    _add_file_commands(commands)
    _add_job_commands(commands)


def _add_file_commands(commands: argparse._SubParsersAction) -> None:
    files = commands.add_parser("files", help="training files on the service").add_subparsers(
        dest="files_command", required=True
    )
    upload = files.add_parser("upload", help="upload and validate a JSONL file")
    upload.add_argument("file", type=Path)
    upload.set_defaults(handler=lambda a: _client_call(lambda c: _show(c.upload_file(a.file))))
    files.add_parser("list").set_defaults(
        handler=lambda a: _client_call(lambda c: _table(_file_rows(c), FILE_COLUMNS))
    )
    delete = files.add_parser("delete", help="delete a file (refused while an active job uses it)")
    delete.add_argument("file_id")
    delete.set_defaults(
        handler=lambda a: _client_call(lambda c: _show(c.request("DELETE", f"/v1/files/{a.file_id}")))
    )


def _add_job_commands(commands: argparse._SubParsersAction) -> None:
    jobs = commands.add_parser("jobs", help="fine-tuning jobs on the service").add_subparsers(
        dest="jobs_command", required=True
    )
    create = jobs.add_parser("create", help="create a job")
    create.add_argument("--model", required=True)
    create.add_argument("--training-file", required=True, help="a file id from `files upload`")
    create.add_argument("--validation-file", help="held-out file id (default: a split of training)")
    create.add_argument(
        "--method",
        default="prefix_rft",
        help="prefix_rft (default), rft, sft, sft_then_rft, psft, psft_then_rft, "
        "or OpenAI's supervised, reinforcement",
    )
    create.add_argument("--grader", type=Path, help="a YAML/JSON file with one grader object")
    create.add_argument("--adapter", choices=("prefix", "lora"), help="adapter type (default: prefix)")
    create.add_argument("--suffix")
    create.add_argument("--seed", type=int)
    create.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="a hyperparameter, e.g. steps=20"
    )
    create.set_defaults(handler=_create_job)

    list_jobs = jobs.add_parser("list", help="the newest jobs first")
    list_jobs.add_argument("--limit", type=int, default=20)
    list_jobs.set_defaults(
        handler=lambda a: _client_call(lambda c: _table(_job_rows(c, a.limit), JOB_COLUMNS))
    )
    get = jobs.add_parser("get")
    get.add_argument("job_id")
    get.set_defaults(handler=lambda a: _client_call(lambda c: _show(c.request("GET", _job_path(a.job_id)))))
    for action, text in (
        ("cancel", "queued: cancelled at once; running: stops at its next step"),
        ("pause", "checkpoint and stop; `resume` continues from there"),
        ("resume", "queue a paused job again"),
    ):
        state_change = jobs.add_parser(action, help=text)
        state_change.add_argument("job_id")
        state_change.set_defaults(
            handler=lambda a, action=action: _client_call(
                lambda c: _show(c.request("POST", f"{_job_path(a.job_id)}/{action}"))
            )
        )
    logs = jobs.add_parser("logs", help="print the job's events, oldest first")
    logs.add_argument("job_id")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing until the job finishes")
    logs.set_defaults(handler=lambda a: _client_call(lambda c: _logs(c, a.job_id, a.follow)))
    metrics = jobs.add_parser("metrics", help="print every step's metrics")
    metrics.add_argument("job_id")
    metrics.add_argument("--kind", choices=("train", "eval"))
    metrics.set_defaults(handler=lambda a: _client_call(lambda c: _metrics(c, a.job_id, a.kind)))
    download = jobs.add_parser("download", help="download and unpack the trained adapter")
    download.add_argument("job_id")
    download.add_argument("-o", "--output", type=Path, default=None, help="directory (default: ./<job id>)")
    download.set_defaults(handler=lambda a: _client_call(lambda c: _download(c, a.job_id, a.output)))


def _client_call(action) -> int:
    try:
        action(Client())
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except httpx.TransportError as exc:  # connection refused, timed out, ...
        print(f"error: cannot reach the service: {exc}", file=sys.stderr)
        return 1
    return 0


def _show(body: Any) -> None:
    print(json.dumps(body, indent=2))


def _table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    for line in [list(columns), *cells]:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())


def _job_path(job_id: str) -> str:
    return f"/v1/fine_tuning/jobs/{job_id}"


def _file_rows(client: Client) -> list[dict[str, Any]]:
    files = client.request("GET", "/v1/files", params={"purpose": "fine-tune"})["data"]
    return [{**f, **(f.get("validation") or {})} for f in files]


def _job_rows(client: Client, limit: int) -> list[dict[str, Any]]:
    jobs = client.request("GET", "/v1/fine_tuning/jobs", params={"limit": limit})["data"]
    return [{**j, "method": (j.get("method") or {}).get("type", "")} for j in jobs]


def _read_mapping(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise InvalidInput(f"{path}: expected a mapping")
    return data


def _create_job(args: argparse.Namespace) -> int:
    body = _job_body(args)  # before any request: a bad --set or grader file is the user's to fix
    return _client_call(lambda c: _show(c.request("POST", "/v1/fine_tuning/jobs", json=body)))


def _job_body(args: argparse.Namespace) -> dict[str, Any]:
    """OpenAI's job body: the method as `{"type": T, T: {grader, hyperparameters, adapter}}`."""
    kind = METHOD_TYPES.get(args.method, args.method)
    hyperparameters = {}
    for pair in args.set:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidInput(f"--set {pair!r}: expected FIELD=VALUE, e.g. steps=20")
        hyperparameters[key] = yaml.safe_load(value)
    settings: dict[str, Any] = {"hyperparameters": hyperparameters}
    if args.grader:
        settings["grader"] = _read_mapping(args.grader)
    if args.adapter:
        settings["adapter"] = {"type": args.adapter}
    body: dict[str, Any] = {
        "model": args.model,
        "training_file": args.training_file,
        "method": {"type": kind, kind: settings},
    }
    optional = {"validation_file": args.validation_file, "suffix": args.suffix, "seed": args.seed}
    body.update({k: v for k, v in optional.items() if v is not None})
    return body


def _logs(client: Client, job_id: str, follow: bool) -> None:
    if not follow:
        _print_events(client, job_id)
        return
    for _, _, event in client.stream_events(job_id):  # every event once, until the job ends
        _print_event(event)


def _print_event(event: dict[str, Any]) -> None:
    print(f"{event['created_at']}  {event['level']:5s}  {event['message']}", flush=True)


def _print_events(client: Client, job_id: str) -> None:
    """Every event so far, oldest first (the API pages newest first)."""
    events: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": EVENTS_PER_PAGE}
    while True:
        page = client.request("GET", f"{_job_path(job_id)}/events", params=params)
        events.extend(page["data"])
        if not page["has_more"] or not page["data"]:
            break
        params["after"] = page["data"][-1]["id"]
    for event in reversed(events):
        _print_event(event)


def _metrics(client: Client, job_id: str, kind: str | None) -> None:
    """One line a row, oldest first: step, kind (train or eval) and its values."""
    seen: set[tuple[int, str]] = set()
    params: dict[str, Any] = {"limit": METRICS_PER_PAGE}
    if kind:
        params["kind"] = kind
    while True:
        page = client.request("GET", f"{_job_path(job_id)}/metrics", params=params)
        for row in page["data"]:
            if (row["step"], row["kind"]) in seen:
                continue
            seen.add((row["step"], row["kind"]))
            values = " ".join(f"{k}={_number(v)}" for k, v in row["values"].items())
            print(f"{row['step']:>6}  {row['kind']:5s}  {values}", flush=True)
        if not page["has_more"] or not page["data"]:
            return
        # A page may end between a step's train and eval rows: read that step again.
        params["after_step"] = page["data"][-1]["step"] - 1


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _download(client: Client, job_id: str, output: Path | None) -> None:
    output = output or Path(job_id)
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    archive = output / "adapter.tar.gz"
    try:
        digest = client.download_adapter(job_id, archive)
    except ClientError:
        archive.unlink(missing_ok=True)
        if created:
            output.rmdir()  # no empty directory left behind by a job without an adapter
        raise
    with tarfile.open(archive) as tar:
        tar.extractall(output, filter="data")
    archive.unlink()
    print(f"adapter in {output / 'adapter'} (sha256 of the archive {digest})")
