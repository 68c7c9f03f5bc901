"""A pool of warm sandbox processes that run user reward code (python graders).

User code never runs in the service's processes. Each sandbox process (core/rewards/
sandbox_server.py) isolates itself before it reads any user code: namespaces (no network), a
private read-only filesystem, its own unprivileged user id, rlimits. It then loads one grader
and scores samples on request until it is retired, so a training step pays no start-up cost.

This side enforces what the process cannot be trusted to: a wall-clock limit per sample (kill
and replace the process when it does not answer in time), a cap on every byte read back from
it, and cleanup. A failure is one sample's error, never the caller's: a grader that raises,
hangs, dies or answers garbage scores 0 for that sample and the pool carries on.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import select
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

SERVER = Path(__file__).with_name("sandbox_server.py")
ALLOWED_DISTRIBUTIONS = ("math-verify", "numpy", "regex", "jsonschema")  # ALLOWED_PACKAGES' distributions
START_SECONDS = 10.0  # interpreter start and isolation, before the grader's own load time
TIME_LIMIT_ERROR = "TimeLimitExceeded"  # how a sample that ran out of time is reported (both ways)
OUT_OF_TIME = "not scored: the time budget of the request ran out"
# Samples per request to a process (it goes back to the pool between requests); a call uses a
# second process only for at least twice this many.
MIN_CHUNK = 16


class SandboxLimits(BaseModel):
    """What one sandbox process may use; the deployment sets them (PREFIX_RFT_SANDBOX_*)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    require_isolation: bool = Field(
        True,
        description="Refuse to run python graders where the namespaces cannot be created (no network "
        "isolation, host filesystem). Turn off only on a trusted single-user machine.",
    )
    timeout_seconds: float = Field(
        10.0, gt=0, le=600, description="Wall clock per sample (a batch-form call: per completion in it)."
    )
    cpu_seconds: int = Field(
        120,
        ge=1,
        description="CPU time of one sandbox process over its life; it is replaced before it runs out.",
    )
    memory_mb: int = Field(1024, ge=64, description="Address space of one sandbox process.")
    max_processes: int = Field(
        1,
        ge=1,
        description="Processes and threads a sandbox may have, itself included (1: no fork, no threads).",
    )
    file_size_mb: int = Field(16, ge=1, description="Largest file, and all files together, in its /tmp.")
    output_bytes: int = Field(4096, ge=0, description="What a grader prints, kept per sample.")
    workers: int = Field(2, ge=1, le=64, description="Warm sandbox processes in a pool (parallel scoring).")

    @classmethod
    def from_settings(cls, settings: Any, prefix: str = "sandbox_") -> SandboxLimits:
        """From an object with `sandbox_<field>` attributes (the service's Settings)."""
        return cls(**{name: getattr(settings, prefix + name) for name in cls.model_fields})

    @property
    def grace_seconds(self) -> float:
        """How long past its time limit a sample may take before its process is killed.

        The process's own SIGALRM normally answers first (and keeps the process warm); the grace
        covers scheduling delays on a busy machine.
        """
        return 1.0 + 0.25 * self.timeout_seconds

    @property
    def reply_limit(self) -> int:
        """Longest reply line accepted from a sandbox: a trimmed traceback and the capped output."""
        return 64 * 1024 + 8 * self.output_bytes


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot be built here (and the deployment requires it): no user code runs."""


@dataclass(frozen=True)
class GraderProgram:
    """What a sandbox process loads: the source, the function to call, and how to call it.

    `owner` (a project) is part of the key: a warm process keeps module state between calls, so
    the same code sent by two owners never runs in the same process.
    """

    source: str
    function: str = "reward"
    form: Literal["sample", "batch"] = "sample"
    owner: str = ""

    @functools.cached_property
    def key(self) -> str:
        text = json.dumps([self.owner, self.form, self.function, self.source])
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class SampleOutcome:
    """One sample's result from a python grader: a score, or what went wrong (it then scores 0)."""

    score: float | None
    error: str | None = None
    output: str = ""

    @property
    def timed_out(self) -> bool:
        return self.error is not None and self.error.rstrip().splitlines()[-1].startswith(TIME_LIMIT_ERROR)


# ----- what the sandbox may see ---------------------------------------------------------------


@functools.cache
def sandbox_paths() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(paths bound read-only into the sandbox, its sys.path).

    The system libraries, the standard library, and from site-packages only the allowed
    packages and what they depend on: the sandbox cannot read the service's code or the other
    installed packages, let alone import them.
    """
    # The base interpreter's, not a virtual environment's (whose "platstdlib" holds site-packages).
    base = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix})
    stdlib = {os.path.realpath(base[k]) for k in ("stdlib", "platstdlib")}
    site_dirs = [os.path.realpath(p) for p in site.getsitepackages() if os.path.isdir(p)]
    binds = {p for p in ("/usr/lib", "/usr/lib64", "/usr/lib32", "/etc/ld.so.cache") if os.path.exists(p)}
    binds |= {p for p in ("/lib", "/lib64", "/lib32") if os.path.isdir(p) and not os.path.islink(p)}
    binds |= stdlib
    for dist in _dependency_closure(ALLOWED_DISTRIBUTIONS):
        root = os.path.realpath(str(dist.locate_file("")))
        for name in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            path = os.path.join(root, name)
            if os.path.exists(path) and not name.endswith(".pth") and name != "__pycache__":
                binds.add(path)
    sys_path = sorted(stdlib) + [os.path.join(p, "lib-dynload") for p in sorted(stdlib)] + site_dirs
    return _outermost(binds), tuple(p for p in dict.fromkeys(sys_path) if os.path.isdir(p))


def _dependency_closure(names: Sequence[str]) -> list[importlib.metadata.Distribution]:
    """The installed distributions `names` need, recursively.

    Requirements of extras are left out; other markers are not evaluated, which can only add an
    installed package that is not needed, never leave out one that is.
    """
    seen: dict[str, importlib.metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional or platform-specific dependency that is not installed
        seen[key] = dist
        for requirement in dist.requires or []:
            _, _, marker = requirement.partition(";")
            if "extra" not in marker:
                todo.append(re.match(r"\s*([A-Za-z0-9._-]+)", requirement).group(1))  # type: ignore[union-attr]
    return list(seen.values())


def _outermost(paths: set[str]) -> tuple[str, ...]:
    """Drop paths that lie inside another one of the set (binding the parent binds them)."""
    kept: list[str] = []
    for path in sorted(paths):
        if not any(path.startswith(parent.rstrip("/") + "/") for parent in kept):
            kept.append(path)
    return tuple(kept)


# ----- one sandbox process --------------------------------------------------------------------


class _Died(Exception):
    """The sandbox process is gone or broke the protocol; `reason` says what to tell the user."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class SandboxProcess:
    """One isolated process with one grader loaded. Not thread-safe: the pool lends it to one caller."""

    def __init__(self, program: GraderProgram, limits: SandboxLimits):
        self.program, self.limits = program, limits
        self.cpu = 0.0
        self.retire = False
        self.load_error: str | None = None
        self.isolation = ""
        self.workdir = tempfile.mkdtemp(prefix="reward-sandbox-")
        reply_read, reply_write = os.pipe()
        binds, sys_path = sandbox_paths()
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-I", "-S", str(SERVER), str(reply_write)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(reply_write,),
                env={},  # nothing of the service's environment (secrets) reaches user code
                cwd=self.workdir,
                start_new_session=True,  # its own process group, killed as one
            )
        except BaseException:
            os.close(reply_read)
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise
        finally:
            os.close(reply_write)
        self._requests = self.popen.stdin.fileno()  # type: ignore[union-attr]
        os.set_blocking(self._requests, False)
        self._replies = reply_read
        self._buffer = bytearray()
        config = {
            "require_isolation": limits.require_isolation,
            "limits": limits.model_dump(),
            "binds": list(binds),
            "sys_path": list(sys_path),
        }
        try:
            program_fields = {"source": program.source, "function": program.function, "form": program.form}
            self._send(
                {"config": config, "program": program_fields}, time.monotonic() + START_SECONDS, "starting"
            )
            isolated = self._read(time.monotonic() + START_SECONDS, "starting")
        except _Died as exc:
            self.kill()
            raise SandboxUnavailable(f"the reward sandbox did not start: {exc.reason}") from None
        if "fatal" in isolated:
            self.kill()
            raise SandboxUnavailable(isolated["fatal"])
        self.isolation = str(isolated.get("isolated", ""))
        try:  # from here on, a failure is the grader's: its module-level code runs now
            loaded = self._read(time.monotonic() + limits.timeout_seconds + limits.grace_seconds, "loading")
            self.load_error = loaded.get("load_error")
        except _Died as exc:
            self.kill()
            self.load_error = exc.reason

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None and self._replies >= 0

    def score(
        self, samples: list[tuple[Any, str, dict[str, Any]]], deadline: float | None
    ) -> list[SampleOutcome]:
        """Outcomes of a prefix of `samples`: all of them, or up to and including one that killed the process.

        A sample that runs over its time limit without answering, or any breach of the protocol,
        kills the process (the caller starts another for the rest).
        """
        if self.load_error is not None:
            return [SampleOutcome(None, f"the grader failed to load:\n{self.load_error}")] * len(samples)
        timeout = self.limits.timeout_seconds
        batch = self.program.form == "batch"
        if batch:
            request: dict[str, Any] = {
                "op": "batch",
                "prompts": [s[0] for s in samples],
                "completions": [s[1] for s in samples],
                "examples": [s[2] for s in samples],
            }
            first_wait = timeout * len(samples)
        else:
            request = {"op": "sample", "samples": [[s[1], s[2]] for s in samples]}
            first_wait = timeout
        outcomes: list[SampleOutcome] = []
        try:
            send_by = _earliest(time.monotonic() + first_wait + self.limits.grace_seconds, deadline)
            self._send(request, send_by, "scoring")
            wait = first_wait
            while len(outcomes) < len(samples):
                limit = _earliest(time.monotonic() + wait + self.limits.grace_seconds, deadline)
                reply = self._read(limit, "scoring")
                wait = 0 if batch else timeout  # a batch answers all its lines at once
                outcomes.append(_outcome(reply))
            done = self._read(time.monotonic() + self.limits.grace_seconds, "finishing")
            self.cpu = float(done.get("cpu", 0.0))
            self.retire = bool(done.get("retire")) or self.cpu > self.limits.cpu_seconds - timeout - 1
        except _Died as exc:
            self.kill()
            reason = OUT_OF_TIME if deadline is not None and time.monotonic() >= deadline else exc.reason
            failed = len(samples) - len(outcomes) if batch else 1
            outcomes += [SampleOutcome(None, reason)] * failed
        return outcomes

    # ----- the pipes --------------------------------------------------------------------------

    def _send(self, message: dict[str, Any], deadline: float, doing: str) -> None:
        data = memoryview((json.dumps(message) + "\n").encode())
        while data:
            self._wait(self._requests, select.POLLOUT, deadline, doing)
            try:
                written = os.write(self._requests, data)
            except BlockingIOError:
                continue
            except OSError:  # EPIPE: it is gone
                raise _Died(self._exit_reason(doing)) from None
            data = data[written:]

    def _read(self, deadline: float, doing: str) -> dict[str, Any]:
        """The next reply line; never holds more than reply_limit bytes of it."""
        limit = self.limits.reply_limit
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                try:
                    reply = json.loads(line)
                except ValueError:
                    reply = None
                if not isinstance(reply, dict):
                    raise _Died("the sandbox process wrote something that is not a reply (protocol broken)")
                return reply
            if len(self._buffer) > limit:
                raise _Died(f"the sandbox process wrote a reply over {limit} bytes (output too large)")
            self._wait(self._replies, select.POLLIN, deadline, doing)
            chunk = os.read(self._replies, 1 << 16)
            if not chunk:
                raise _Died(self._exit_reason(doing))
            self._buffer += chunk

    def _wait(self, fd: int, event: int, deadline: float, doing: str) -> None:
        poller = select.poll()
        poller.register(fd, event | select.POLLHUP | select.POLLERR)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Died(self._timeout_reason(doing))
            try:
                if poller.poll(left * 1000):
                    return
            except InterruptedError:
                continue

    def _timeout_reason(self, doing: str) -> str:
        if doing in ("scoring", "loading"):
            what = "the grader" if doing == "scoring" else "the grader's module-level code"
            return (
                f"{TIME_LIMIT_ERROR}: {what} ran over its time limit of {self.limits.timeout_seconds:g} s and "
                "did not stop; its sandbox process was killed"
            )
        return f"the sandbox process stopped answering while {doing}; it was killed"

    def _exit_reason(self, doing: str) -> str:
        when = {"scoring": "this sample", "loading": "the grader's module-level code"}.get(doing, doing)
        try:
            code = self.popen.wait(timeout=self.limits.grace_seconds)
        except subprocess.TimeoutExpired:
            return f"the sandbox process closed its reply pipe during {when}; it was killed"
        signum = -code if code < 0 else code - 128 if code > 128 else 0
        if signum:
            name = signal.Signals(signum).name if signum in signal.valid_signals() else str(signum)
            hint = {
                "SIGKILL": f" (the CPU-time limit of {self.limits.cpu_seconds} s, or killed)",
                "SIGXFSZ": f" (the file-size limit of {self.limits.file_size_mb} MB)",
                "SIGSEGV": " (a crash in native code, or memory)",
            }.get(name, "")
            return f"the sandbox process was killed by {name}{hint} during {when}"
        return f"the sandbox process exited with code {code} during {when} (os._exit or sys.exit?)"

    # ----- the end ----------------------------------------------------------------------------

    def close(self) -> None:
        """Ask the process to exit (end of its input), then make sure it did."""
        if self.popen.poll() is None and self.popen.stdin is not None:
            try:
                self.popen.stdin.close()
                self.popen.wait(timeout=1)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()

    def kill(self) -> None:
        """Kill the process group (PID 1 of the sandbox's namespace goes with it), free everything."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.warning("sandbox process %d did not exit after SIGKILL", self.popen.pid)
        if self.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()
        if self._replies >= 0:
            os.close(self._replies)
            self._replies = -1
        shutil.rmtree(self.workdir, ignore_errors=True)


def _close_all(processes: list[SandboxProcess]) -> None:
    while processes:
        processes.pop().close()


def _earliest(a: float, b: float | None) -> float:
    return a if b is None else min(a, b)


def _outcome(reply: dict[str, Any]) -> SampleOutcome:
    output = str(reply.get("output", ""))
    if "score" in reply and isinstance(reply["score"], int | float) and not isinstance(reply["score"], bool):
        return SampleOutcome(float(reply["score"]), None, output)
    return SampleOutcome(None, str(reply.get("error", "the sandbox sent no score")), output)


# ----- the pool -------------------------------------------------------------------------------


class SandboxPool:
    """Up to `limits.workers` warm sandbox processes, each loaded with one grader.

    A process serves one grader (one source) for its whole life, so two graders, or two
    projects, never share a process. An idle process of another grader is retired when a new one
    needs the room. Thread-safe; `close()` ends every process, and the pool starts new ones if
    it is used again.
    """

    def __init__(self, limits: SandboxLimits | None = None):
        self.limits = limits or SandboxLimits()
        self._cond = threading.Condition()
        self._idle: list[SandboxProcess] = []  # least recently used first
        self._waiting: list[object] = []  # callers waiting for a process, first come first served
        self._live = 0
        self._warned_isolation = False
        # Idle processes end with the pool, or at interpreter exit, even if nobody calls close().
        weakref.finalize(self, _close_all, self._idle)

    def score(
        self,
        program: GraderProgram,
        prompts: Sequence[Any],
        completions: Sequence[str],
        examples: Sequence[dict[str, Any]],
        deadline: float | None = None,
    ) -> list[SampleOutcome]:
        """One outcome per completion. Raises SandboxUnavailable only if no sandbox can be started."""
        samples = list(zip(prompts, completions, examples, strict=True))
        if not samples:
            return []
        if program.form == "batch":  # one call sees the whole batch, as TRL's reward functions expect
            return self._score_chunk(program, samples, deadline)
        chunks = max(1, min(self.limits.workers, len(samples) // MIN_CHUNK))
        size = -(-len(samples) // chunks)
        parts = [samples[i : i + size] for i in range(0, len(samples), size)]
        if len(parts) == 1:
            return self._score_chunk(program, parts[0], deadline)
        # Threads of this call only: a shared, bounded executor would queue other callers behind it.
        with ThreadPoolExecutor(len(parts), thread_name_prefix="reward-sandbox") as executor:
            futures = [executor.submit(self._score_chunk, program, part, deadline) for part in parts]
            return [outcome for future in futures for outcome in future.result()]

    def check(self) -> str:
        """Start one sandbox to make sure it can be built here; returns how it is isolated."""
        process = SandboxProcess(
            GraderProgram("def reward(completion, example):\n    return 0.0\n"), self.limits
        )
        process.close()
        return process.isolation

    def close(self) -> None:
        with self._cond:
            idle, self._idle = self._idle, []
            self._live -= len(idle)
            self._cond.notify_all()
        _close_all(idle)

    # ----- lending processes ------------------------------------------------------------------

    def _score_chunk(
        self, program: GraderProgram, samples: list[tuple[Any, str, dict[str, Any]]], deadline: float | None
    ) -> list[SampleOutcome]:
        """Score samples in requests of MIN_CHUNK, a process borrowed for each; a dead one is replaced.

        Between requests the process goes back to the pool, where callers waiting for one are
        served first. A grader that ran into its time limit is then sent one sample at a time,
        so a slow grader holds a process for at most one sample while others wait.
        """
        outcomes: list[SampleOutcome] = []
        size = len(samples) if program.form == "batch" else MIN_CHUNK
        while len(outcomes) < len(samples):
            process = None
            if deadline is None or time.monotonic() < deadline:
                process = self._acquire(program, deadline)
            if process is None:
                return outcomes + [SampleOutcome(None, OUT_OF_TIME)] * (len(samples) - len(outcomes))
            try:
                done = process.score(samples[len(outcomes) : len(outcomes) + size], deadline)
            finally:
                self._release(process)
            outcomes += done
            if any(o.timed_out for o in done):
                size = 1
        return outcomes

    def _acquire(self, program: GraderProgram, deadline: float | None) -> SandboxProcess | None:
        """A process loaded with `program`: an idle one, a new one, or one that replaces another
        grader's idle process. Callers are served in the order they asked; None at the deadline."""
        victim = None
        ticket = object()
        with self._cond:
            self._waiting.append(ticket)
            try:
                while True:
                    if self._waiting[0] is ticket:
                        for i in range(len(self._idle) - 1, -1, -1):
                            if self._idle[i].program.key == program.key:
                                return self._idle.pop(i)
                        if self._live < self.limits.workers:
                            self._live += 1
                            break
                        if self._idle:  # make room: retire the least recently used idle process
                            victim = self._idle.pop(0)
                            break
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return None
                    self._cond.wait(left)
            finally:
                self._waiting.remove(ticket)
                self._cond.notify_all()
        if victim is not None:
            victim.close()
        try:
            process = SandboxProcess(program, self.limits)
        except BaseException:
            with self._cond:
                self._live -= 1
                self._cond.notify_all()
            raise
        if "no namespaces" in process.isolation and not self._warned_isolation:
            self._warned_isolation = True
            log.warning("reward sandbox runs WITHOUT namespace isolation: %s", process.isolation)
        return process

    def _release(self, process: SandboxProcess) -> None:
        keep = process.alive and not process.retire
        with self._cond:
            if keep:
                self._idle.append(process)
            else:
                self._live -= 1
            self._cond.notify_all()
        if not keep:
            process.close()
