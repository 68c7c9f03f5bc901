"""Shared fixtures: an isolated data directory, the tiny random model, and the real servers.

The service tests use real PostgreSQL, Redis, an S3 server and Celery worker processes.
PostgreSQL and Redis are the machine's own servers on loopback; each test session gets its own
database and Redis database number. Under CI=true a missing server fails the run; elsewhere the
tests that need it are skipped with the reason.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from cli.launcher import stop_process, worker_command
from service.settings import Settings

# Models and runs of a test session live in a throwaway directory, never in the user's cache.
os.environ["PREFIX_RFT_DATA_DIR"] = tempfile.mkdtemp(prefix="prefix-rft-tests-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*generation flags.*")

PG_ADMIN_URL = os.environ.get("PREFIX_RFT_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("PREFIX_RFT_TEST_REDIS", "redis://127.0.0.1:6379/11")
REPO = Path(__file__).resolve().parents[1]


def missing(message: str) -> None:
    """Something a test needs is missing: fail under CI, skip elsewhere."""
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def require(service: str, problem: str) -> None:
    """A required server is missing."""
    missing(f"{service} is not reachable ({problem}); .ci/run starts it")


@functools.cache
def user_namespace_refusal() -> str | None:
    """Why this process may not create a user namespace (the reward sandbox's first step), or None."""
    probe = "import ctypes, os; libc = ctypes.CDLL(None, use_errno=True); "
    probe += "os._exit(0 if libc.unshare(0x10000000) == 0 else ctypes.get_errno())"  # CLONE_NEWUSER
    code = subprocess.run([sys.executable, "-c", probe], timeout=30).returncode
    return None if code == 0 else os.strerror(code)


@pytest.fixture
def sandbox_privileges() -> None:
    """The reward sandbox starts with a user namespace: any user may, unless the kernel forbids it."""
    refusal = user_namespace_refusal()
    if refusal:
        missing(
            f"the reward sandbox needs user namespaces, which this kernel refuses to this user ({refusal})"
        )


MOTO_START_SECONDS = 30


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_moto(port: int, log_path: Path) -> subprocess.Popen:
    """A moto S3 server on the loopback port, answering once this returns."""
    endpoint = f"http://127.0.0.1:{port}"
    # A file, not a pipe: the server logs every request, and an unread pipe would fill and stall it.
    with log_path.open("ab") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + MOTO_START_SECONDS
    while True:
        if server.poll() is not None:
            pytest.fail(f"moto server exited with {server.returncode}:\n{log_path.read_text()}")
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            return server
        except urllib.error.HTTPError:
            return server  # any HTTP answer means it is serving
        except OSError:
            if time.monotonic() > deadline:
                stop_process(server, grace=5)
                pytest.fail(
                    f"moto server did not answer within {MOTO_START_SECONDS} s:\n{log_path.read_text()}"
                )
            time.sleep(0.1)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a moto S3 server running in a subprocess for the whole session."""
    port = free_port()
    server = start_moto(port, tmp_path_factory.mktemp("moto") / "server.log")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(server, grace=5)


@pytest.fixture(autouse=True)
def fake_aws_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fake credentials for moto, and nothing from the developer's own AWS setup."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@contextmanager
def temporary_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped afterwards."""
    # No pool: a connection per statement, so a PostgreSQL restart in a test does not break the drop.
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    name = f"prefix_rft_test_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        admin.dispose()
        require("PostgreSQL", str(exc).splitlines()[0])
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The test session's database."""
    with temporary_database() as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except Exception as exc:
        require("Redis", str(exc))
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    return f"test-{uuid.uuid4().hex[:16]}"


MakeSettings = Callable[..., Settings]


@pytest.fixture
def make_settings(tmp_path: Path) -> MakeSettings:
    """Settings for a test deployment; by default the embedded ones under a temporary data dir."""

    def make(**overrides) -> Settings:
        values = {"data_dir": tmp_path / "data", "heartbeat_seconds": 1, "lease_seconds": 30, **overrides}
        return Settings(**values)

    return make


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes another process (a worker) see the same deployment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFIX_RFT_")}
    for name in (
        "data_dir",
        "database_url",
        "broker_url",
        "storage_url",
        "s3_endpoint_url",
        "heartbeat_seconds",
        "lease_seconds",
        "max_attempts",
        "max_upload_bytes",
        "inference_dtype",
    ):
        value = getattr(settings, name)
        if value is not None:
            env[f"PREFIX_RFT_{name.upper()}"] = str(value)
    return env


class WorkerProcess:
    """A real `celery worker` in a child process, as production runs it."""

    def __init__(self, settings: Settings, log_path: Path):
        self.log_path = log_path
        # The command `prefix-rft serve` runs, minus the cluster chatter a lone test worker needs not.
        command = [*worker_command(), "--without-gossip", "--without-mingle", "--without-heartbeat"]
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command,
                cwd=REPO,
                env=settings_env(settings),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.process, grace=20)


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[[Settings], WorkerProcess]]:
    workers: list[WorkerProcess] = []

    def start(settings: Settings) -> WorkerProcess:
        worker = WorkerProcess(settings, tmp_path / f"worker-{len(workers)}.log")
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


@pytest.fixture(scope="session")
def migrated_postgres(postgres_url: str) -> str:
    from migrations import upgrade_to_head

    upgrade_to_head(postgres_url)
    return postgres_url


@pytest.fixture
def pg_settings(make_settings: MakeSettings, migrated_postgres: str, redis_url: str) -> Settings:
    """Production-shaped settings: PostgreSQL, Redis, and local storage under the test's data dir."""
    import redis

    redis.Redis.from_url(redis_url).delete("celery")  # a test's worker sees no message of another test
    return make_settings(database_url=migrated_postgres, broker_url=redis_url)


class ApiClient:
    """A TestClient of the real app, authenticated as a fresh project (tests never share data)."""

    def __init__(self, settings: Settings):
        from fastapi.testclient import TestClient

        from api.app import create_app
        from service.db import make_engine, make_sessionmaker, transaction
        from service.keys import create_key

        self.settings = settings
        self.app = create_app(settings)
        self.http = TestClient(self.app, raise_server_exceptions=False)
        self.sessions = make_sessionmaker(make_engine(settings.database_url))
        with transaction(self.sessions) as session:
            project, self.key = create_key(session, f"test-{uuid.uuid4().hex[:12]}")
            self.project_id = project.id
        self.http.headers["Authorization"] = f"Bearer {self.key}"

    def other_project(self) -> ApiClient:
        """A client of the same deployment with another project's key."""
        return ApiClient(self.settings)

    def upload(self, lines: list[str] | bytes, name: str = "data.jsonl"):
        """POST /v1/files: JSONL lines (or raw bytes) as a training file."""
        body = lines if isinstance(lines, bytes) else ("\n".join(lines) + "\n").encode()
        return self.http.post("/v1/files", files={"file": (name, body)}, data={"purpose": "fine-tune"})


# OpenAI's string_check grader that a completion passes by saying the line's `answer` exactly.
EXACT_ANSWER = {
    "type": "string_check",
    "name": "exact",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "eq",
}


def job_request(
    training_file: str,
    method: str = "reinforcement",
    grader: dict | None = None,
    hyperparameters: dict | None = None,
    adapter: dict | None = None,
    model: str = "tiny-random",
    **fields,
) -> dict:
    """A POST /v1/fine_tuning/jobs body: `method` is a type name (OpenAI's supervised and
    reinforcement, or ours: prefix_rft, psft, ...), laid out as OpenAI's `{"type": t, t: {...}}`; `fields` go at the top level
    (validation_file, suffix, seed, metadata)."""
    body: dict = {"hyperparameters": hyperparameters or {}}
    if grader is not None:
        body["grader"] = grader
    if adapter is not None:
        body["adapter"] = adapter
    return {
        "model": model,
        "training_file": training_file,
        "method": {"type": method, method: body},
        **fields,
    }


@pytest.fixture
def api(pg_settings: Settings) -> Iterator[ApiClient]:
    client = ApiClient(pg_settings)
    yield client
    client.http.close()


# ----- a judge model for model graders ------------------------------------------------------


class ScriptedJudge:
    """An OpenAI-style chat server on loopback that answers with `answers[last user message]`,
    and 500 for a message it has no answer for. It stands in for a judge model that answers in
    JSON, which no model on this machine does reliably."""

    def __init__(self) -> None:
        self.answers: dict[str, str] = {}
        self.requests: list[dict] = []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append(body)
                user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
                answer = judge.answers.get(user)
                if answer is None:
                    self.send_response(500)
                    self.end_headers()
                    self.wfile.write(b"judge broke")
                    return
                reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}]}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def scripted_judge() -> Iterator[ScriptedJudge]:
    judge = ScriptedJudge()
    yield judge
    judge.close()


class WebhookReceiver:
    """A webhook endpoint on a loopback port that records each request (headers, body) and
    answers 200; `stop()` takes it off the network (connections refused) and `start()` brings it
    back on the same port."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hooks"
        self.server: ThreadingHTTPServer | None = None
        self.start()

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def events(self) -> list[dict]:
        return [json.loads(body) for _, body in self.received]


@pytest.fixture
def webhook_receiver() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    yield receiver
    receiver.stop()


@contextmanager
def served(app: Any) -> Iterator[str]:
    """The app behind uvicorn on a free loopback port, for clients that need a real server
    (the official openai client speaks httpx2, which a TestClient cannot stand in for)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
