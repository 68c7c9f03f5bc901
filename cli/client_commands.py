"""Commands that call the REST API at $PREFIX_RFT_API_URL with $PREFIX_RFT_API_KEY.

prefix-rft datasets upload FILE | list
prefix-rft rewards create NAME FILE | list
prefix-rft jobs create ... | list | get ID | logs ID [-f] | cancel ID | download ID
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import yaml

from cli.client import Client, ClientError
from core.errors import InvalidInput

TERMINAL = ("succeeded", "failed", "cancelled")


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Commands that call the REST API at $PREFIX_RFT_API_URL with $PREFIX_RFT_API_KEY."""
    datasets = commands.add_parser("datasets", help="datasets on the service").add_subparsers(
        dest="datasets_command", required=True
    )
    upload = datasets.add_parser("upload", help="upload and validate a JSONL file")
    upload.add_argument("file", type=Path)
    upload.add_argument("--name")
    upload.set_defaults(handler=lambda a: _client_call(lambda c: _show(c.upload_dataset(a.file, a.name))))
    datasets.add_parser("list").set_defaults(
        handler=lambda a: _client_call(
            lambda c: _table(c.request("GET", "/v1/datasets")["data"], DATASET_COLUMNS)
        )
    )

    rewards = commands.add_parser("rewards", help="reward specs on the service").add_subparsers(
        dest="rewards_command", required=True
    )
    reward_create = rewards.add_parser(
        "create", help="store a reward spec from a YAML/JSON file with `graders`"
    )
    reward_create.add_argument("name")
    reward_create.add_argument("file", type=Path)
    reward_create.set_defaults(
        handler=lambda a: _client_call(
            lambda c: _show(c.request("POST", "/v1/rewards", json={"name": a.name, **_read_mapping(a.file)}))
        )
    )
    rewards.add_parser("list").set_defaults(
        handler=lambda a: _client_call(
            lambda c: _table(c.request("GET", "/v1/rewards")["data"], REWARD_COLUMNS)
        )
    )

    jobs = commands.add_parser("jobs", help="fine-tuning jobs on the service").add_subparsers(
        dest="jobs_command", required=True
    )
    create = jobs.add_parser("create", help="create a job")
    create.add_argument("--model", required=True)
    create.add_argument("--training-dataset", required=True)
    create.add_argument("--method", default="prefix_rft")
    create.add_argument("--adapter", choices=("prefix", "lora"), help="adapter type (default: prefix)")
    create.add_argument("--validation-dataset")
    create.add_argument("--reward-id")
    create.add_argument("--reward", type=Path, help="a YAML/JSON file with an inline reward spec (`graders`)")
    create.add_argument("--suffix")
    create.add_argument("--seed", type=int)
    create.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="a hyperparameter, e.g. steps=20"
    )
    create.set_defaults(
        handler=lambda a: _client_call(lambda c: _show(c.request("POST", "/v1/jobs", json=_job_body(a))))
    )

    list_jobs = jobs.add_parser("list")
    list_jobs.add_argument("--status")
    list_jobs.set_defaults(
        handler=lambda a: _client_call(
            lambda c: _table(
                c.request("GET", "/v1/jobs", params={"status": a.status} if a.status else None)["data"],
                JOB_COLUMNS,
            )
        )
    )
    get = jobs.add_parser("get")
    get.add_argument("job_id")
    get.set_defaults(
        handler=lambda a: _client_call(lambda c: _show(c.request("GET", f"/v1/jobs/{a.job_id}")))
    )
    cancel = jobs.add_parser("cancel")
    cancel.add_argument("job_id")
    cancel.set_defaults(
        handler=lambda a: _client_call(lambda c: _show(c.request("POST", f"/v1/jobs/{a.job_id}/cancel")))
    )
    logs = jobs.add_parser("logs", help="print the job's events")
    logs.add_argument("job_id")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing until the job finishes")
    logs.set_defaults(handler=lambda a: _client_call(lambda c: _logs(c, a.job_id, a.follow)))
    download = jobs.add_parser("download", help="download and unpack the trained adapter")
    download.add_argument("job_id")
    download.add_argument("-o", "--output", type=Path, default=None, help="directory (default: ./<job id>)")
    download.set_defaults(handler=lambda a: _client_call(lambda c: _download(c, a.job_id, a.output)))


DATASET_COLUMNS = ("id", "name", "examples", "with_demonstration", "bytes", "created_at")
REWARD_COLUMNS = ("id", "name", "fields_needed", "created_at")
JOB_COLUMNS = ("id", "status", "model", "method", "step", "total_steps", "fine_tuned_model")


def _client_call(action) -> int:
    try:
        action(Client())
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # connection refused, ...
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


def _read_mapping(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise InvalidInput(f"{path}: expected a mapping")
    return data


def _job_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": args.model,
        "method": args.method,
        "training_dataset": args.training_dataset,
    }
    optional = {
        "validation_dataset": args.validation_dataset,
        "reward_id": args.reward_id,
        "suffix": args.suffix,
        "seed": args.seed,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if args.adapter:
        body["adapter"] = {"type": args.adapter}
    if args.reward:
        body["reward"] = _read_mapping(args.reward)
    hyperparameters = {}
    for pair in args.set:
        key, sep, value = pair.partition("=")
        if not sep:
            raise InvalidInput(f"--set {pair!r}: expected FIELD=VALUE, e.g. steps=20")
        hyperparameters[key] = yaml.safe_load(value)
    if hyperparameters:
        body["hyperparameters"] = hyperparameters
    return body


def _logs(client: Client, job_id: str, follow: bool) -> None:
    after = _print_events(client, job_id, None)
    while follow:
        finished = client.request("GET", f"/v1/jobs/{job_id}")["status"] in TERMINAL
        after = _print_events(client, job_id, after)  # also the events written before it finished
        if finished:
            return
        time.sleep(2)


def _print_events(client: Client, job_id: str, after: int | None) -> int | None:
    """Print every event after `after`; return the last id printed."""
    while True:
        params = {"after": after} if after is not None else {}
        page = client.request("GET", f"/v1/jobs/{job_id}/events", params=params)
        for event in page["data"]:
            print(f"{event['created_at']}  {event['level']:5s}  {event['message']}", flush=True)
            after = event["id"]
        if not page["has_more"]:
            return after


def _download(client: Client, job_id: str, output: Path | None) -> None:
    output = output or Path(job_id)
    output.mkdir(parents=True, exist_ok=True)
    archive = output / "adapter.tar.gz"
    digest = client.download_adapter(job_id, archive)
    with tarfile.open(archive) as tar:
        tar.extractall(output, filter="data")
    archive.unlink()
    print(f"adapter in {output / 'adapter'} (sha256 of the archive {digest})")
