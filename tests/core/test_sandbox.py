"""The reward sandbox, run for real: hostile graders are contained and the pool keeps serving.

Every hostile case goes through score_completions, as training and the reward test endpoint do,
and is followed by a good sample on the same pool. Limits are small (1 s, 256 MB) to stay fast.
"""

from __future__ import annotations

import ast
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.rewards import RewardSpec, SandboxLimits, SandboxPool, SandboxUnavailable, score_completions
from core.rewards.sandbox import GraderProgram, sandbox_paths
from core.rewards.sandbox_server import GRADER_ID, SANDBOX_UID_BASE
from tests.conftest import missing
from tests.sandbox_support import (
    IMAGE_UID,
    NamespaceRecorder,
    can_run_as_image_user,
    image_user_command,
    processes_in,
)

LIMITS = SandboxLimits(
    timeout_seconds=1,
    cpu_seconds=4,
    memory_mb=256,
    max_processes=8,  # > 1, so the fork bomb really forks and its processes must be cleaned up
    file_size_mb=8,
    output_bytes=1024,
    workers=2,
)
SECRET = "s3cret-value-that-must-not-leak"
ROOT = Path(__file__).resolve().parents[2]  # the repository

pytestmark = pytest.mark.usefixtures("sandbox_privileges")


@pytest.fixture(scope="module")
def pool() -> Iterator[SandboxPool]:
    pool = SandboxPool(LIMITS)
    yield pool
    pool.close()


def python_spec(source: str, function: str = "reward") -> RewardSpec:
    grader = {"type": "python", "name": "user", "source": textwrap.dedent(source), "function": function}
    return RewardSpec.model_validate({"graders": [grader]})


def score(pool: SandboxPool, source: str, completions=("x",), examples=None, function="reward"):
    examples = examples or [{"answer": "x"} for _ in completions]
    return score_completions(python_spec(source, function), list(completions), examples, sandbox=pool)


def assert_still_serving(pool: SandboxPool) -> None:
    good = "def reward(completion, example):\n    return float(completion == example['answer'])\n"
    result = score(pool, good, ["4", "5", "4"], [{"answer": "4"}] * 3)
    assert result.per_grader["user"] == [1.0, 0.0, 1.0] and result.error_count == 0, result.failures


# The PID namespaces of the sandboxes that loaded each grader (by source), recorded as they start:
# the host sees a sandbox's processes by namespace, not by the ids they have inside.
RECORDER = NamespaceRecorder()
SERVED = RECORDER.served


@pytest.fixture(scope="module", autouse=True)
def record_sandbox_namespaces() -> Iterator[None]:
    with RECORDER:
        yield


def namespaces_of(source: str) -> set[str]:
    namespaces = SERVED.get(textwrap.dedent(source), set())
    assert namespaces, "no sandbox was seen loading this grader"
    return namespaces


def expected_host_uid(uid: int) -> bool:
    """A sandbox's processes run as a host id of their own when the service is root, else as it."""
    return uid >= SANDBOX_UID_BASE if os.geteuid() == 0 else uid == os.geteuid()


def assert_no_processes_left(source: str, strays_only: bool = False, within: float = 5.0) -> None:
    """No process of the sandboxes that ran `source` is left (strays_only: none but their PID 1)."""
    deadline = time.monotonic() + within
    for namespace in namespaces_of(source):
        while processes_in(namespace, strays_only) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = processes_in(namespace, strays_only)
        assert left == {}, f"processes of sandbox {namespace} outlived their sample: {left}"


# ----- scoring ----------------------------------------------------------------------------------


def test_a_warm_process_serves_one_grader_across_calls(pool):
    counter = """
        calls = 0
        def reward(completion, example):
            global calls
            calls += 1
            return calls
    """
    first = score(pool, counter)
    second = score(pool, counter)
    assert first.per_grader["user"] == [1.0] and second.per_grader["user"] == [2.0]  # the same process
    other = score(pool, counter.replace("calls += 1", "calls += 10"))
    assert other.per_grader["user"] == [10.0]  # another grader never shares its process


def test_trl_batch_reward_functions_run_unchanged(pool):
    trl_style = """
        def accuracy_reward(completions, solution, **kwargs):
            assert kwargs["prompts"] == ["p1", "p2", "p3"]
            return [1.0 if c.strip() == s else 0.0 for c, s in zip(completions, solution)]
    """
    examples = [
        {"solution": "a", "prompt": "p1"},
        {"solution": "b", "prompt": "p2"},
        {"solution": "c", "prompt": "p3"},
    ]
    result = score(pool, trl_style, [" a", "x", "c"], examples, function="accuracy_reward")
    assert result.per_grader["user"] == [1.0, 0.0, 1.0] and result.error_count == 0, result.failures

    # None means "does not apply" in TRL: 0 and no error; a wrong count fails the whole batch.
    nones = "def f(completions, **kw):\n    return [None, 2]\n"
    result = score(pool, nones, ["a", "b"], function="f")
    assert result.per_grader["user"] == [0.0, 2.0] and result.error_count == 0
    short = "def f(completions, **kw):\n    return [1]\n"
    result = score(pool, short, ["a", "b"], function="f")
    assert result.errors == {"user": 2} and "1 scores for 2 completions" in result.failures["user"][0]


def test_samples_are_scored_in_parallel_and_in_order(pool):
    completions = [str(i) for i in range(100)]
    result = score(pool, "def reward(c, e):\n    return int(c) * 2\n", completions)
    assert result.per_grader["user"] == [2.0 * i for i in range(100)]


def test_the_example_carries_the_prompt(pool):
    spec = python_spec("def reward(c, e):\n    return len(e['prompt']) + e['n']\n")
    result = score_completions(spec, ["a", "b"], [{"n": 1}, {"n": 2}], prompts=["abc", "de"], sandbox=pool)
    assert result.per_grader["user"] == [4.0, 4.0]


def test_a_sleeping_grader_is_cut_at_its_time_limit_without_stalling_the_others(pool):
    sleepy = """
        import time
        def reward(completion, example):
            if example["slow"]:
                time.sleep(3600)
            return 1.0
    """
    slow_result = {}

    def slow_call():
        examples = [{"slow": i < 3} for i in range(4)]  # one chunk: three samples of 1 s each, then one fine
        started = time.perf_counter()
        slow_result["result"] = score(pool, sleepy, ["x"] * 4, examples)
        slow_result["seconds"] = time.perf_counter() - started

    thread = threading.Thread(target=slow_call)
    thread.start()
    time.sleep(0.3)
    started = time.perf_counter()
    assert_still_serving(pool)  # the other worker answers while the slow grader sleeps
    assert time.perf_counter() - started < 2.0  # not after the slow call (3 s)
    thread.join()
    result = slow_result["result"]
    assert result.per_grader["user"] == [0.0, 0.0, 0.0, 1.0]
    assert all("time limit of 1 s" in f for f in result.failures["user"][:3])
    assert 3.0 <= slow_result["seconds"] < 3.0 + LIMITS.grace_seconds  # cut at the limit, process kept


# ----- the hostile corpus -------------------------------------------------------------------------
# (source, what the failure must say); every case is followed by assert_still_serving.

HOSTILE = {
    "infinite_loop": (
        """
        def reward(completion, example):
            while True:
                pass
        """,
        "TimeLimitExceeded: the grader ran over its time limit of 1 s",
    ),
    "loop_that_swallows_the_time_limit": (
        """
        import time
        def spin():
            while True:
                pass
        def reward(completion, example):
            while True:
                try:
                    spin()
                except BaseException:
                    time.sleep(0.01)
        """,
        "did not stop; its sandbox process was killed",
    ),
    "infinite_loop_at_import": (
        "while True:\n    pass\ndef reward(c, e):\n    return 1\n",
        "time limit of 1 s",
    ),
    "memory_bomb": (
        """
        def reward(completion, example):
            hog = []
            while True:
                hog.append(bytearray(10**7))
        """,
        "MemoryError",
    ),
    "one_huge_allocation": ("def reward(c, e):\n    return len(bytearray(10**11))\n", "MemoryError"),
    "socket_to_the_database": (
        """
        import socket
        def reward(completion, example):
            socket.create_connection(("127.0.0.1", 5432), timeout=2)
            return 1.0
        """,
        "Network is unreachable",
    ),
    "name_lookup": (
        "import socket\ndef reward(c, e):\n    return len(socket.getaddrinfo('example.com', 443))\n",
        "gaierror",
    ),
    "writing_a_huge_file": (
        """
        def reward(completion, example):
            with open("big.bin", "wb") as handle:
                for _ in range(64):
                    handle.write(b"x" * (1 << 20))
            return 1.0
        """,
        "File too large",
    ),
    "writing_outside_the_working_directory": (
        "def reward(c, e):\n    open('/usr/lib/planted', 'w').write('x')\n    return 1.0\n",
        "Read-only file system",
    ),
    "flooding_the_reply_pipe": (
        """
        import os
        def reward(completion, example):
            for fd in range(3, 64):
                try:
                    os.write(fd, b"x" * (1 << 20))
                except OSError:
                    pass
            return 1.0
        """,
        "output too large",
    ),
    # `import torch` is refused when the spec is created; a dynamic import meets the sandbox's guard
    "import_not_on_the_list": (
        "def reward(c, e):\n    return __import__('torch')\n",
        "'torch' is not available",
    ),
    "returning_a_string": ("def reward(c, e):\n    return '1.0'\n", "returned str ('1.0'), not a number"),
    "returning_none": ("def reward(c, e):\n    pass\n", "returned NoneType"),
    "returning_nan": ("def reward(c, e):\n    return float('nan')\n", "not a finite number"),
    "returning_infinity": ("def reward(c, e):\n    return -float('inf')\n", "not a finite number"),
    "returning_a_huge_number": ("def reward(c, e):\n    return 1e300\n", "outside [-1e+06, 1e+06]"),
    "returning_a_huge_integer": ("def reward(c, e):\n    return 10**400\n", "too large for a float"),
    "raising": ("def reward(c, e):\n    return 1 / 0\n", 'File "reward.py", line 2, in reward'),
    "calling_os_exit": ("import os\ndef reward(c, e):\n    os._exit(3)\n", "exited with code 3"),
    "calling_sys_exit": ("import sys\ndef reward(c, e):\n    sys.exit(0)\n", "SystemExit"),
    "crashing_the_interpreter": ("import ctypes\ndef reward(c, e):\n    ctypes.string_at(0)\n", "SIGSEGV"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_grader_is_contained(pool, case):
    source, expected = HOSTILE[case]
    result = score(pool, source, ["x", "y"])
    assert result.per_grader["user"] == [0.0, 0.0]
    assert result.errors == {"user": 2}
    assert all(expected in failure for failure in result.failures["user"]), result.failures
    assert all(len(failure) <= 4100 for failure in result.failures["user"])  # trimmed
    assert_still_serving(pool)


def test_a_fork_bomb_is_capped_and_leaves_no_process_behind(pool):
    bomb = """
        import os
        def reward(completion, example):
            while True:
                os.fork()
    """
    result = score(pool, bomb)
    assert result.per_grader["user"] == [0.0]
    assert "Resource temporarily unavailable" in result.failures["user"][0]
    assert_no_processes_left(bomb, strays_only=True)  # the copies are gone; the sandbox may stay warm
    assert_still_serving(pool)
    pool.close()  # and when the sandbox goes, nothing of it is left (the pool starts new ones)
    assert_no_processes_left(bomb)


def test_a_process_left_running_dies_with_its_sandbox(pool):
    linger = """
        import os, time
        def reward(completion, example):
            if os.fork() == 0:
                os.setsid()
                time.sleep(3600)
            return 1.0
    """
    result = score(pool, linger)
    assert result.per_grader["user"] == [1.0]  # the grader itself did nothing wrong
    assert_no_processes_left(linger)
    assert_still_serving(pool)


def test_printing_gigabytes_keeps_only_the_first_kilobyte(pool):
    chatty = """
        import os
        def reward(completion, example):
            for _ in range(1000):
                print("x" * 10**6)  # 1 GB through print
            os.write(1, b"y" * 10**7)  # and straight to the file descriptors
            os.write(2, b"z" * 10**7)
            return 1.0
    """
    result = score(pool, chatty)
    assert result.per_grader["user"] == [1.0]
    output = result.outputs["user"][0]
    assert output.startswith("x" * 1024) and "more characters not kept" in output and len(output) < 1200
    assert_still_serving(pool)


def test_secrets_in_the_environment_and_files_outside_the_working_directory_are_unreachable(
    pool, monkeypatch
):
    monkeypatch.setenv("PREFIX_RFT_DATABASE_URL", f"postgresql://app:{SECRET}@db/app")
    planted = Path(tempfile.mkdtemp(prefix="planted-"))
    try:
        planted.chmod(0o755)
        secret_file = planted / "secret.txt"
        secret_file.write_text(SECRET)
        secret_file.chmod(0o644)  # readable by anyone on the host: only the sandbox's own view hides it
        snoop = f"""
            import os
            PATHS = [{str(secret_file)!r}, {str(ROOT / "service" / "settings.py")!r}, "/etc/passwd",
                     "/etc/hostname", "/proc/self/environ", "/proc/1/environ", "/proc/1/cmdline",
                     "/root/.bash_history", "../secret.txt"]
            def reward(completion, example):
                print("environ", dict(os.environ))
                for path in PATHS:
                    try:
                        print("GOT", path, open(path, "rb").read(200))
                    except OSError as exc:
                        print("refused", path, type(exc).__name__)
                print("listing", sorted(os.listdir("/")))
                return 1.0
        """
        result = score(pool, snoop)
    finally:
        shutil.rmtree(planted)
    output = result.outputs["user"][0]
    assert result.per_grader["user"] == [1.0], result.failures
    assert SECRET not in output and "GOT" not in output, output
    assert "PREFIX_RFT" not in output and "PATH" not in output.split("environ", 1)[1].split("\n")[0]
    # Only the runtime's paths: the top directories of what the sandbox binds, /dev and /tmp.
    listing = ast.literal_eval(output.split("listing ", 1)[1].splitlines()[0])
    runtime = {path.split("/")[1] for path in sandbox_paths()[0]} | {"bin", "lib", "lib32", "lib64", "libx32"}
    assert set(listing) <= runtime | {"dev", "tmp"} and "proc" not in listing and "home" not in listing
    assert_still_serving(pool)


def test_packages_off_the_list_are_not_even_in_the_sandbox():
    # What is importable, not how fast: a cold import of sympy (under math_verify) can take over
    # the suite's 1 s on a loaded machine.
    pool = SandboxPool(LIMITS.model_copy(update={"timeout_seconds": 10}))
    probe = """
        import importlib
        def reward(completion, example):
            for name in ("torch", "fastapi", "service.settings", "core.rewards", "numpy", "regex", "jsonschema"):
                try:
                    importlib.import_module(name)
                    print("imported", name)
                except ImportError as exc:
                    print("refused", name, type(exc).__name__)
            from math_verify import parse, verify
            return float(verify(parse("$\\\\frac{1}{2}$"), parse("0.5")))
    """
    try:
        result = score(pool, probe)
    finally:
        pool.close()
    assert result.per_grader["user"] == [1.0], result.failures
    output = result.outputs["user"][0]
    for name in ("torch", "fastapi", "service.settings", "core.rewards"):
        assert f"refused {name} ModuleNotFoundError" in output, output
    for name in ("numpy", "regex", "jsonschema"):
        assert f"imported {name}" in output


def test_the_grader_runs_as_an_unprivileged_user_in_a_scratch_directory(pool):
    facts = """
        import ctypes, os
        def reward(completion, example):
            open("scratch.txt", "w").write("ok")
            libc = ctypes.CDLL(None, use_errno=True)
            header, sets = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()
            libc.capget(header, sets)
            bounding = [libc.prctl(23, cap) for cap in range(41)]  # PR_CAPBSET_READ
            print("ids", os.getresuid(), os.getresgid(), os.getgroups(), "no_new_privs", libc.prctl(39, 0, 0, 0, 0))
            print("caps", list(sets), "bounding", sum(bounding))
            print("cwd", os.getcwd(), "files", os.listdir("."))
            for name, call in (("mount", lambda: libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)),
                               ("unshare", lambda: libc.unshare(0x10000000)),  # CLONE_NEWUSER
                               ("chroot", lambda: libc.chroot(b"/tmp"))):
                print(name, call(), os.strerror(ctypes.get_errno()))
            return 1.0
    """
    result = score(pool, facts)
    output = result.outputs["user"][0]
    ids = f"ids {(GRADER_ID,) * 3} {(GRADER_ID,) * 3} [] no_new_privs 1"
    assert ids in output and "caps [0, 0, 0, 0, 0, 0] bounding 0" in output, output
    # It may not mount, build namespaces of its own (a chrooted process may not), or chroot.
    assert "mount -1 Operation not permitted" in output
    assert "unshare -1 Operation not permitted" in output and "chroot -1 Operation not permitted" in output
    # On the host: a user id of its own when the service is root, the service's otherwise.
    (namespace,) = namespaces_of(facts)
    uids = set(processes_in(namespace).values())
    assert uids and all(expected_host_uid(uid) for uid in uids), uids
    assert "cwd /tmp files " in output
    files = ast.literal_eval(output.split("files ", 1)[1].splitlines()[0])
    # Besides its own file: only the (read-only) bind of an install that lives under /tmp, if any.
    under_tmp = {path.split("/")[2] for path in sandbox_paths()[0] if path.startswith("/tmp/")}
    assert "scratch.txt" in files and set(files) <= {"scratch.txt"} | under_tmp


def test_closing_the_pool_ends_every_sandbox_process():
    pool = SandboxPool(LIMITS)
    source = "def reward(c, e):\n    return 1.0\n"
    assert score(pool, source).per_grader["user"] == [1.0]
    assert all(processes_in(namespace) for namespace in namespaces_of(source))
    pool.close()
    assert_no_processes_left(source)


# ----- failing closed -----------------------------------------------------------------------------

# ----- as the images run it: user 10001, no capability, Docker's seccomp profile ------------------

SECCOMP_PROFILE = ROOT / "docker" / "seccomp-sandbox.json"
IMAGE_PROBE = """
import json, os, socket, sys, tempfile
from pathlib import Path
from tests.sandbox_support import NamespaceRecorder, load_docker_seccomp, processes_in
args = json.loads(sys.argv[1])
load_docker_seccomp(Path(args["profile"]), ours=args["ours"], without=args["without"])  # as in a container: for everything below
from core.rewards.sandbox import GraderProgram, SandboxLimits, SandboxPool, SandboxUnavailable

status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
report = {"ids": [os.getuid(), os.getgid(), os.getgroups()],
          "caps": [int(status[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")],
          "no_new_privs": status["NoNewPrivs"].strip(), "seccomp": status["Seccomp"].strip()}
# What the worker has that graders must not reach: its files, its environment, a server on loopback.
data = Path(tempfile.mkdtemp(prefix="worker-data-"))
(data / "secret.txt").write_text(args["secret"])
(data / "secret.txt").chmod(0o600)
os.environ["PREFIX_RFT_DATABASE_URL"] = "postgresql://app:" + args["secret"] + "@db/app"
listener = socket.create_server(("127.0.0.1", 0))
graders = {name: source.replace("DATA", str(data)).replace("PORT", str(listener.getsockname()[1]))
           for name, source in args["graders"].items()}
limits = SandboxLimits(require_isolation=args["required"], timeout_seconds=5, cpu_seconds=20, memory_mb=256,
                       max_processes=8, file_size_mb=8, workers=2)
pool = SandboxPool(limits)
with NamespaceRecorder() as recorder:
    try:
        report["isolation"] = pool.check()
        for name, source in graders.items():
            outcome = pool.score(GraderProgram(source), [""], ["x"], [{"answer": "x"}])[0]
            report[name] = {"score": outcome.score, "error": outcome.error, "output": outcome.output}
            # the host's view of its sandbox, while it is warm
            report[name]["host_uids"] = sorted({uid for ns in recorder.served.get(source, ())
                                                for uid in processes_in(ns).values()})
    except SandboxUnavailable as exc:
        report["refused"] = str(exc)
    pool.close()
report["left"] = {ns: processes_in(ns) for spaces in recorder.served.values() for ns in spaces if processes_in(ns)}
report["planted"] = [str(p) for p in (data / "planted", Path("/usr/lib/planted")) if p.exists()]
print(json.dumps(report))
"""
IMAGE_GRADERS = {
    "good": "def reward(c, e):\n    return float(c == e['answer'])\n",
    "identity": """
import ctypes, os
def reward(c, e):
    libc = ctypes.CDLL(None, use_errno=True)
    header, sets = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()
    libc.capget(header, sets)
    print("ids", os.getresuid(), os.getresgid(), os.getgroups(), "caps", list(sets))
    for name, call in (("mount", lambda: libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)),
                       ("unshare", lambda: libc.unshare(0x10000000)),
                       ("chroot", lambda: libc.chroot(b"/tmp"))):
        print(name, call(), os.strerror(ctypes.get_errno()))
    return 1.0
""",
    "files": """
import os
def reward(c, e):
    print("environ", dict(os.environ))
    for path in ("/etc/shadow", "/etc/passwd", "DATA/secret.txt", "/proc/1/environ", "/proc/self/environ"):
        try:
            print("GOT", path, open(path).read(100))
        except OSError as exc:
            print("refused", path, type(exc).__name__)
    for path in ("/usr/lib/planted", "DATA/planted"):
        try:
            open(path, "w").write("x")
            print("WROTE", path)
        except OSError as exc:
            print("refused", path, exc.strerror)
    return 1.0
""",
    "network": """
import socket
def reward(c, e):
    try:
        socket.create_connection(("127.0.0.1", PORT), timeout=2)
        print("CONNECTED")
    except OSError as exc:
        print("loopback", exc.strerror)
    try:
        socket.getaddrinfo("example.com", 443)
        print("RESOLVED")
    except OSError as exc:
        print("dns", type(exc).__name__)
    return 1.0
""",
    "fork_bomb": "import os\ndef reward(c, e):\n    while True:\n        os.fork()\n",
}


def run_as_image_user(required: bool = True, ours: bool = True, without: tuple[str, ...] = ()) -> dict:
    reason = can_run_as_image_user()
    if reason:
        missing(reason)
    arguments = {
        "profile": str(SECCOMP_PROFILE),
        "ours": ours,
        "without": without,
        "required": required,
        "secret": SECRET,
        "graders": IMAGE_GRADERS,
    }
    command, scratch = image_user_command([sys.executable, "-c", IMAGE_PROBE, json.dumps(arguments)])
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    # It ran as the images run: user 10001 (or this unprivileged user), no capability, under seccomp.
    uid = IMAGE_UID if os.geteuid() == 0 else os.geteuid()
    assert report["ids"][0] == uid and report["caps"][1:3] == [0, 0] and report["seccomp"] == "2", report
    if os.geteuid() == 0:
        assert report["ids"] == [IMAGE_UID, IMAGE_UID, []] and report["caps"] == [0] * 5, report
        assert report["no_new_privs"] == "1"
    return report


def test_as_the_images_run_it_python_graders_score_and_hostile_code_is_contained():
    """User 10001, no capability, Docker's default seccomp profile plus the sandbox's three rules."""
    report = run_as_image_user()
    assert report["isolation"].startswith("namespaces user,net,mnt,pid,ipc,uts; private read-only root")
    assert report["good"]["score"] == 1.0, report["good"]
    identity = report["identity"]
    expected = f"ids {(GRADER_ID,) * 3} {(GRADER_ID,) * 3} [] caps [0, 0, 0, 0, 0, 0]"
    assert identity["error"] is None and expected in identity["output"], identity
    for call in ("mount", "unshare", "chroot"):
        assert f"{call} -1 Operation not permitted" in identity["output"], identity
    # On the host the sandbox runs as the service's user: one id is all a user namespace maps
    # without privileges. Its files stay out of reach all the same (below): not by id, by view.
    assert identity["host_uids"] == [report["ids"][0]], identity
    files = report["files"]["output"]
    assert SECRET not in files and "GOT" not in files and "WROTE" not in files, files
    assert "PREFIX_RFT" not in files
    assert "refused /usr/lib/planted Read-only file system" in files, files
    assert report["planted"] == []
    network = report["network"]["output"]
    assert "loopback Network is unreachable" in network and "dns gaierror" in network, network
    bomb = report["fork_bomb"]
    assert bomb["score"] is None and "Resource temporarily unavailable" in bomb["error"], bomb
    assert report["left"] == {}, report["left"]  # nothing of any sandbox outlives the pool


def test_under_docker_s_default_seccomp_profile_user_code_is_refused_unless_the_deployment_opts_out():
    """Without the profile's rules (Docker's default: no unshare, no mount) the shipped images refuse."""
    refused = run_as_image_user(ours=False)
    message = refused["refused"]
    assert message.startswith("cannot create the user, network, mount and PID namespaces"), message
    assert "Operation not permitted" in message and "docker/seccomp-sandbox.json" in message
    assert "PREFIX_RFT_SANDBOX_REQUIRE_ISOLATION=false" in message and "good" not in refused

    opted_out = run_as_image_user(required=False, ours=False)
    assert opted_out["isolation"].startswith("no namespaces"), opted_out
    assert opted_out["good"]["score"] == 1.0  # rlimits, the empty environment and time limits only


def test_where_mounts_are_refused_user_code_is_refused_unless_the_deployment_opts_out():
    """Docker's AppArmor profile denies mount (EACCES); here the seccomp profile without its mount
    rule does the same (EPERM): the namespaces are made, the private root cannot be."""
    refused = run_as_image_user(without=("mount",))
    message = refused["refused"]
    assert message.startswith("cannot build the sandbox's filesystem ("), message
    assert "Operation not permitted" in message and "AppArmor" in message and "good" not in refused

    opted_out = run_as_image_user(required=False, without=("mount",))
    assert opted_out["isolation"].startswith("namespaces user,net,pid,ipc,uts; host filesystem"), opted_out
    assert opted_out["good"]["score"] == 1.0
    assert "loopback Network is unreachable" in opted_out["network"]["output"]  # still no network
    assert opted_out["fork_bomb"]["score"] is None and opted_out["left"] == {}  # nor strays


def test_as_root_the_grader_still_gets_a_host_user_id_of_its_own(pool):
    if os.geteuid() != 0:
        pytest.skip("runs as root only (the images run as 10001: see the tests above)")
    source = "def reward(c, e):\n    return 1.0\n"
    assert score(pool, source).per_grader["user"] == [1.0]
    uids = {uid for namespace in namespaces_of(source) for uid in processes_in(namespace).values()}
    assert uids and all(uid >= SANDBOX_UID_BASE for uid in uids), uids


def test_a_sandbox_that_cannot_start_is_reported_not_scored_as_zero(monkeypatch):
    monkeypatch.setattr("core.rewards.sandbox.SERVER", Path("/nonexistent/sandbox_server.py"))
    with pytest.raises(SandboxUnavailable, match="did not start"):
        SandboxPool(LIMITS).score(GraderProgram("def reward(c, e):\n    return 1\n"), [""], ["x"], [{}])


def test_nan_from_the_sandbox_is_refused_by_the_same_check_as_declarative_graders(pool):
    outcome = pool.score(GraderProgram("def reward(c, e):\n    return float('nan')\n"), [""], ["x"], [{}])[0]
    assert outcome.error is None and math.isnan(outcome.score)  # the pool reports what it got...
    result = score(pool, "def reward(c, e):\n    return float('nan')\n")
    assert result.totals == [0.0] and result.errors == {"user": 1}  # ...score_completions refuses it
