"""Status polling under load: GET /v1/fine_tuning/jobs/{id} against the real API on PostgreSQL.

    python -m benchmarks.polling --out docs/benchmarks/polling.json
    python -m benchmarks.polling --quick            # 5 s phases, a smoke run

Target (the issue): 100 concurrent clients for 30 s against GET /v1/fine_tuning/jobs/{id}; report
requests/s, p50 and p99 latency; p99 under 25 ms on this machine.

Set-up: a throwaway PostgreSQL database (dropped at the end), migrated to head; a project and its
API key; a file row and a running job row inserted directly (no worker), made by the steps
POST /v1/fine_tuning/jobs takes, so the response has its real size. The API runs as production
runs it (docker/api.Dockerfile): `uvicorn api.app:create_app --factory --workers N`, with httptools
and uvloop when installed, and its access log on (written to a file here).

The load: C clients, each with its own keep-alive connection, spread over a few generator processes
(asyncio, raw HTTP/1.1 over sockets, uvloop when installed). Latency runs from just before a request
is written to the end of its response body. After a short closed-loop warm-up (which also fills the
API's connection pools), phases of D seconds each:

- polling: after each response the client waits --interval seconds (default 0.5 s and 0.25 s, so
  100 clients offer at most 200 and 400 requests/s). This is what polling clients do, and the
  phases the target is judged on (at 200 requests/s). Each --interval value gives one phase.
- saturation: a closed loop with no wait. It measures the most requests/s the machine serves; its
  latency is then set by queueing (about clients / throughput, Little's law), not by the request
  path, so it is reported but not judged against the 25 ms target.

The load generator shares the machine's cores with the API and PostgreSQL. Per phase, the table
gives the CPU (in cores) of the API processes, of PostgreSQL (the whole cluster, exited backends
included), of the load generator, and the rest of the machine's busy time (kernel, other processes:
a large rest means the machine was not quiet). The generator's event-loop lag is reported too: it
is scheduling delay on the shared cores, and it is part of the measured latencies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import multiprocessing
import os
import platform
import random
import resource
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

# Only the standard library at module level: the spawned load generators re-import this module and
# should stay small (SQLAlchemy, psutil and the app are imported by the parent where it needs them).

log = logging.getLogger("benchmarks.polling")

REPO = Path(__file__).resolve().parents[1]
TARGET_P99_MS = 25.0
DEFAULT_PG_ADMIN_URL = os.environ.get(
    "PREFIX_RFT_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/12"
REQUEST_TIMEOUT_S = 10.0
HEALTH_TIMEOUT_S = 60.0


# ----- database, server, processes (shared with benchmarks.upload_memory) ------------------------


@contextlib.contextmanager
def throwaway_database(admin_url: str, prefix: str = "prefix_rft_bench") -> Iterator[str]:
    """A fresh PostgreSQL database, migrated to head; dropped (connections forced off) at the end."""
    from sqlalchemy import create_engine, text

    logging.getLogger("alembic").setLevel(logging.WARNING)  # its plugin set-up logs at INFO on import
    from migrations import upgrade_to_head

    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        upgrade_to_head(url)
        log.info("database %s created and migrated", name)
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        log.info("database %s dropped", name)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_env(database_url: str, broker_url: str, data_dir: Path) -> dict[str, str]:
    """The API's environment: this deployment's PREFIX_RFT_* settings and nothing inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFIX_RFT_")}
    env.update(
        PREFIX_RFT_DATABASE_URL=database_url,
        PREFIX_RFT_BROKER_URL=broker_url,
        PREFIX_RFT_DATA_DIR=str(data_dir),
        PREFIX_RFT_STORAGE_URL=(data_dir / "objects").as_uri(),
    )
    return env


def uvicorn_speedups() -> list[str]:
    """--http httptools / --loop uvloop where installed (uvicorn's `auto` picks the same)."""
    args = []
    for module, flag in (("httptools", "--http"), ("uvloop", "--loop")):
        try:
            __import__(module)
            args += [flag, module]
        except ImportError:
            pass
    return args


def uvicorn_command(port: int, workers: int | None, access_log: bool) -> list[str]:
    command = [sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory"]
    command += ["--host", "127.0.0.1", "--port", str(port), *uvicorn_speedups()]
    if workers is not None:
        command += ["--workers", str(workers)]
    if not access_log:
        command.append("--no-access-log")
    return command


def start_server(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log.info("starting: %s", shlex.join(command))
    # A file, not a pipe: with the access log on, an unread pipe would fill and stall the server.
    with log_path.open("wb") as handle:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)


def wait_healthy(base_url: str, process: subprocess.Popen, log_path: Path, workers: int = 1) -> None:
    """Until /health answers (and, with several workers, until each worker has started)."""
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the API exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            urllib.request.urlopen(base_url + "/health", timeout=2).close()
            started = log_path.read_text(errors="replace").count("Application startup complete")
            if started >= workers:
                return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the API did not start within {HEALTH_TIMEOUT_S:.0f} s:\n{log_path.read_text()}"
            )
        time.sleep(0.2)


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def seed_job(database_url: str) -> tuple[str, str]:
    """A project with a key, a file row and a running job row. Returns (key, job id)."""
    from api.fine_tuning_methods import resolve_method
    from api.jobs import JobSpec, new_job
    from core.base_models import SMOLLM2
    from core.config import parse_grader
    from service.db import make_engine, make_sessionmaker, transaction
    from service.keys import create_key
    from service.tables import Dataset, JobStatus, new_id, utcnow

    engine = make_engine(database_url)
    try:
        with transaction(make_sessionmaker(engine)) as session:
            project, key = create_key(session, "bench-polling")
            examples = 2000
            dataset = Dataset(
                id=new_id("file"),
                project_id=project.id,
                name="addition.jsonl",
                bytes=examples * 300,
                sha256="0" * 64,
                storage_key="",
                lines=examples,
                examples=examples,
                with_demonstration=examples,
                field_counts={"answer": examples},
            )
            dataset.storage_key = f"datasets/{project.id}/{dataset.id}.jsonl"
            session.add(dataset)
            session.flush()
            # The job POST /v1/fine_tuning/jobs would store for this method, made by the same steps,
            # so the response has its real size.
            method = {
                "type": "prefix_rft",
                "prefix_rft": {
                    "grader": {"type": "numeric", "field": "answer"},
                    "hyperparameters": {"steps": 200},
                },
            }
            resolved = resolve_method(method, None, dataset.examples)
            spec = JobSpec(
                model=SMOLLM2,
                method=resolved.method,
                adapter=resolved.adapter,
                training_dataset=dataset.id,
                reward=parse_grader(resolved.grader).model_dump(mode="json"),
                hyperparameters=resolved.training,
                evaluation=resolved.evaluation,
                checkpoint_every=resolved.checkpoint_every,
                suffix="bench",
                metadata={"team": "benchmarks", "run": "polling"},
            )
            job = new_job(session, spec, project.id, frozenset())
            job.fine_tuning_method = resolved.echo
            job.status = JobStatus.RUNNING
            job.step = 57
            job.attempt = 1
            job.worker_id = "bench-worker"
            job.started_at = utcnow()
        return key, job.id
    finally:
        engine.dispose()


# ----- the load generator (runs in spawned processes; standard library and uvloop only) ---------


@dataclass(frozen=True)
class Phase:
    name: str
    start: float  # time.monotonic() (system-wide on Linux, so the same clock in every process)
    duration: float
    interval: float  # wait after each response; 0 = closed loop
    record: bool = True

    @property
    def end(self) -> float:
        return self.start + self.duration


@dataclass
class PhaseRecord:
    latencies: list[float] = field(default_factory=list)  # seconds
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    last_done: float = 0.0
    cpu_s: float = 0.0
    wall_s: float = 0.0
    loop_lag_ms: list[float] = field(default_factory=list)

    def fail(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple:
    """Send one request; read the whole response. Returns (status, keep the connection)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length, keep = 0, True
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            keep = value.strip().lower() != b"close"
        elif name == b"transfer-encoding":
            raise ValueError("chunked responses are not expected here")
    if length:
        await reader.readexactly(length)
    return status, keep


async def _sleep_until(moment: float) -> None:
    delay = moment - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def _client(
    host: str, port: int, request: bytes, phases: list[Phase], records: list[PhaseRecord], seed: int
) -> None:
    rng = random.Random(seed)
    reader = writer = None

    async def connect() -> None:
        nonlocal reader, writer
        if writer is not None:
            writer.close()
        reader, writer = await asyncio.open_connection(host, port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    await connect()
    for phase, record in zip(phases, records, strict=True):
        await _sleep_until(phase.start)
        if phase.interval:
            await asyncio.sleep(rng.uniform(0, phase.interval))  # clients do not poll in lockstep
        while time.monotonic() < phase.end:
            started = time.perf_counter()
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    if writer is None:
                        await connect()
                    status, keep = await _exchange(reader, writer, request)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
                record.fail(type(exc).__name__)
                record.last_done = time.monotonic()
                with contextlib.suppress(Exception):
                    writer.close()
                writer = None
                await asyncio.sleep(0.05)
                continue
            elapsed = time.perf_counter() - started
            record.last_done = time.monotonic()
            if status == 200:
                record.latencies.append(elapsed)
            else:
                record.fail(f"http_{status}")
            if not keep:
                writer.close()
                writer = None
            if phase.interval:
                await asyncio.sleep(phase.interval)
    if writer is not None:
        writer.close()


async def _monitor(phases: list[Phase], records: list[PhaseRecord]) -> None:
    """This process's CPU time per phase, and its event loop's lag (a 10 ms sleep's overshoot)."""
    for phase, record in zip(phases, records, strict=True):
        await _sleep_until(phase.start)
        usage, wall = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        while time.monotonic() < phase.end:
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            record.loop_lag_ms.append((time.perf_counter() - before - 0.01) * 1000)
        after = resource.getrusage(resource.RUSAGE_SELF)
        record.cpu_s = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
        record.wall_s = time.monotonic() - wall


async def _generate(host: str, port: int, request: bytes, clients: int, index: int, control, results) -> None:
    phases = [Phase(**p) for p in control.get()]
    records = [PhaseRecord() for _ in phases]
    tasks = [
        asyncio.create_task(_client(host, port, request, phases, records, seed=index * 100_000 + i))
        for i in range(clients)
    ]
    tasks.append(asyncio.create_task(_monitor(phases, records)))
    await asyncio.gather(*tasks)
    results.put((index, [asdict(r) for p, r in zip(phases, records, strict=True) if p.record]))


def _generator_main(host: str, port: int, request: bytes, clients: int, index: int, control, results) -> None:
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(_generate(host, port, request, clients, index, control, results))


# ----- measurement of the other processes --------------------------------------------------------


def _cpu_by_pid(processes: list) -> dict[int, float]:
    import psutil

    found = {}
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            found[process.pid] = times.user + times.system
    return found


def _postgres_cpu_seconds() -> float:
    """CPU seconds of the whole PostgreSQL cluster: the postmaster, its live children, and the children
    it has reaped (a backend's time moves from the second to the third when it exits, so the sum is
    consistent across connections that come and go). All databases count; this one is the busy one."""
    import psutil

    total = 0.0
    for process in psutil.process_iter(["name", "ppid"]):
        with contextlib.suppress(psutil.Error):
            if not (process.info["name"] or "").startswith("postgres"):
                continue
            parent = psutil.Process(process.info["ppid"]) if process.info["ppid"] else None
            if parent is not None and (parent.name() or "").startswith("postgres"):
                continue  # a backend: counted with its postmaster below
            times = process.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
            for child in process.children():
                with contextlib.suppress(psutil.Error):
                    child_times = child.cpu_times()
                    total += child_times.user + child_times.system
    return total


class CpuMeter:
    """CPU used over a phase by the API processes, by PostgreSQL, and by the whole machine (whose
    remainder is the kernel and every other process), with the database's sessions and transactions."""

    def __init__(self, server_pid: int, database: str, admin_url: str):
        import psutil
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        self.server = psutil.Process(server_pid)
        self.database = database
        self.admin = create_engine(admin_url, poolclass=NullPool)

    def close(self) -> None:
        self.admin.dispose()

    def _database_stats(self) -> dict[str, float]:
        """Sessions (connections) opened to the database and transactions it ran, from pg_stat_database."""
        from sqlalchemy import text

        with self.admin.connect() as connection:
            connection.execute(text("SELECT pg_stat_clear_snapshot()"))
            row = connection.execute(
                text(
                    "SELECT sessions, xact_commit + xact_rollback AS xacts "
                    "FROM pg_stat_database WHERE datname = :name"
                ),
                {"name": self.database},
            ).one()
        return {"sessions": float(row.sessions), "xacts": float(row.xacts)}

    def _server_processes(self) -> list:
        return [self.server, *self.server.children(recursive=True)]

    def snapshot(self) -> dict[str, Any]:
        import psutil

        machine = psutil.cpu_times()
        busy = machine.user + machine.nice + machine.system
        busy += sum(getattr(machine, name, 0.0) for name in ("irq", "softirq", "steal"))
        return {
            "time": time.monotonic(),
            "server": _cpu_by_pid(self._server_processes()),
            "postgres": _postgres_cpu_seconds(),
            "machine_busy": busy,
            **self._database_stats(),
        }

    @staticmethod
    def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
        """Cores used; a process that started during the phase counts from zero."""
        wall = after["time"] - before["time"]

        def used(kind: str) -> float:
            return sum(cpu - before[kind].get(pid, 0.0) for pid, cpu in after[kind].items()) / wall

        return {
            "server_cores": used("server"),
            "postgres_cores": (after["postgres"] - before["postgres"]) / wall,
            "machine_busy_cores": (after["machine_busy"] - before["machine_busy"]) / wall,
            "pg_sessions_opened": after["sessions"] - before["sessions"],
            "pg_transactions": after["xacts"] - before["xacts"],
        }

    def connections_per_worker(self, port: int) -> list[int]:
        """Established connections to the API port held by each worker process."""
        import psutil

        counts = []
        for worker in self.server.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "resource_tracker" in " ".join(worker.cmdline()):
                    continue  # multiprocessing's helper, not a worker
                counts.append(
                    sum(
                        1
                        for c in worker.net_connections(kind="tcp")
                        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED
                    )
                )
        return counts


# ----- running the phases ------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def summarise_phase(phase: Phase, records: list[dict[str, Any]], cpu: dict[str, float]) -> dict[str, Any]:
    latencies = sorted(x for r in records for x in r["latencies"])
    errors = sum(r["errors"] for r in records)
    kinds: dict[str, int] = {}
    for r in records:
        for kind, count in r["error_kinds"].items():
            kinds[kind] = kinds.get(kind, 0) + count
    done = max((r["last_done"] for r in records), default=phase.end)
    elapsed = max(phase.duration, done - phase.start)
    lags = sorted(x for r in records for x in r["loop_lag_ms"])
    ms = [x * 1000 for x in latencies]
    generator_cores = sum(r["cpu_s"] / r["wall_s"] for r in records if r["wall_s"])
    cpu = {
        **cpu,
        "generator_cores": generator_cores,
        # The kernel (loopback TCP), this script's parent, and anything else running on the machine.
        "rest_cores": cpu["machine_busy_cores"]
        - cpu["server_cores"]
        - cpu["postgres_cores"]
        - generator_cores,
    }
    return {
        "phase": phase.name,
        "duration_s": phase.duration,
        "interval_s": phase.interval,
        "requests": len(latencies),
        "errors": errors,
        "error_kinds": kinds,
        "requests_per_s": len(latencies) / elapsed,
        "latency_ms": {
            "mean": statistics.fmean(ms) if ms else float("nan"),
            "p50": percentile(ms, 50),
            "p90": percentile(ms, 90),
            "p99": percentile(ms, 99),
            "p999": percentile(ms, 99.9),
            "max": ms[-1] if ms else float("nan"),
        },
        "generator": {
            "processes": len(records),
            "cpu_cores_each": [r["cpu_s"] / r["wall_s"] if r["wall_s"] else 0.0 for r in records],
            "cpu_cores_total": generator_cores,
            "loop_lag_ms_p99": percentile(lags, 99),
            "loop_lag_ms_max": lags[-1] if lags else float("nan"),
        },
        "cpu": cpu,
    }


def run_load(
    port: int, key: str, job_id: str, args: argparse.Namespace, meter: CpuMeter
) -> tuple[list[dict], dict]:
    request = (
        f"GET /v1/fine_tuning/jobs/{job_id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {key}\r\nAccept: application/json\r\n\r\n"
    ).encode()
    procs = min(args.generator_processes, args.clients)
    shares = [args.clients // procs + (i < args.clients % procs) for i in range(procs)]
    context = multiprocessing.get_context("spawn")
    control, results = context.Queue(), context.Queue()
    workers = [
        context.Process(
            target=_generator_main,
            args=("127.0.0.1", port, request, shares[i], i, control, results),
            name=f"loadgen-{i}",
        )
        for i in range(procs)
    ]
    for worker in workers:
        worker.start()

    # Start times far enough ahead for the generators to import and connect.
    start = time.monotonic() + 3.0
    phases = []
    plan = [("warm-up", args.warmup, 0.0, False)]
    plan += [(polling_name(interval, args), args.duration, interval, True) for interval in args.interval]
    plan.append(("saturation", args.duration, 0.0, True))
    for name, duration, interval, record in plan:
        phases.append(Phase(name, start, duration, interval, record))
        start += duration + args.gap
    for _ in workers:
        control.put([asdict(p) for p in phases])
    log.info(
        "%d clients over %d generator processes (%s); warm-up %.0f s, then %d phases of %.0f s",
        args.clients,
        procs,
        "+".join(map(str, shares)),
        args.warmup,
        len(phases) - 1,
        args.duration,
    )

    cpu: dict[str, dict[str, float]] = {}
    connections: list[int] = []
    for phase in phases:
        time.sleep(max(0.0, phase.start - time.monotonic()))
        before = meter.snapshot()
        if phase.record and not connections:
            connections = meter.connections_per_worker(port)
        log.info("phase %s: %.0f s", phase.name, phase.duration)
        time.sleep(max(0.0, phase.end - time.monotonic()))
        cpu[phase.name] = CpuMeter.delta(before, meter.snapshot())

    collected: dict[int, list[dict]] = {}
    deadline = time.monotonic() + REQUEST_TIMEOUT_S + 30
    while len(collected) < procs:
        index, records = results.get(timeout=max(1.0, deadline - time.monotonic()))
        collected[index] = records
    for worker in workers:
        worker.join(timeout=10)
        if worker.exitcode != 0:
            raise RuntimeError(f"load generator {worker.name} failed (exit code {worker.exitcode})")

    recorded = [p for p in phases if p.record]
    summaries = [
        summarise_phase(phase, [collected[i][n] for i in range(procs)], cpu[phase.name])
        for n, phase in enumerate(recorded)
    ]
    return summaries, {"connections_per_worker": connections, "clients_per_generator": shares}


# ----- report ------------------------------------------------------------------------------------


def polling_name(interval: float, args: argparse.Namespace) -> str:
    return "polling" if len(args.interval) == 1 else f"polling {interval:g}s"


def print_table(summaries: list[dict[str, Any]], args: argparse.Namespace) -> str:
    header = (
        f"{'phase':14} {'offered':>12} {'req/s':>7} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} "
        f"{'max ms':>7} {'errors':>6}  {'target p99':>10}  {'CPU cores: API / PG / loadgen / rest':>36}"
    )
    lines = [header, "-" * len(header)]
    for s in summaries:
        lat = s["latency_ms"]
        if s["interval_s"]:
            offered = f"<= {args.clients / s['interval_s']:.0f}/s"
            met = lat["p99"] < TARGET_P99_MS
            target = f"< {TARGET_P99_MS:.0f}: {'YES' if met else 'NO'}"
        else:
            offered = "closed loop"
            target = "(queueing)"
        c = s["cpu"]
        cpu = (
            f"{c['server_cores']:.2f} / {c['postgres_cores']:.2f} / "
            f"{c['generator_cores']:.2f} / {max(0.0, c['rest_cores']):.2f}"
        )
        lines.append(
            f"{s['phase']:14} {offered:>12} {s['requests_per_s']:7.0f} {lat['p50']:7.1f} {lat['p90']:7.1f} "
            f"{lat['p99']:7.1f} {lat['max']:7.1f} {s['errors']:6d}  {target:>10}  {cpu:>36}"
        )
    lines.append("")
    saturation = summaries[-1]
    capacity = saturation["requests_per_s"]
    lines.append(
        f"{args.clients} clients, {args.duration:.0f} s per phase, {args.workers} API worker(s), "
        f"{os.cpu_count()} CPU cores shared by the API, PostgreSQL and the load generator "
        "(rest: kernel and other processes)."
    )
    for s in summaries[:-1]:
        p99 = s["latency_ms"]["p99"]
        offered = args.clients / s["interval_s"]
        lines.append(
            f"{s['phase']}: p99 {p99:.1f} ms vs target < {TARGET_P99_MS:.0f} ms: "
            f"{'MET' if p99 < TARGET_P99_MS else 'MISSED'}"
            + (
                f" (it offers up to {offered:.0f} req/s, more than the {capacity:.0f} req/s the machine "
                "serves: it is saturated too)."
                if offered > capacity
                else f" (up to {offered:.0f} req/s offered, {offered / capacity:.0%} of the saturation rate)."
            )
        )
    little = args.clients / capacity * 1000 if capacity else 0.0
    lines.append(
        f"saturation: {capacity:.0f} req/s at most; mean latency {saturation['latency_ms']['mean']:.1f} ms "
        f"~ clients / throughput = {little:.1f} ms: queueing, not the request path."
    )
    for s in summaries:
        g = s["generator"]
        limited = g["loop_lag_ms_p99"] > 0.2 * s["latency_ms"]["p99"] or max(g["cpu_cores_each"]) > 0.8
        lines.append(
            f"load generator, {s['phase']}: {g['cpu_cores_total']:.2f} cores over {g['processes']} processes "
            f"(each {', '.join(f'{x:.2f}' for x in g['cpu_cores_each'])}), event-loop lag p99 "
            f"{g['loop_lag_ms_p99']:.1f} ms, max {g['loop_lag_ms_max']:.1f} ms: "
            f"{'MAY LIMIT the result' if limited else 'not the bottleneck'}."
        )
        if s["cpu"]["rest_cores"] > 0.4:
            lines.append(
                f"warning, {s['phase']}: {s['cpu']['rest_cores']:.2f} cores went to the kernel and other "
                "processes; run again on a quiet machine if that is not loopback networking."
            )
    text = "\n".join(lines)
    print(text)
    return text


def versions() -> dict[str, str]:
    found = {}
    for package in (
        "fastapi",
        "starlette",
        "uvicorn",
        "httptools",
        "uvloop",
        "sqlalchemy",
        "psycopg",
        "pydantic",
    ):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    found["python"] = platform.python_version()
    return found


def postgres_version(admin_url: str) -> str:
    from sqlalchemy import create_engine, text

    engine = create_engine(admin_url)
    try:
        with engine.connect() as connection:
            return str(connection.execute(text("SHOW server_version")).scalar())
    finally:
        engine.dispose()


# ----- entry point --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100, help="Concurrent clients, one connection each.")
    parser.add_argument("--duration", type=float, default=30.0, help="Seconds per measured phase.")
    parser.add_argument(
        "--interval",
        type=float,
        nargs="+",
        default=[0.5, 0.25],
        help="Polling phases: wait after each response (s), one phase per value; with 100 clients "
        "0.5 offers 200 requests/s (the target's load) and 0.25 offers 400.",
    )
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes of the API.")
    parser.add_argument("--warmup", type=float, default=3.0, help="Unrecorded closed-loop warm-up (s).")
    parser.add_argument("--gap", type=float, default=1.0, help="Idle seconds between phases.")
    parser.add_argument(
        "--generator-processes", type=int, default=2, help="Load generator processes (asyncio each)."
    )
    parser.add_argument(
        "--no-access-log",
        dest="access_log",
        action="store_false",
        help="Turn uvicorn's access log off (production, docker/api.Dockerfile, has it on).",
    )
    parser.add_argument("--pg-admin-url", default=DEFAULT_PG_ADMIN_URL, help="Creates/drops the database.")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="The API's broker (not used here).")
    parser.add_argument("--quick", action="store_true", help="Smoke run: 5 s phases, 1 s warm-up.")
    parser.add_argument("--out", type=Path, default=None, help="Write the results as JSON here.")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 5.0, 1.0
    if args.clients < 1 or args.workers < 1 or args.generator_processes < 1:
        parser.error("--clients, --workers and --generator-processes must be at least 1")
    if args.duration <= 0 or min(args.interval) <= 0:
        parser.error("--duration and --interval must be positive")
    return args


def _configure_logging() -> None:
    # Progress on stderr; stdout carries only the result table.
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)


def main(argv: list[str] | None = None) -> int:
    _configure_logging()
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    import psutil  # noqa: F401  (fail early: the CPU figures need it)

    from benchmarks.provenance import provenance, write_report

    origin = provenance(shlex.join(["python", "-m", "benchmarks.polling", *argv]), args.out)

    with (
        tempfile.TemporaryDirectory(prefix="bench-polling-") as tmp,
        throwaway_database(args.pg_admin_url) as database_url,
    ):
        key, job_id = seed_job(database_url)
        port = free_port()
        log_path = Path(tmp) / "api.log"
        command = uvicorn_command(port, args.workers, args.access_log)
        server = start_server(command, server_env(database_url, args.redis_url, Path(tmp) / "data"), log_path)
        try:
            wait_healthy(f"http://127.0.0.1:{port}", server, log_path, args.workers)
            check = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/fine_tuning/jobs/{job_id}",
                headers={"Authorization": f"Bearer {key}"},
            )
            with urllib.request.urlopen(check, timeout=5) as response:
                body = response.read()
            log.info("GET /v1/fine_tuning/jobs/%s: %d bytes of JSON", job_id, len(body))
            meter = CpuMeter(server.pid, database_url.rsplit("/", 1)[1], args.pg_admin_url)
            try:
                summaries, extra = run_load(port, key, job_id, args, meter)
            finally:
                meter.close()
        finally:
            stop_server(server)
        pg_version = postgres_version(args.pg_admin_url)

    table = print_table(summaries, args)
    if args.out is not None:
        report = {
            **origin,
            "target": {"p99_ms_below": TARGET_P99_MS, "judged_on": "the polling phase(s)"},
            "settings": {
                "clients": args.clients,
                "duration_s": args.duration,
                "interval_s": args.interval,
                "warmup_s": args.warmup,
                "api_workers": args.workers,
                "generator_processes": args.generator_processes,
                "access_log": args.access_log,
                "server_command": shlex.join(["uvicorn", *command[3:]]),
                "response_bytes": len(body),
                "cpu_count": os.cpu_count(),
                "platform": platform.platform(),
                "postgresql": pg_version,
                **extra,
            },
            "versions": versions(),
            "phases": summaries,
            "table": table,
        }
        write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
