"""`prefix-rft files|jobs ...` against the real API behind uvicorn, on PostgreSQL with Redis as the
broker and no worker: jobs stay queued. The CLI runs in-process through its main entry, with the
URL and key in the environment as a user sets them."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cli.main import main
from service.db import transaction
from service.tables import JobEvent, JobMetric
from tests.conftest import ApiClient, free_port, served

RFT_LINES = [
    json.dumps({"messages": [{"role": "user", "content": f"{i}+1?"}], "answer": str(i + 1)})
    for i in range(12)
]
SFT_LINES = [
    json.dumps(
        {"messages": [{"role": "user", "content": f"{i}+1?"}, {"role": "assistant", "content": str(i + 1)}]}
    )
    for i in range(12)
]
GRADER_YAML = """\
type: string_check
name: exact
input: "{{sample.output_text}}"
reference: "{{item.answer}}"
operation: eq
"""

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(api: ApiClient, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> Iterator[Run]:
    """`prefix-rft ARGS...` -> (exit status, stdout, stderr)."""
    with served(api.app) as base_url:
        monkeypatch.setenv("PREFIX_RFT_API_URL", base_url)
        monkeypatch.setenv("PREFIX_RFT_API_KEY", api.key)

        def run(*argv: str) -> tuple[int, str, str]:
            capsys.readouterr()
            status = main([str(a) for a in argv])
            out, err = capsys.readouterr()
            return status, out, err

        yield run


@pytest.fixture
def grader_file(tmp_path: Path) -> Path:
    path = tmp_path / "grader.yaml"
    path.write_text(GRADER_YAML)
    return path


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def upload(cli: Run, path: Path) -> str:
    status, out, err = cli("files", "upload", path)
    assert status == 0, err
    return json.loads(out)["id"]


def create_rft_job(cli: Run, training_file: str, grader_file: Path, *extra: str) -> dict:
    status, out, err = cli(
        "jobs", "create", "--model", "tiny-random", "--training-file", training_file,
        "--method", "rft", "--grader", grader_file, "--set", "steps=3", *extra,
    )  # fmt: skip
    assert status == 0, err
    return json.loads(out)


def test_files_upload_list_delete(cli, tmp_path):
    status, out, err = cli("files", "upload", write_jsonl(tmp_path / "train.jsonl", RFT_LINES))
    assert status == 0, err
    uploaded = json.loads(out)
    assert uploaded["id"].startswith("file-") and uploaded["purpose"] == "fine-tune"
    assert uploaded["filename"] == "train.jsonl" and uploaded["validation"]["examples"] == 12

    status, out, _ = cli("files", "list")
    header, *rows = out.splitlines()
    assert status == 0 and header.split() == [
        "id",
        "filename",
        "examples",
        "with_demonstration",
        "bytes",
        "created_at",
    ]
    assert [r.split()[:3] for r in rows] == [[uploaded["id"], "train.jsonl", "12"]]

    status, out, _ = cli("files", "delete", uploaded["id"])
    assert status == 0 and json.loads(out)["deleted"] is True
    assert cli("files", "list")[1].splitlines()[1:] == []


def test_a_bad_file_is_reported_with_its_line(cli, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(RFT_LINES[0] + "\n{not json\n")
    status, out, err = cli("files", "upload", path)
    assert status == 1 and out == ""
    assert err.startswith("error: 400 invalid_dataset:") and "(param: file)" in err
    assert "\n  - line 2" in err


def test_a_missing_local_file_is_the_user_s_error(cli, tmp_path):
    status, _, err = cli("files", "upload", tmp_path / "nowhere.jsonl")
    assert status == 2 and "nowhere.jsonl" in err and "cannot reach" not in err


def test_create_get_list_cancel(cli, tmp_path, grader_file):
    training = upload(cli, write_jsonl(tmp_path / "train.jsonl", RFT_LINES))
    job = create_rft_job(cli, training, grader_file, "--seed", "5", "--suffix", "adder")
    assert job["id"].startswith("ftjob-") and job["status"] == "queued"
    assert (job["training_file"], job["seed"], job["user_provided_suffix"]) == (training, 5, "adder")
    # rft is OpenAI's reinforcement; the grader file is sent as the one grader object it holds
    method = job["method"]
    assert method["type"] == "reinforcement" and method["reinforcement"]["grader"]["name"] == "exact"
    assert method["reinforcement"]["hyperparameters"]["steps"] == 3 and job["total_steps"] == 3

    status, out, _ = cli("jobs", "get", job["id"])
    assert status == 0 and json.loads(out)["id"] == job["id"]

    status, out, _ = cli("jobs", "list")
    header, *rows = out.splitlines()
    assert status == 0 and header.split() == [
        "id",
        "status",
        "model",
        "method",
        "step",
        "total_steps",
        "fine_tuned_model",
    ]
    assert [r.split()[:4] for r in rows] == [[job["id"], "queued", "tiny-random", "reinforcement"]]

    status, out, _ = cli("jobs", "cancel", job["id"])
    assert status == 0 and json.loads(out)["status"] == "cancelled"
    assert json.loads(cli("jobs", "get", job["id"])[1])["status"] == "cancelled"


def test_sft_is_supervised_and_takes_an_adapter(cli, tmp_path):
    training = upload(cli, write_jsonl(tmp_path / "train.jsonl", SFT_LINES))
    status, out, err = cli(
        "jobs", "create", "--model", "tiny-random", "--training-file", training,
        "--method", "sft", "--adapter", "lora", "--set", "n_epochs=2", "--set", "batch_size=4",
    )  # fmt: skip
    assert status == 0, err
    method = json.loads(out)["method"]
    assert method["type"] == "supervised" and method["supervised"]["adapter"]["type"] == "lora"
    assert method["supervised"]["hyperparameters"]["n_epochs"] == 2


def test_pause_and_resume(cli, tmp_path, grader_file):
    training = upload(cli, write_jsonl(tmp_path / "train.jsonl", RFT_LINES))
    job = create_rft_job(cli, training, grader_file)
    status, out, _ = cli("jobs", "pause", job["id"])
    assert status == 0 and json.loads(out)["status"] == "paused"
    status, out, _ = cli("jobs", "resume", job["id"])
    assert status == 0 and json.loads(out)["status"] == "queued"


def test_the_api_s_error_names_the_field(cli, tmp_path):
    training = upload(cli, write_jsonl(tmp_path / "train.jsonl", RFT_LINES))
    grader = tmp_path / "grader.json"
    grader.write_text(json.dumps({"type": "string_check", "name": "x", "input": "a", "reference": "b"}))
    status, _, err = cli(
        "jobs", "create", "--model", "tiny-random", "--training-file", training, "--grader", grader
    )  # fmt: skip
    assert status == 1 and err.startswith("error: 400 invalid_grader:")
    assert "(param: method.prefix_rft.grader.operation)" in err


def test_a_bad_set_is_refused_before_any_request(cli, grader_file):
    status, _, err = cli(
        "jobs", "create", "--model", "tiny-random", "--training-file", "file-x",
        "--grader", grader_file, "--set", "steps",
    )  # fmt: skip
    assert status == 2 and "expected FIELD=VALUE" in err


def test_logs_print_each_event_once_oldest_first(cli, api, tmp_path, grader_file):
    training = upload(cli, write_jsonl(tmp_path / "train.jsonl", RFT_LINES))
    job = create_rft_job(cli, training, grader_file)
    # more than one page of events (the API pages newest first, 100 at a time here)
    with transaction(api.sessions) as session:
        session.add_all(JobEvent(job_id=job["id"], level="info", message=f"event {i}") for i in range(150))
    status, out, _ = cli("jobs", "logs", job["id"])
    messages = [line.split(maxsplit=2)[2] for line in out.splitlines()]
    assert status == 0
    assert messages == ["job created: rft on tiny-random", *(f"event {i}" for i in range(150))]

    # a finished job: --follow prints what there is, each event once, and returns
    cli("jobs", "cancel", job["id"])
    status, out, _ = cli("jobs", "logs", job["id"], "--follow")
    followed = [line.split(maxsplit=2)[2] for line in out.splitlines()]
    assert status == 0 and followed[:151] == messages and len(followed) == len(set(followed))


def test_logs_follow_a_job_until_it_ends(cli, api, tmp_path, grader_file):
    """--follow reads the event stream: each event once, as it comes, until the job ends."""
    training = upload(cli, write_jsonl(tmp_path / "train.jsonl", RFT_LINES))
    job = create_rft_job(cli, training, grader_file)

    def job_goes_on() -> None:
        for batch in range(3):
            time.sleep(0.5)
            with transaction(api.sessions) as session:
                session.add_all(
                    JobEvent(job_id=job["id"], level="info", message=f"batch {batch} event {i}")
                    for i in range(3)
                )
        api.http.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").raise_for_status()

    writer = threading.Thread(target=job_goes_on)
    writer.start()
    status, out, _ = cli("jobs", "logs", job["id"], "--follow")
    writer.join()
    followed = [line.split(maxsplit=2)[2] for line in out.splitlines()]
    events = api.http.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 100}).json()["data"]
    assert status == 0 and followed == [e["message"] for e in reversed(events)]
    assert followed[1:10] == [f"batch {b} event {i}" for b in range(3) for i in range(3)]


def test_metrics_oldest_first(cli, api, tmp_path, grader_file):
    training = upload(cli, write_jsonl(tmp_path / "train.jsonl", RFT_LINES))
    job = create_rft_job(cli, training, grader_file)
    with transaction(api.sessions) as session:
        session.add(JobMetric(job_id=job["id"], kind="eval", step=0, values={"reward_mean": 0.25}))
        session.add_all(
            JobMetric(job_id=job["id"], kind="train", step=s, values={"loss": 1.0 / s}) for s in (1, 2)
        )
    status, out, _ = cli("jobs", "metrics", job["id"])
    assert status == 0
    assert [line.split() for line in out.splitlines()] == [
        ["0", "eval", "reward_mean=0.25"],
        ["1", "train", "loss=1"],
        ["2", "train", "loss=0.5"],
    ]
    assert len(cli("jobs", "metrics", job["id"], "--kind", "eval")[1].splitlines()) == 1


def test_download_of_a_job_without_adapter_says_so(cli, tmp_path, grader_file):
    training = upload(cli, write_jsonl(tmp_path / "train.jsonl", RFT_LINES))
    job = create_rft_job(cli, training, grader_file)
    output = tmp_path / "adapter-out"
    status, out, err = cli("jobs", "download", job["id"], "-o", output)
    assert status == 1 and out == ""
    assert err.startswith("error: 404 adapter_not_ready:") and "queued" in err
    assert not output.exists()  # nothing half-made left behind


def test_an_unreachable_service_is_reported(cli, monkeypatch):
    monkeypatch.setenv("PREFIX_RFT_API_URL", f"http://127.0.0.1:{free_port()}")
    status, _, err = cli("files", "list")
    assert status == 1 and err.startswith("error: cannot reach the service:")
