"""The reward sandbox's child process: isolate itself, load one grader, score samples on request.

core.rewards.sandbox starts this file as `python -I -S sandbox_server.py REPLY_FD` with an empty
environment and a fresh directory as its working directory. Standard library only: it runs
before the interpreter can see any installed package. It needs no capability: it runs as root
or as an unprivileged user (the images' 10001) alike, provided the kernel (and in a container,
the seccomp and AppArmor profiles) allows unprivileged user namespaces. Setup happens before a
single line of user code is read:

1. namespaces: a user namespace first, whose root is the service's user id on the host (or a
   host id of its own when started as root), and owned by it network, mount, PID, IPC and UTS
   namespaces: no network but an unconfigured loopback, and a PID namespace whose init is this
   process, so every process the grader starts dies with it;
2. a filesystem of its own: a read-only tmpfs root holding read-only binds of the system
   libraries, the standard library and the allowed packages, plus a size-capped tmpfs at /tmp
   as the working directory; nothing else of the host (no /proc, /etc, /home, service code);
3. an unprivileged id (GRADER_ID) in a second user namespace nested in the first, chrooted,
   with no capability at all, no way to gain one (no_new_privs) and no way to create another
   user namespace (the kernel refuses that to a chrooted process);
4. rlimits: CPU time, address space, file size, processes, open files, no core files.

If 1 or 2 fails and the deployment requires isolation, it reports why and exits (fail closed);
if 3 fails, always.

Protocol: JSON lines. The parent sends one line `{"config": ..., "program": ...}` on stdin and
this process answers on REPLY_FD `{"isolated": how}` (or `{"fatal": why}` and exits), then
`{"ready": true}` or `{"load_error": traceback}`. Then each request `{"op": "sample", "samples": [[completion, example], ...]}` or
`{"op": "batch", "prompts": [...], "completions": [...], "examples": [...]}` is answered with one
line per sample (`{"score": x}` or `{"error": traceback}`, plus `"output"` when it printed) and a
closing `{"done": true, "cpu": seconds, "retire": bool}`. End of stdin ends the process.
"""

from __future__ import annotations

import builtins
import ctypes
import errno
import inspect
import io
import json
import linecache
import numbers
import os
import resource
import signal
import sys
import traceback
from typing import Any

# The packages reward code may import besides the standard library (import names).
ALLOWED_PACKAGES = ("math_verify", "numpy", "regex", "jsonschema")
USER_FILENAME = "reward.py"  # the name user code has in tracebacks
USER_MODULE = "reward"
MAX_TRACEBACK_CHARS = 4000
# Started as root, each sandbox runs as a host user id of its own (this base + the host pid of its
# outer process), in a range no real account uses. Started as another user (the images' 10001),
# it runs as that user on the host: only one id can be mapped into a user namespace without
# privileges. Either way the grader sees itself as GRADER_ID, in a user namespace of its own.
SANDBOX_UID_BASE = 1_500_000_000
GRADER_ID = 1000

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 8, 32, 4096, 16384
MS_NOATIME, MS_NODIRATIME, MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 1024, 2048, 1 << 18, 1 << 21, 1 << 24
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 1, 24, 38, 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
DEVICES = ("null", "zero", "random", "urandom")

_libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    """The sandbox could not be built as the deployment requires."""


class TimeLimitExceeded(BaseException):
    """Raised inside user code by SIGALRM (a BaseException, so `except Exception` does not eat it)."""


class CpuLimitExceeded(BaseException):
    """Raised inside user code by SIGXCPU: the process used its CPU-time budget."""


# ----- isolation (runs as the service's user, before any user code) ----------------------------


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def c_string(text: str | None) -> bytes | None:
        return text.encode() if text is not None else None

    result = _libc.mount(c_string(source), c_string(target), c_string(fstype), flags, c_string(data))
    _check(result, f"mount {target}")


def isolate(config: dict[str, Any]) -> str:
    """Build the sandbox around this process; returns a one-line description of what was built."""
    required = config["require_isolation"]
    limits = config["limits"]
    workdir = os.path.realpath(os.getcwd())
    as_root = os.getuid() == 0
    # Started as root, the grader gets a host user id of its own; otherwise it is the service's.
    host_uid = SANDBOX_UID_BASE + os.getpid() if as_root else os.getuid()
    host_gid = host_uid if as_root else os.getgid()
    if as_root:  # none of root's groups goes into the sandbox; its scratch directory is the grader's
        os.setgroups([])
        os.chown(workdir, host_uid, host_gid)
    described = []
    try:
        _enter_namespaces(as_root, host_uid, host_gid)
    except OSError as exc:
        if required:
            raise SetupError(
                f"cannot create the user, network, mount and PID namespaces that isolate reward code ({exc}). "
                "The sandbox needs user namespaces: a kernel that allows them to unprivileged users, and in "
                "Docker the seccomp profile docker/seccomp-sandbox.json and an AppArmor profile that allows "
                "mount (see docs/sandbox.md); a deployment that accepts running python graders without them "
                "sets PREFIX_RFT_SANDBOX_REQUIRE_ISOLATION=false"
            ) from None
        described.append(f"no namespaces ({exc.strerror})")
        _drop_without_namespaces(as_root, host_uid, host_gid)
        described.append(f"uid {host_uid}" + ("" if as_root else " (the service's)"))
        _set_limits(limits)
        return "; ".join(described)
    _become_pid_one()
    root: str | None = os.path.join(workdir, "root")
    try:
        _build_root(
            os.path.join(workdir, "root"),
            config["binds"],
            limits["file_size_mb"],
            GRADER_ID if as_root else 0,
        )
        described.append("namespaces user,net,mnt,pid,ipc,uts; private read-only root")
    except OSError as exc:
        if required:
            raise SetupError(
                f"cannot build the sandbox's filesystem ({exc}); in a container, an AppArmor (or SELinux) "
                "policy that denies mount does this: see docs/sandbox.md"
            ) from None
        root = None
        described.append(f"namespaces user,net,pid,ipc,uts; host filesystem ({exc.strerror})")
    try:
        _drop_privileges(root, nested=not as_root)
    except OSError as exc:
        raise SetupError(f"cannot drop privileges before running reward code ({exc})") from None
    described.append(f"uid {GRADER_ID} (host uid {host_uid}), no capabilities")
    _set_limits(limits)
    return "; ".join(described)


def _write_id_maps(proc: str, uid_map: str, gid_map: str) -> None:
    """A user namespace's id maps (each in one write, as the kernel requires); setgroups denied."""
    for name, text in (("setgroups", "deny"), ("uid_map", uid_map), ("gid_map", gid_map)):
        fd = os.open(f"{proc}/{name}", os.O_WRONLY)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)


def _enter_namespaces(as_root: bool, host_uid: int, host_gid: int) -> None:
    """Unshare a user namespace and, owned by it, network, mount, PID, IPC and UTS namespaces; be
    root of the user namespace.

    No capability is needed on the host: the user namespace comes first and the others belong to
    it. Its root is the service's own user id on the host, the only id a user without privileges
    may map. Started as root, its root is the host's (for reading what it binds) and GRADER_ID is
    mapped to `host_uid` too, the grader's id of its own. A helper that stays outside writes the
    maps: only a process in the parent namespace may map host ids other than its own.
    """
    if as_root:
        uid_map, gid_map = f"0 0 1\n{GRADER_ID} {host_uid} 1\n", f"0 0 1\n{GRADER_ID} {host_gid} 1\n"
    else:
        uid_map, gid_map = f"0 {host_uid} 1\n", f"0 {host_gid} 1\n"
    ready_read, ready_write = os.pipe()
    parent = os.getpid()
    helper = os.fork()
    if helper == 0:  # outside: waits for the namespace, then maps it
        code = 0
        try:
            os.close(ready_write)
            if os.read(ready_read, 1) == b"1":
                _write_id_maps(f"/proc/{parent}", uid_map, gid_map)
        except OSError as exc:
            code = exc.errno or 1
        except BaseException:
            code = 1
        os._exit(code)
    os.close(ready_read)
    try:
        flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
        _check(_libc.unshare(flags), "unshare")
        os.write(ready_write, b"1")
    finally:
        os.close(ready_write)
        _, status = os.waitpid(helper, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise OSError(code, f"writing the user namespace's id maps: {os.strerror(code)}")
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def _drop_without_namespaces(as_root: bool, host_uid: int, host_gid: int) -> None:
    """No namespaces (PREFIX_RFT_SANDBOX_REQUIRE_ISOLATION=false): still never root, no way back."""
    try:
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
        if as_root:
            os.setresgid(host_gid, host_gid, host_gid)
            os.setresuid(host_uid, host_uid, host_uid)
    except OSError as exc:
        raise SetupError(f"cannot drop root privileges before running reward code ({exc})") from None


def _become_pid_one() -> None:
    """Fork into the new PID namespace. The original process only waits and mirrors the exit.

    When PID 1 of a namespace exits the kernel kills every other process in it, so a grader
    that forks, or whose process is killed, leaves nothing behind.
    """
    pid = os.fork()
    if pid:
        os.closerange(0, os.sysconf("SC_OPEN_MAX"))  # so the parent sees end-of-file when PID 1 is gone
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)
    # If the outer process is killed (a timeout), take PID 1, and so the namespace, with it.
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")


def _build_root(root: str, binds: list[str], tmp_mb: int, tmp_owner: int) -> None:
    """A read-only tmpfs root at `root` with read-only binds of `binds` and a writable /tmp owned by
    `tmp_owner` (the grader's id in the user namespace that owns the mounts).

    Mounts only: _drop_privileges chroots into it. On failure the process is still in its
    working directory, which nothing here has changed.
    """
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    os.mkdir(root)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    for link in ("/bin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(link):  # merged /usr: keep the loader's paths (/lib64/ld-linux...) valid
            os.symlink(os.readlink(link), root + link)
    # /tmp first: packages installed under /tmp (a checkout there) are then bound inside it.
    os.makedirs(root + "/tmp")
    tmp_options = f"size={tmp_mb}m,mode=700,uid={tmp_owner},gid={tmp_owner}"
    _mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, tmp_options)
    for path in binds:
        _bind_read_only(path, root + path)
    os.makedirs(root + "/dev")
    for name in DEVICES:
        _bind_read_only(f"/dev/{name}", f"{root}/dev/{name}", nodev=False)
    _mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "size=1m,mode=755")


def _bind_read_only(source: str, target: str, nodev: bool = True) -> None:
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    _mount(source, target, None, MS_BIND | MS_REC)
    flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | (MS_NODEV if nodev else 0)
    _mount(None, target, None, flags | _locked_flags(target))


def _locked_flags(path: str) -> int:
    """The flags of the mount at `path` that a user namespace may not clear (nodev, noexec, the atime
    mode): a bind of a host mount keeps them, or the read-only remount fails with EPERM. Docker's
    /dev, for one, is strictatime."""
    have = os.statvfs(path).f_flag
    flags = (MS_NODEV if have & os.ST_NODEV else 0) | (MS_NOEXEC if have & os.ST_NOEXEC else 0)
    if have & os.ST_NOATIME:
        flags |= MS_NOATIME
    elif have & os.ST_RELATIME:
        flags |= MS_RELATIME
    else:
        flags |= MS_STRICTATIME
    return flags | (MS_NODIRATIME if have & os.ST_NODIRATIME else 0)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _drop_privileges(root: str | None, nested: bool) -> None:
    """From root of the sandbox's user namespace to GRADER_ID, chrooted, with no capability at all.

    Started as root, GRADER_ID is mapped in that namespace: changing to it drops every capability.
    Otherwise only one id is mapped there, so GRADER_ID lives in a second user namespace (`nested`)
    created before the chroot (a chrooted process may not create one: so user code cannot). The
    mounts, the network and the PID namespace belong to the first one, where the grader has no
    capability: it cannot mount, unmount, remount or configure anything. Either way the bounding,
    ambient, effective, permitted and inheritable sets end empty, and no_new_privs is set.
    """
    if nested:
        _check(_libc.unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
        _write_id_maps("/proc/self", f"{GRADER_ID} 0 1\n", f"{GRADER_ID} 0 1\n")
    if root is not None:
        os.chroot(root)
        os.chdir("/tmp")
    cap = 0
    while _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:
        cap += 1
    if ctypes.get_errno() != errno.EINVAL or cap == 0:  # EINVAL: past the last capability
        _check(-1, "prctl(CAPBSET_DROP)")
    _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "prctl(CAP_AMBIENT_CLEAR_ALL)")
    os.setresgid(GRADER_ID, GRADER_ID, GRADER_ID)
    os.setresuid(GRADER_ID, GRADER_ID, GRADER_ID)
    header, data = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0), (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")


def _set_limits(limits: dict[str, Any]) -> None:
    mb = 1 << 20
    cpu = int(limits["cpu_seconds"])
    for which, value in (
        # soft: SIGXCPU, raised in user code as CpuLimitExceeded; hard, a second later: SIGKILL
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_FSIZE, limits["file_size_mb"] * mb),
        (resource.RLIMIT_NPROC, limits["max_processes"]),
        (resource.RLIMIT_NOFILE, 256),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_AS, limits["memory_mb"] * mb),
    ):
        resource.setrlimit(which, value if isinstance(value, tuple) else (value, value))


# ----- the grader -----------------------------------------------------------------------------


def _on_alarm(_signum: int, _frame: Any) -> None:
    if _armed:
        raise TimeLimitExceeded(f"the grader ran over its time limit of {_timeout:g} s")


def _on_cpu_limit(_signum: int, _frame: Any) -> None:
    global _retire
    _retire = True
    raise CpuLimitExceeded("the sandbox process used up its CPU-time limit")


_armed = False
_retire = False
_timeout = 0.0


class _Timed:
    """A wall-clock limit on the code inside: SIGALRM raises TimeLimitExceeded there."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __enter__(self) -> None:
        global _armed
        _armed = True
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *_exc: Any) -> None:
        global _armed
        _armed = False  # first: an alarm arriving now must not raise in our own code
        signal.setitimer(signal.ITIMER_REAL, 0)


class CappedOutput(io.TextIOBase):
    """sys.stdout/sys.stderr of user code: keeps the first `limit` characters, drops the rest."""

    def __init__(self, limit: int):
        self.limit = limit
        self.parts: list[str] = []
        self.size = 0
        self.dropped = 0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        text = str(text)
        room = self.limit - self.size
        if room > 0:
            self.parts.append(text[:room])
            self.size += min(room, len(text))
        self.dropped += max(0, len(text) - max(room, 0))
        return len(text)

    def take(self) -> str:
        text = "".join(self.parts)
        if self.dropped:
            text += f"\n[... {self.dropped} more characters not kept]"
        self.parts, self.size, self.dropped = [], 0, 0
        return text


def guard_imports() -> None:
    """Reward code may import the standard library and ALLOWED_PACKAGES only.

    Imports made by those packages themselves are not checked. This is the documented contract,
    not the security boundary: the OS isolation around the process is.
    """
    allowed = set(sys.stdlib_module_names) | set(ALLOWED_PACKAGES)
    original = builtins.__import__

    def checked_import(name, globals=None, locals=None, fromlist=(), level=0):
        importer = globals if globals is not None else sys._getframe(1).f_globals  # __import__("x")
        if importer.get("__name__") == USER_MODULE and level == 0:
            top = name.partition(".")[0]
            if top not in allowed:
                raise ImportError(
                    f"module {top!r} is not available to reward code; it may import the standard library and "
                    + ", ".join(ALLOWED_PACKAGES),
                    name=top,
                )
        return original(name, globals, locals, fromlist, level)

    builtins.__import__ = checked_import


def user_traceback(exc: BaseException) -> str:
    """The traceback from the first frame of user code on, without this file's frames, trimmed."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != USER_FILENAME:
        tb = tb.tb_next
    report = traceback.TracebackException(type(exc), exc, tb)
    chain: traceback.TracebackException | None = report
    while chain is not None:
        ours = [frame for frame in chain.stack if frame.filename != __file__]
        chain.stack = traceback.StackSummary.from_list(ours)
        chain = chain.__cause__ or chain.__context__
    text = "".join(report.format()).rstrip()
    if len(text) > MAX_TRACEBACK_CHARS:
        text = "...\n" + text[-MAX_TRACEBACK_CHARS:]
    return text


def load(program: dict[str, Any], timeout: float) -> Any:
    source = program["source"]
    code = compile(source, USER_FILENAME, "exec")
    linecache.cache[USER_FILENAME] = (len(source), None, source.splitlines(True), USER_FILENAME)
    namespace: dict[str, Any] = {"__name__": USER_MODULE, "__builtins__": builtins}
    with _Timed(timeout):
        exec(code, namespace)
    function = namespace.get(program["function"])
    if not callable(function):
        raise NameError(f"the code defines no function {program['function']!r}")
    return function


def as_score(value: Any) -> float:
    """A number from what the grader returned; JSON carries NaN and infinities for the parent to refuse."""
    if isinstance(value, numbers.Real):
        try:
            return float(value)
        except OverflowError:
            raise ValueError(
                f"the reward returned a number too large for a float: {str(value)[:40]}..."
            ) from None
    raise TypeError(f"the reward returned {type(value).__name__} ({repr(value)[:80]}), not a number")


def score_samples(function: Any, samples: list[list[Any]], timeout: float, output: CappedOutput):
    for completion, example in samples:
        try:
            with _Timed(timeout):
                value = function(completion, example)
            reply = {"score": as_score(value)}
        except (TypeError, ValueError) as exc:
            reply = {"error": _describe(exc)}
        except BaseException as exc:  # whatever user code raised, timeouts and MemoryError included
            reply = {"error": user_traceback(exc)}
        yield _with_output(reply, output)


def score_batch(function: Any, request: dict[str, Any], timeout: float, output: CappedOutput):
    """TRL's convention: function(prompts=..., completions=..., **columns) -> list of numbers (or None)."""
    completions = request["completions"]
    n = len(completions)
    columns: dict[str, list[Any]] = {}
    for example in request["examples"]:
        for key in example:
            columns.setdefault(key, [])
    for key, values in columns.items():
        values.extend(example.get(key) for example in request["examples"])
    arguments = {**columns, "prompts": request["prompts"], "completions": completions}
    error = ""
    try:
        parameters = inspect.signature(function).parameters.values()
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            names = {p.name for p in parameters}
            arguments = {k: v for k, v in arguments.items() if k in names}
        with _Timed(timeout * n):
            values = function(**arguments)
        if isinstance(values, str | bytes | dict) or not hasattr(values, "__len__"):
            raise TypeError(f"the reward returned {type(values).__name__}, not a list of {n} numbers")
        values = list(values)
        if len(values) != n:
            raise ValueError(f"the reward returned {len(values)} scores for {n} completions")
    except (TypeError, ValueError) as exc:
        error, values = _describe(exc), None
    except BaseException as exc:
        error, values = user_traceback(exc), None
    printed = output.take()
    for i in range(n):
        if values is None:
            reply: dict[str, Any] = {"error": error}
        elif values[i] is None:  # TRL: this reward does not apply to this completion
            reply = {"score": 0.0}
        else:
            try:
                reply = {"score": as_score(values[i])}
            except (TypeError, ValueError) as exc:
                reply = {"error": f"{type(exc).__name__}: {exc}"}
        if printed and i == 0:
            reply["output"] = printed
        yield reply


def _describe(exc: BaseException) -> str:
    """A TypeError or ValueError: our own check (a plain message) or user code's (its traceback)."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == USER_FILENAME:
            return user_traceback(exc)
        tb = tb.tb_next
    return f"{type(exc).__name__}: {exc}"


def _with_output(reply: dict[str, Any], output: CappedOutput) -> dict[str, Any]:
    printed = output.take()
    if printed:
        reply["output"] = printed
    return reply


def _has_children() -> bool:
    """Reap children that exited; True if one still runs (retiring the sandbox kills it)."""
    try:
        while True:
            pid, _ = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return True
    except ChildProcessError:
        return False


# ----- the process ----------------------------------------------------------------------------


def main() -> int:
    global _timeout
    reply_fd = int(sys.argv[1])
    requests = os.fdopen(os.dup(0), "rb")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)  # input() in user code reads nothing rather than our requests
    replies = os.fdopen(reply_fd, "w", encoding="utf-8")

    def send(message: dict[str, Any]) -> None:
        if os.getpid() != server_pid:  # a copy made by os.fork() in user code: it must not answer
            os._exit(0)
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    first = json.loads(requests.readline() or "null")
    if not first:
        return 1
    config, program = first["config"], first["program"]
    server_pid = os.getpid()
    try:
        isolation = isolate(config)
    except SetupError as exc:
        server_pid = os.getpid()  # the failure may come from PID 1 of the new namespace
        send({"fatal": str(exc)})
        return 1
    server_pid = os.getpid()  # PID 1 of the new namespace, when there is one
    limits = config["limits"]
    _timeout = float(limits["timeout_seconds"])
    sys.path[:] = config["sys_path"]
    # Native libraries must not start thread pools (each thread counts as a process).
    os.environ.clear()
    os.environ.update(
        {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TMPDIR": os.getcwd()}
    )
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGXCPU, _on_cpu_limit)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write fails with EFBIG instead
    output = CappedOutput(int(limits["output_bytes"]))
    sys.stdout = sys.stderr = output
    guard_imports()
    send({"isolated": isolation})
    try:
        function = load(program, _timeout)
    except BaseException as exc:
        send({"load_error": user_traceback(exc), "output": output.take()})
        function = None
    else:
        send({"ready": True, "output": output.take()})

    for line in requests:
        request = json.loads(line)
        n = len(request["samples"]) if request["op"] == "sample" else len(request["completions"])
        if function is None:
            results: Any = ({"error": "the grader did not load"} for _ in range(n))
        elif request["op"] == "sample":
            results = score_samples(function, request["samples"], _timeout, output)
        else:
            results = score_batch(function, request, _timeout, output)
        for reply in results:
            send(reply)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        send({"done": True, "cpu": usage.ru_utime + usage.ru_stime, "retire": _retire or _has_children()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
