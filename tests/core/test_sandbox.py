"""The reward sandbox, run for real: hostile graders are contained and the pool keeps serving.

Every hostile case goes through score_completions, as training and the reward test endpoint do,
and is followed by a good sample on the same pool. Limits are small (1 s, 256 MB) to stay fast.
"""

from __future__ import annotations

import ast
import math
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
from core.rewards.sandbox_server import SANDBOX_UID_BASE
from tests.conftest import REPO, missing

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


def processes_of(uid: int, strays_only: bool = False) -> list[int]:
    """Host pids of the processes running as `uid`; with strays_only, all but the sandbox's server.

    A sandbox's uid is SANDBOX_UID_BASE + the pid of its outer process, whose child is the server.
    """
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        server = int(fields["PPid"]) == uid - SANDBOX_UID_BASE
        if int(fields["Uid"].split()[0]) == uid and not (strays_only and server):
            found.append(int(status.parent.name))
    return found


def assert_no_processes_left(uid: int, strays_only: bool = False, within: float = 5.0) -> None:
    assert uid >= SANDBOX_UID_BASE
    deadline = time.monotonic() + within
    while processes_of(uid, strays_only) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_of(uid, strays_only) == [], f"processes of sandbox uid {uid} outlived their sample"


def reported_uid(output: str) -> int:
    return int(next(line for line in output.splitlines() if line.startswith("uid ")).split()[1])


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
            print("uid", os.getuid())
            while True:
                os.fork()
    """
    result = score(pool, bomb)
    assert result.per_grader["user"] == [0.0]
    assert "Resource temporarily unavailable" in result.failures["user"][0]
    uid = reported_uid(result.outputs["user"][0])
    assert_no_processes_left(uid, strays_only=True)  # the copies are gone; the sandbox may stay warm
    assert_still_serving(pool)
    pool.close()  # and when the sandbox goes, nothing of it is left (the pool starts new ones)
    assert_no_processes_left(uid)


def test_a_process_left_running_dies_with_its_sandbox(pool):
    linger = """
        import os, time
        def reward(completion, example):
            print("uid", os.getuid())
            if os.fork() == 0:
                os.setsid()
                time.sleep(3600)
            return 1.0
    """
    result = score(pool, linger)
    assert result.per_grader["user"] == [1.0]  # the grader itself did nothing wrong
    assert_no_processes_left(reported_uid(result.outputs["user"][0]))
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
            PATHS = [{str(secret_file)!r}, {str(REPO / "service" / "settings.py")!r}, "/etc/passwd",
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
        import os
        def reward(completion, example):
            open("scratch.txt", "w").write("ok")
            print("uid", os.getuid(), "cwd", os.getcwd(), "files", os.listdir("."))
            return 1.0
    """
    result = score(pool, facts)
    output = result.outputs["user"][0]
    assert reported_uid(output) >= SANDBOX_UID_BASE and "cwd /tmp files " in output
    files = ast.literal_eval(output.split("files ", 1)[1].splitlines()[0])
    # Besides its own file: only the (read-only) bind of an install that lives under /tmp, if any.
    under_tmp = {path.split("/")[2] for path in sandbox_paths()[0] if path.startswith("/tmp/")}
    assert "scratch.txt" in files and set(files) <= {"scratch.txt"} | under_tmp


def test_closing_the_pool_ends_every_sandbox_process():
    pool = SandboxPool(LIMITS)
    result = score(pool, "import os\ndef reward(c, e):\n    print('uid', os.getuid())\n    return 1.0\n")
    uid = reported_uid(result.outputs["user"][0])
    assert processes_of(uid)
    pool.close()
    assert_no_processes_left(uid)


# ----- failing closed -----------------------------------------------------------------------------

WITHOUT_SYS_ADMIN = ["setpriv", "--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin", "--"]
PROBE = """
import sys
from core.rewards.sandbox import GraderProgram, SandboxLimits, SandboxPool, SandboxUnavailable
pool = SandboxPool(SandboxLimits(require_isolation={required}))
try:
    print(pool.check())
    program = GraderProgram("import os\\ndef reward(c, e):\\n    return os.getuid()\\n")
    print("score", pool.score(program, [""], ["x"], [{{}}])[0].score)
except SandboxUnavailable as exc:
    print("refused:", exc)
pool.close()
"""


def test_without_the_privilege_to_isolate_user_code_is_refused_unless_the_deployment_opts_out():
    if shutil.which("setpriv") is None:
        missing("util-linux's setpriv is needed to drop CAP_SYS_ADMIN")

    def run(required: bool) -> str:
        command = [*WITHOUT_SYS_ADMIN, sys.executable, "-c", PROBE.format(required=required)]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    refused = run(required=True)
    assert refused.startswith("refused: cannot create the network, mount and PID namespaces"), refused
    assert "PREFIX_RFT_SANDBOX_REQUIRE_ISOLATION=false" in refused and "score" not in refused

    opted_out = run(required=False)
    assert opted_out.startswith("no namespaces"), opted_out
    uid = float(opted_out.split("score")[1])
    assert uid >= SANDBOX_UID_BASE  # still never root, and still within its rlimits


def test_a_sandbox_that_cannot_start_is_reported_not_scored_as_zero(monkeypatch):
    monkeypatch.setattr("core.rewards.sandbox.SERVER", Path("/nonexistent/sandbox_server.py"))
    with pytest.raises(SandboxUnavailable, match="did not start"):
        SandboxPool(LIMITS).score(GraderProgram("def reward(c, e):\n    return 1\n"), [""], ["x"], [{}])


def test_nan_from_the_sandbox_is_refused_by_the_same_check_as_declarative_graders(pool):
    outcome = pool.score(GraderProgram("def reward(c, e):\n    return float('nan')\n"), [""], ["x"], [{}])[0]
    assert outcome.error is None and math.isnan(outcome.score)  # the pool reports what it got...
    result = score(pool, "def reward(c, e):\n    return float('nan')\n")
    assert result.totals == [0.0] and result.errors == {"user": 1}  # ...score_completions refuses it
