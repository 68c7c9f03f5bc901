"""llama.cpp's `llama-server` as a peer for the serving benchmark: built on demand, then cached.

A benchmark dependency only (the tests never need it). The source is the llama.cpp tree vendored
in the `llama-cpp-python` source distribution from the package index, built with cmake (the
`llama-server` target alone, native CPU flags, no curl) under ~/.cache/prefix-rft/llama.cpp-VERSION.
Our model's weights (the safetensors the trainer loads, converted once from the shipped GGUF) are
written back to a bfloat16 GGUF by the tree's own convert_hf_to_gguf.py, so both servers decode
the same weights in the same precision.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

log = logging.getLogger("benchmarks.llama_cpp_peer")

VERSION = "0.3.36"  # llama-cpp-python's, whose sdist vendors the llama.cpp tree
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "prefix-rft" / f"llama.cpp-{VERSION}"


def llama_tree() -> Path:
    """The vendored llama.cpp source tree, downloaded and unpacked once."""
    tree = CACHE / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if tree.is_dir():
        return tree
    CACHE.mkdir(parents=True, exist_ok=True)
    log.info("downloading the llama-cpp-python %s source distribution", VERSION)
    download = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
    subprocess.run([*download, f"llama-cpp-python=={VERSION}", "-d", str(CACHE)], check=True)
    with tarfile.open(CACHE / f"llama_cpp_python-{VERSION}.tar.gz") as archive:
        archive.extractall(CACHE, filter="data")
    return tree


def llama_server() -> Path:
    """The `llama-server` binary, built once (about 10 minutes on 2 cores)."""
    tree = llama_tree()
    binary = tree / "build" / "bin" / "llama-server"
    if binary.is_file():
        return binary
    if shutil.which("cmake") is None:
        raise SystemExit("building llama.cpp needs cmake and a C++ compiler")
    log.info("building llama-server in %s (once)", tree / "build")
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF"]
    flags += ["-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON"]
    subprocess.run(["cmake", "-S", str(tree), "-B", str(tree / "build"), *flags], check=True)
    jobs = str(os.cpu_count() or 1)
    subprocess.run(
        ["cmake", "--build", str(tree / "build"), "--target", "llama-server", "-j", jobs], check=True
    )
    return binary


def bf16_gguf(model_dir: Path) -> Path:
    """`model_dir` (a transformers checkpoint) as a bfloat16 GGUF, converted once."""
    target = CACHE / f"{model_dir.name}-bf16.gguf"
    if target.is_file():
        return target
    tree = llama_tree()
    partial = target.with_suffix(".partial")
    env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py")}
    command = [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", "bf16"]
    subprocess.run([*command, "--outfile", str(partial)], check=True, env=env, stdout=subprocess.DEVNULL)
    partial.rename(target)
    return target


def start(gguf: Path, port: int, parallel: int, context_per_slot: int, threads: int, log_file: Path):
    """`llama-server` on 127.0.0.1:port with `parallel` slots; returns the process once it is healthy."""
    import httpx

    command = [str(llama_server()), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--parallel", str(parallel), "-c", str(parallel * context_per_slot), "-t", str(threads)]
    command += ["--threads-batch", str(threads), "--no-webui"]
    handle = log_file.open("wb")
    server = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(log_file.read_text(errors="replace")[-3000:])
        time.sleep(0.2)
