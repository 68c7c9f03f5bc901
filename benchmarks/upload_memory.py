"""Memory of the API while it takes a large dataset upload: its RSS before, and its peak during.

    python -m benchmarks.upload_memory --out docs/benchmarks/upload_memory.json
    python -m benchmarks.upload_memory --size-mb 20      # a smoke run

Target (the issue): upload of a 200 MB dataset: peak memory of the API grows less than 50 MB.
Sizes here are MiB (2**20 bytes): --size-mb 200 writes 200 MiB (210 MB), a little more than asked.

The file is valid JSONL of realistic lines (a word problem as `prompt`, a worked `demonstration`,
an `answer`, 200-500 bytes each), written to a temporary directory. The API runs as one uvicorn
process (no --workers, so the process measured is the one that serves), on a throwaway PostgreSQL
database by default (`--database sqlite` for the embedded one) and local object storage in the same
temporary directory. After a small warm-up upload through the same route, the API's VmRSS is read
(the baseline); during the upload a thread reads /proc/<pid>/status every 20 ms, and the kernel's
own high-water mark (VmHWM, exact but since the process started) is read before and after, so a peak
between two samples is still caught when it is a new high for the process.

The client is httpx with the open file as the multipart `file` part: it streams the body in 64 KiB
chunks and never holds the file (its own peak RSS is reported too). Upload time runs from the start
of the request to the 200 response, so it includes the server's validation pass over the file, its
copy to storage and the database insert, not only the transfer.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import platform
import random
import resource
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.polling import (
    DEFAULT_PG_ADMIN_URL,
    DEFAULT_REDIS_URL,
    free_port,
    server_env,
    start_server,
    stop_server,
    throwaway_database,
    uvicorn_command,
    wait_healthy,
)
from benchmarks.provenance import spread

log = logging.getLogger("benchmarks.upload_memory")

TARGET_GROWTH_MIB = 50.0
_MIB = 1024 * 1024
SAMPLE_SECONDS = 0.02


# ----- the dataset --------------------------------------------------------------------------------

_NAMES = ("Ana", "Bo", "Chen", "Dara", "Eli", "Femi", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lena", "Mo")
_ITEMS = ("apples", "books", "coins", "marbles", "pencils", "stamps", "tickets", "cards", "shells")
_PLACES = ("the market", "school", "the library", "a fair", "the park", "a shop", "the station")
_FILLER = (
    "Show your reasoning.",
    "Give the final answer as a number.",
    "Assume nothing else changes.",
    "Think step by step before answering.",
    "Answer with a whole number.",
)


def _example(rng: random.Random, number: int) -> dict[str, Any]:
    """One word problem with a worked demonstration; 200-500 bytes as JSON."""
    name, other = rng.sample(_NAMES, 2)
    item, place = rng.choice(_ITEMS), rng.choice(_PLACES)
    a, b, c = rng.randint(10, 999), rng.randint(2, 99), rng.randint(1, 9)
    total = a + b * c
    prompt = (
        f"Problem {number}: {name} has {a} {item}. At {place}, {name} buys {c} bags of {b} {item} each "
        f"from {other}. How many {item} does {name} have now?"
    )
    if rng.random() < 0.5:
        prompt += " " + " ".join(rng.sample(_FILLER, rng.randint(1, 3)))
    demonstration = (
        f"{name} starts with {a} {item}. {c} bags of {b} is {c} x {b} = {b * c}. "
        f"{a} + {b * c} = {total}. So {name} has {total} {item}."
    )
    if rng.random() < 0.3:
        demonstration = f"Let us work it out. {demonstration} The answer is {total}."
    return {"prompt": prompt, "demonstration": demonstration, "answer": str(total), "id": f"wp-{number}"}


def write_dataset(path: Path, size_bytes: int, seed: int) -> dict[str, Any]:
    """JSONL of at least `size_bytes` bytes (whole lines). Returns its size, lines and sha256."""
    rng = random.Random(seed)
    digest, written, lines = hashlib.sha256(), 0, 0
    with path.open("wb") as handle:
        while written < size_bytes:
            batch = []
            for _ in range(5000):
                batch.append(json.dumps(_example(rng, lines + len(batch) + 1)))
            chunk = ("\n".join(batch) + "\n").encode()
            if written + len(chunk) > size_bytes:  # the last batch: only the lines still needed
                keep, size = [], written
                for line in batch:
                    keep.append(line)
                    size += len(line) + 1  # ASCII, so characters are bytes
                    if size >= size_bytes:
                        break
                batch, chunk = keep, ("\n".join(keep) + "\n").encode()
            handle.write(chunk)
            digest.update(chunk)
            written += len(chunk)
            lines += len(batch)
    return {"bytes": written, "lines": lines, "sha256": digest.hexdigest()}


def line_sizes(path: Path, count: int = 20000) -> dict[str, float]:
    with path.open("rb") as handle:
        sizes = [len(line) for _, line in zip(range(count), handle, strict=False)]
    return spread(sizes)


# ----- the database -------------------------------------------------------------------------------


@contextlib.contextmanager
def database(kind: str, admin_url: str, data_dir: Path) -> Iterator[str]:
    if kind == "postgres":
        with throwaway_database(admin_url, prefix="prefix_rft_bench_upload") as url:
            yield url
        return
    from migrations import upgrade_to_head

    data_dir.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{data_dir / 'service.db'}"
    logging.getLogger("alembic").setLevel(logging.WARNING)
    upgrade_to_head(url)
    yield url


def make_key(database_url: str) -> str:
    from service.db import make_engine, make_sessionmaker, transaction
    from service.keys import create_key

    engine = make_engine(database_url)
    try:
        with transaction(make_sessionmaker(engine)) as session:
            _, key = create_key(session, "bench-upload")
        return key
    finally:
        engine.dispose()


# ----- memory of the API process ------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    found = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":", 1)
                found[name] = int(value.split()[0]) * 1024
    return found


class RssSampler(threading.Thread):
    """VmRSS of a process every `period` seconds until stopped."""

    def __init__(self, pid: int, period: float = SAMPLE_SECONDS):
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.samples: list[tuple[float, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        while not self._halt.is_set():
            self.samples.append((time.monotonic() - started, proc_status(self.pid)["VmRSS"]))
            self._halt.wait(self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    @property
    def peak(self) -> int:
        return max(rss for _, rss in self.samples)


def steady_rss(pid: int, seconds: float = 1.0) -> int:
    """The median VmRSS over a short quiet period."""
    values = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        values.append(proc_status(pid)["VmRSS"])
        time.sleep(SAMPLE_SECONDS)
    return int(statistics.median(values))


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, threads included (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client_peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----- the upload ---------------------------------------------------------------------------------


def upload(client, base_url: str, key: str, path: Path) -> tuple[int, dict[str, Any], float]:
    """POST the file as multipart `file` (streamed from disk by httpx). Returns status, body, seconds."""
    started = time.perf_counter()
    with path.open("rb") as handle:
        response = client.post(
            f"{base_url}/v1/files",
            headers={"Authorization": f"Bearer {key}"},
            files={"file": (path.name, handle, "application/x-ndjson")},
            data={"purpose": "fine-tune"},
        )
    elapsed = time.perf_counter() - started
    try:
        body = response.json()
    except ValueError:
        body = {"raw": response.text[:500]}
    return response.status_code, body, elapsed


def validation(body: dict[str, Any]) -> dict[str, Any]:
    """What the service found in the file (a FileObject's `validation`)."""
    return body.get("validation") or {}


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import httpx

    data_file = tmp / "big.jsonl"
    started = time.perf_counter()
    expected = write_dataset(data_file, int(args.size_mb * _MIB), args.seed)
    log.info(
        "wrote %s: %.1f MiB, %d lines in %.1f s",
        data_file,
        expected["bytes"] / _MIB,
        expected["lines"],
        time.perf_counter() - started,
    )
    warmup_file = tmp / "warmup.jsonl"
    warmup = write_dataset(warmup_file, 256 * 1024, args.seed + 1)

    data_dir = tmp / "data"
    with database(args.database, args.pg_admin_url, data_dir) as database_url:
        key = make_key(database_url)
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        log_path = tmp / "api.log"
        command = uvicorn_command(port, workers=None, access_log=True)
        server = start_server(command, server_env(database_url, args.redis_url, data_dir), log_path)
        try:
            wait_healthy(base_url, server, log_path)
            with httpx.Client(timeout=httpx.Timeout(600.0, connect=10.0)) as client:
                status, body, _ = upload(client, base_url, key, warmup_file)
                if status != 200 or validation(body).get("examples") != warmup["lines"]:
                    raise RuntimeError(f"the warm-up upload failed: {status} {body}")
                client.get(f"{base_url}/v1/files", headers={"Authorization": f"Bearer {key}"})
                time.sleep(0.5)
                rss_before = steady_rss(server.pid)
                hwm_before = proc_status(server.pid)["VmHWM"]
                client_before = client_peak_rss()
                cpu_before = process_cpu_seconds(server.pid)
                log.info("API RSS after warm-up: %.1f MiB; uploading ...", rss_before / _MIB)

                sampler = RssSampler(server.pid)
                sampler.start()
                try:
                    status, body, seconds = upload(client, base_url, key, data_file)
                    time.sleep(0.5)
                finally:
                    sampler.stop()
                hwm_after = proc_status(server.pid)["VmHWM"]
                server_cpu = process_cpu_seconds(server.pid) - cpu_before
                client_after = client_peak_rss()
                rss_after = steady_rss(server.pid)
        finally:
            stop_server(server)

    peak_sampled = sampler.peak
    # VmHWM is exact; it says something about this upload only when the upload set a new high.
    peak = max(peak_sampled, hwm_after) if hwm_after > hwm_before else peak_sampled
    ok_response = (
        status == 200
        and validation(body).get("examples") == expected["lines"]
        and body.get("bytes") == expected["bytes"]
        and validation(body).get("sha256") == expected["sha256"]
    )
    step = max(1, len(sampler.samples) // 300)
    return {
        "database": args.database,
        "server_command": shlex.join(["uvicorn", *command[3:]]),
        "file": {**expected, "mib": expected["bytes"] / _MIB, "line_bytes": line_sizes(data_file)},
        "upload_seconds": seconds,
        "mib_per_s": expected["bytes"] / _MIB / seconds,
        "api_cpu_seconds": server_cpu,
        "response": {"status": status, "body": body, "as_expected": ok_response},
        "rss_before_mib": rss_before / _MIB,
        "rss_peak_sampled_mib": peak_sampled / _MIB,
        "vmhwm_before_mib": hwm_before / _MIB,
        "vmhwm_after_mib": hwm_after / _MIB,
        "rss_peak_mib": peak / _MIB,
        "rss_after_mib": rss_after / _MIB,
        "growth_mib": (peak - rss_before) / _MIB,
        "samples": len(sampler.samples),
        "sample_period_s": SAMPLE_SECONDS,
        "rss_timeline_mib": [(round(t, 3), round(rss / _MIB, 2)) for t, rss in sampler.samples[::step]],
        "client_peak_rss_mib": {"before": client_before / _MIB, "after": client_after / _MIB},
    }


# ----- report -------------------------------------------------------------------------------------


def print_table(result: dict[str, Any]) -> str:
    f, r = result["file"], result["response"]
    met = result["growth_mib"] < TARGET_GROWTH_MIB
    hwm_note = (
        f"VmHWM {result['vmhwm_before_mib']:.1f} -> {result['vmhwm_after_mib']:.1f} MiB"
        if result["vmhwm_after_mib"] > result["vmhwm_before_mib"]
        else f"VmHWM unchanged at {result['vmhwm_after_mib']:.1f} MiB"
    )
    body = r["body"]
    examples = validation(body).get("examples")
    rows = [
        ("file", f"{f['mib']:.1f} MiB ({f['bytes']:,} bytes), {f['lines']:,} JSONL lines"),
        (
            "line size (bytes)",
            f"min {f['line_bytes']['min']}, median {f['line_bytes']['median']:.0f}, max {f['line_bytes']['max']}",
        ),
        ("database", result["database"]),
        ("upload time", f"{result['upload_seconds']:.1f} s (request start to 200: send, validate, store)"),
        (
            "throughput",
            f"{result['mib_per_s']:.1f} MiB/s; the API used {result['api_cpu_seconds']:.1f} s of CPU for it",
        ),
        ("API RSS before", f"{result['rss_before_mib']:.1f} MiB (after a warm-up upload)"),
        (
            "API peak RSS during",
            f"{result['rss_peak_mib']:.1f} MiB ({result['samples']} samples every "
            f"{result['sample_period_s'] * 1000:.0f} ms; {hwm_note})",
        ),
        ("API RSS after", f"{result['rss_after_mib']:.1f} MiB"),
        (
            "growth (peak - before)",
            f"{result['growth_mib']:.1f} MiB; target < {TARGET_GROWTH_MIB:.0f} MiB: {'MET' if met else 'MISSED'}",
        ),
        (
            "response",
            f"{r['status']}, {examples:,} examples (expected {f['lines']:,}), "
            f"bytes and sha256 {'match' if r['as_expected'] else 'DO NOT MATCH'}"
            if isinstance(examples, int)
            else f"{r['status']}: {json.dumps(body)[:200]}",
        ),
        (
            "client peak RSS",
            f"{result['client_peak_rss_mib']['before']:.1f} -> {result['client_peak_rss_mib']['after']:.1f} MiB "
            "(the client streams the file)",
        ),
    ]
    width = max(len(label) for label, _ in rows)
    text = "\n".join(f"{label:{width}}  {value}" for label, value in rows)
    print(text)
    return text


def versions() -> dict[str, str]:
    found = {}
    for package in ("fastapi", "starlette", "uvicorn", "python-multipart", "httpx", "sqlalchemy", "psycopg"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    found["python"] = platform.python_version()
    return found


# ----- entry point --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=200.0, help="Size of the dataset in MiB.")
    parser.add_argument(
        "--database",
        choices=("postgres", "sqlite"),
        default="postgres",
        help="A throwaway PostgreSQL database (as in production) or the embedded SQLite file.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the generated dataset.")
    parser.add_argument("--pg-admin-url", default=DEFAULT_PG_ADMIN_URL, help="Creates/drops the database.")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="The API's broker (not used here).")
    parser.add_argument("--out", type=Path, default=None, help="Write the results as JSON here.")
    args = parser.parse_args(argv)
    if args.size_mb <= 0:
        parser.error("--size-mb must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not Path("/proc/self/status").is_file():
        raise SystemExit("this benchmark reads /proc/<pid>/status (Linux only)")
    from benchmarks.provenance import provenance, write_report

    origin = provenance(shlex.join(["python", "-m", "benchmarks.upload_memory", *argv]), args.out)
    with tempfile.TemporaryDirectory(prefix="bench-upload-") as tmp:
        result = measure(args, Path(tmp))
    table = print_table(result)
    if args.out is not None:
        report = {
            **origin,
            "target": {"growth_mib_below": TARGET_GROWTH_MIB, "size_mib": args.size_mb},
            "settings": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "seed": args.seed},
            "versions": versions(),
            "result": result,
            "table": table,
        }
        write_report(args.out, report)
    return 0 if result["response"]["as_expected"] else 1


if __name__ == "__main__":
    sys.exit(main())
