"""What every benchmark result records about where it came from: command, commit, date, machine."""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def provenance(command: str, out: Path | None) -> dict[str, Any]:
    """Commit (with the paths that differ from it, if any; the result file aside), date, machine."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    status = ["git", "status", "--porcelain", "--", "."] + ([f":!{out}"] if out else [])
    dirty = subprocess.run(status, capture_output=True, text=True).stdout.split("\n")
    dirty = [line[3:] for line in dirty if line.strip()]
    return {
        "command": command,
        "commit": commit,
        "uncommitted_changes": dirty,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
    }


def machine() -> dict[str, Any]:
    cpu, flags = platform.processor(), []
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        fields = [line.split(":", 1) for line in cpuinfo.read_text().splitlines() if ":" in line]
        cpu = next((value.strip() for key, value in fields if key.strip() == "model name"), cpu)
        flags = next((value.split() for key, value in fields if key.strip() == "flags"), [])
    # bfloat16's speed, and its kernels' rounding, depend on these more than on the model name.
    native_bf16 = [flag for flag in ("amx_bf16", "avx512_bf16") if flag in flags]
    return {"cpu": cpu, "cores": os.cpu_count(), "native_bf16": native_bf16, "platform": platform.platform()}


def write_report(out: Path, report: dict[str, Any]) -> None:
    """A benchmark's result as indented JSON at `out` (folders made as needed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    logging.getLogger("benchmarks").info("wrote %s", out)


def spread(values) -> dict[str, float]:
    """A headline: the median of the runs, with their range."""
    values = list(values)
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
