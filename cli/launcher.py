"""The one-machine launcher: `prefix-rft serve` runs the whole service on the embedded defaults.

SQLite, a local object directory and a broker kept in files, all under the data directory;
the API runs in this process, a Celery worker and the model server in child processes, as in
production.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from urllib.parse import urlsplit

from sqlalchemy import func, select

from core.allocator import preload_environment
from migrations import upgrade_to_head
from service.db import make_engine, make_sessionmaker, transaction
from service.keys import create_key
from service.settings import Settings, get_settings
from service.storage import open_storage
from service.tables import ApiKey

log = logging.getLogger(__name__)


def initialise(settings: Settings) -> None:
    """Migrate the database to head and create the storage directory or bucket."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    upgrade_to_head(settings.database_url)
    open_storage(
        settings.storage_url, s3_endpoint_url=settings.s3_endpoint_url, s3_region=settings.s3_region
    ).prepare()


def first_start_key(settings: Settings) -> str | None:
    """On a database without keys, create the `default` project's key; it is printed once."""
    engine = make_engine(settings.database_url)
    try:
        with transaction(make_sessionmaker(engine)) as session:
            if session.scalar(select(func.count()).select_from(ApiKey)):
                return None
            _, key = create_key(session, "default")
            return key
    finally:
        engine.dispose()


def worker_command() -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "--concurrency",
        "1",
        "--loglevel",
        "INFO",
    ]


def model_server_command(settings: Settings) -> list[str]:
    """The model server on the host and port of PREFIX_RFT_INFERENCE_URL."""
    url = urlsplit(settings.inference_url)
    return [
        sys.executable,
        "-m",
        "cli.main",
        "model-server",
        "--host",
        url.hostname or "127.0.0.1",
        "--port",
        str(url.port or 80),
    ]


def serve(host: str, port: int, with_worker: bool = True, with_model_server: bool = True) -> int:
    import uvicorn

    from api.app import create_app

    settings = get_settings()
    initialise(settings)
    key = first_start_key(settings)
    if key:
        print(
            f"\nCreated the project 'default' and its API key (shown once, store it now):\n\n  {key}\n\n"
            f"  export PREFIX_RFT_API_KEY={key}\n",
            flush=True,
        )
    # Children in their own process groups, so a Ctrl-C in this terminal reaches them only through us.
    children = []
    # The processes that run torch get tcmalloc where it is installed (core/allocator.py).
    env = preload_environment(dict(os.environ))
    if env.get("LD_PRELOAD"):
        log.info("worker and model server with LD_PRELOAD=%s", env["LD_PRELOAD"])
    if with_worker:
        children.append(subprocess.Popen(worker_command(), env=env, start_new_session=True))
        log.info("worker started (pid %d)", children[-1].pid)
    if with_model_server:
        command = model_server_command(settings)
        children.append(subprocess.Popen(command, env=env, start_new_session=True))
        log.info("model server started on %s (pid %d)", settings.inference_url, children[-1].pid)
    print(
        f"API on http://{host}:{port} (docs: http://{host}:{port}/docs); data in {settings.data_dir}",
        flush=True,
    )
    # uvicorn re-raises SIGTERM after its graceful shutdown; with the default handler that would end
    # this process before the worker is stopped, so it becomes an exit that runs `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.run(create_app(settings), host=host, port=port, log_level=settings.log_level.lower())
    finally:
        for child in children:
            stop_process(child)
    return 0


def stop_process(process: subprocess.Popen, grace: float = 60) -> None:
    """SIGTERM first (Celery finishes its bookkeeping), SIGKILL after `grace` seconds."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
