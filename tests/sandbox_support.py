"""Running the reward sandbox the way the images run it, on a machine without Docker.

- `load_docker_seccomp`: Docker's seccomp profile format (docker/seccomp-sandbox.json), turned
  into a filter with libseccomp exactly as Docker turns it (the rules a container's capability
  set selects) and loaded into this process, so everything it starts runs under it, as in a
  container. `ours=False` leaves out the rules this project adds: Docker's own default profile.
- `image_user_command`: a command that runs as the images' user (10001:10001), with no
  capability (effective, permitted, inheritable, ambient and bounding sets empty) and
  no_new_privs; /dev is strictatime and nosuid as in a container.
- `sandbox_namespaces` / `processes_in`: the PID namespaces of a pool's sandbox processes, and
  the processes left in one (the host view: the sandbox's own ids are meaningless outside).
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
from collections.abc import Collection
from pathlib import Path

IMAGE_UID = 10001  # USER 10001:10001 in docker/api.Dockerfile and docker/worker.Dockerfile
# The capabilities Docker gives a container unless told otherwise; its seccomp filter is built
# for this set (the process itself, as user 10001, holds none of them).
DOCKER_DEFAULT_CAPS = frozenset(
    "CAP_" + name
    for name in [
        "CHOWN",
        "DAC_OVERRIDE",
        "FSETID",
        "FOWNER",
        "MKNOD",
        "NET_RAW",
        "SETGID",
        "SETUID",
        "SETFCAP",
        "SETPCAP",
        "NET_BIND_SERVICE",
        "SYS_CHROOT",
        "KILL",
        "AUDIT_WRITE",
    ]
)
OUR_RULES = "prefix-rft reward sandbox:"  # how the rules added to Docker's default profile begin
_DOCKER_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "ppc64le": "ppc64le", "s390x": "s390x"}
_OPS = {"SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4, "SCMP_CMP_GE": 5}
_OPS |= {"SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7}
SCMP_ACT_ALLOW = 0x7FFF0000


def _errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def _kernel_at_least(version: str) -> bool:
    have = tuple(int(part) for part in platform.release().split("-")[0].split(".")[:2])
    return have >= tuple(int(part) for part in version.split(".")[:2])


def _applies(rule: dict, caps: frozenset[str]) -> bool:
    """Docker's selection: every included capability present, no excluded one; the arch; the kernel."""
    arch = _DOCKER_ARCH.get(platform.machine(), platform.machine())
    includes, excludes = rule.get("includes") or {}, rule.get("excludes") or {}
    if not set(includes.get("caps") or ()) <= caps or set(excludes.get("caps") or ()) & caps:
        return False
    if includes.get("arches") and arch not in includes["arches"]:
        return False
    if arch in (excludes.get("arches") or ()):
        return False
    return not includes.get("minKernel") or _kernel_at_least(includes["minKernel"])


def load_docker_seccomp(
    profile: Path,
    caps: frozenset[str] = DOCKER_DEFAULT_CAPS,
    ours: bool = True,
    without: Collection[str] = (),
) -> None:
    """Load `profile` (Docker's JSON format) into this process as Docker would for a container
    with `caps`; irreversible, inherited by every process started from here. `without`: system
    calls whose rules among the project's own are left out."""
    lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    spec = json.loads(profile.read_text())
    assert spec["defaultAction"] == "SCMP_ACT_ERRNO", spec["defaultAction"]
    default = _errno_action(spec.get("defaultErrnoRet", 1))
    context = lib.seccomp_init(default)
    assert context, "seccomp_init failed"
    for rule in spec["syscalls"]:
        if rule.get("comment", "").startswith(OUR_RULES) and (not ours or set(rule["names"]) & set(without)):
            continue
        if not _applies(rule, caps):
            continue
        action = {"SCMP_ACT_ALLOW": SCMP_ACT_ALLOW, "SCMP_ACT_ERRNO": _errno_action(rule.get("errnoRet", 1))}[
            rule["action"]
        ]
        if action == default:
            continue
        comparisons = [
            _ArgCmp(a["index"], _OPS[a["op"]], a["value"], a.get("valueTwo", 0))
            for a in rule.get("args") or []
        ]
        # Docker: comparisons of one argument are alternatives (a rule each), of several all hold.
        indexes = [c.arg for c in comparisons]
        groups = [[c] for c in comparisons] if len(set(indexes)) < len(indexes) else [comparisons]
        for name in rule["names"]:
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number < 0:
                continue  # unknown to this libseccomp (a newer system call)
            for group in groups:
                array = (_ArgCmp * max(1, len(group)))(*group)
                result = lib.seccomp_rule_add_array(context, action, number, len(group), array)
                assert result == 0, f"seccomp rule for {name}: {os.strerror(-result)}"
    result = lib.seccomp_load(context)
    assert result == 0, f"seccomp_load: {os.strerror(-result)}"


def _hidden_ancestor(path: str) -> tuple[str, str] | None:
    """(the highest directory above `path` that others may not search, its child on the way)."""
    parts = Path(path).parts
    for depth in range(1, len(parts) - 1):
        directory = Path(*parts[:depth])
        if not os.stat(directory).st_mode & 0o001:
            return str(directory), str(Path(*parts[: depth + 1]))
    return None


def image_user_command(command: list[str]) -> tuple[list[str], str | None]:
    """(argv, a directory to remove afterwards) running `command` as the images run their processes.

    Started as root, it drops to 10001:10001 with setpriv in a private mount namespace (util-linux
    unshare), where /dev is remounted nosuid and strictatime as Docker mounts it. The interpreter
    may live where 10001 cannot reach it (pyenv under /root here; /usr/local or /opt/venv in the
    images): there, that namespace lays a world-searchable tmpfs over the directory that hides it
    and binds the interpreter's own directory back in, at the same path. Started as another user,
    the command runs as is (that user has no capability).
    """
    if os.geteuid() != 0:
        return command, None
    scratch = tempfile.mkdtemp(prefix="image-user-")
    setup = ["mount -o remount,bind,nosuid,strictatime /dev"]
    hidden = _hidden_ancestor(os.path.realpath(sys.base_prefix))
    if hidden:
        directory, child = hidden
        keep = os.path.join(scratch, "keep")
        os.mkdir(keep)
        setup += [
            f"mount --bind {shlex.quote(child)} {keep}",
            f"mount -t tmpfs -o mode=755 tmpfs {shlex.quote(directory)}",
            f"mkdir -p {shlex.quote(child)}",
            f"mount --move {keep} {shlex.quote(child)}",
        ]
    drop = ["setpriv", f"--reuid={IMAGE_UID}", f"--regid={IMAGE_UID}", "--clear-groups"]
    drop += ["--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]
    script = " && ".join([*setup, 'exec "$@"'])
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        "sh",
        *drop,
        *command,
    ], scratch


def can_run_as_image_user() -> str | None:
    """Why `image_user_command` cannot work here, or None."""
    if os.geteuid() == 0:
        for tool in ("setpriv", "unshare"):
            if shutil.which(tool) is None:
                return f"util-linux's {tool} is needed to run as the images' user"
    try:
        ctypes.CDLL("libseccomp.so.2")
    except OSError:
        return "libseccomp (libseccomp2) is needed to apply Docker's seccomp profile"
    return None


def pid_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def sandbox_namespace(outer_pid: int) -> str | None:
    """The PID namespace a sandbox process built: that of its outer process's child (PID 1 there)."""
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        if int(fields["PPid"]) == outer_pid:
            return pid_namespace(int(status.parent.name))
    return None


def processes_in(namespace: str, strays_only: bool = False) -> dict[int, int]:
    """{host pid: host uid} of the processes in a PID namespace; strays_only: all but its PID 1."""
    found = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        pid = int(status.parent.name)
        if pid_namespace(pid) != namespace:
            continue
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        if strays_only and fields["NSpid"].split()[-1] == "1":
            continue
        found[pid] = int(fields["Uid"].split()[0])
    return found


class NamespaceRecorder:
    """Records, while active, the PID namespace of every sandbox process started, by grader source."""

    def __init__(self) -> None:
        self.served: dict[str, set[str]] = {}

    def __enter__(self) -> NamespaceRecorder:
        from core.rewards.sandbox import SandboxProcess

        self._class, self._start = SandboxProcess, SandboxProcess.__init__
        start, served = self._start, self.served

        def recording_init(process, program, limits):
            start(process, program, limits)
            namespace = sandbox_namespace(process.popen.pid)
            if namespace:
                served.setdefault(program.source, set()).add(namespace)

        SandboxProcess.__init__ = recording_init  # type: ignore[method-assign]
        return self

    def __exit__(self, *_exc: object) -> None:
        self._class.__init__ = self._start  # type: ignore[method-assign]
