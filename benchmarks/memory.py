"""Where the peak memory of our trainer goes, on the throughput benchmark's work (LoRA, bf16 auto).

    python -m benchmarks.memory --out docs/benchmarks/memory.json

One fresh process per configuration trains a few steps of `benchmarks.throughput_vs_trl`'s `ours`
contender while a thread samples its resident set every 2 ms, labelled by the phase the trainer
is in (model load, rollouts, policy update). Beside the resident set, what torch holds is counted
directly: parameters by dtype, the decoder's prepacked copy of the projections, the rollout KV
cache at its largest, the tensors autograd saves for backward in one micro-batch (parameters
aside), gradients and AdamW state. What is left of a phase's peak is the allocator's: memory
freed by torch that glibc malloc has not handed back, and what transient tensors add.

Configurations (`--configs`), which differ only in the C allocator under torch:
- `default`: glibc malloc as it comes;
- `trim`: glibc with `MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_` set, so that freed
  memory goes back to the system at once;
- `jemalloc` and `tcmalloc`: those allocators preloaded (`LD_PRELOAD`; Debian's packages
  libjemalloc2 and libtcmalloc-minimal4).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("benchmarks.memory")

_MIB = 1024 * 1024
# glibc tunables of the `trim` configuration: blocks of 1 MiB or more come from mmap (returned on
# free) and the heap is trimmed when 16 MiB at its top are free.
TRIM_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_TRIM_THRESHOLD_": str(16 << 20)}
PRELOADED = {
    "jemalloc": ("libjemalloc.so.2", "libjemalloc2"),
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc-minimal4"),  # core.allocator.TCMALLOC
}
CONFIGS = ("default", "trim", *PRELOADED)


def config_environment(name: str) -> dict[str, str]:
    """The environment variables a configuration's process starts with."""
    if name == "trim":
        return dict(TRIM_ENV)
    if name in PRELOADED:
        from core.allocator import find_library

        library, package = PRELOADED[name]
        found = find_library(library)
        if found is None:
            raise SystemExit(
                f"{library} not found: install the {package} package, or leave out --configs {name}"
            )
        return {"LD_PRELOAD": str(found)}
    return {}


class PhaseSampler:
    """Samples the process's RSS (from /proc/self/statm) in a thread; keeps each phase's peak."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.phase = "start"
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.rss()
            if rss > self.peaks.get(self.phase, 0):
                self.peaks[self.phase] = rss
            time.sleep(self.interval_s)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def measure(config_name: str, steps: int, result_file: str) -> None:
    """In a fresh process: train `steps` steps and write the breakdown to `result_file`."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    sampler = PhaseSampler()
    sampler.start()
    rss_interpreter = sampler.rss()

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    rss_torch = sampler.rss()
    import core.decoding as decoding
    import core.trainer as trainer_module
    from benchmarks.throughput_vs_trl import Settings, ours_config, peak_rss_bytes, write_dataset
    from core.models import resolve_model_dir
    from core.reporting import TrainerCallback
    from core.rollout import decoder_for

    rss_libraries = sampler.rss()

    cache_bytes = [0]
    original_reserve = decoding.KVCache.reserve

    def reserve(self, rows: int, columns: int) -> None:
        original_reserve(self, rows, columns)
        cache_bytes[0] = max(cache_bytes[0], self.keys.nbytes + self.values.nbytes)

    decoding.KVCache.reserve = reserve

    # Tensors saved for backward during a micro-batch's forward, parameters excluded (they are
    # counted as weights). The pack hook sees every saved tensor; unique storages are summed.
    saved: dict[int, int] = {}
    saved_peaks: list[int] = []
    original_log_probs = trainer_module.response_log_probs

    def response_log_probs(model, *args, **kwargs):
        if not torch.is_grad_enabled():
            return original_log_probs(model, *args, **kwargs)
        parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved.clear()

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in parameters:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = original_log_probs(model, *args, **kwargs)
        saved_peaks.append(sum(saved.values()))
        return out

    trainer_module.response_log_probs = response_log_probs

    def in_phase(name: str, method):
        def wrapped(*args, **kwargs):
            previous, sampler.phase = sampler.phase, name
            try:
                return method(*args, **kwargs)
            finally:
                sampler.phase = previous

        return wrapped

    Trainer = trainer_module.Trainer
    Trainer.generate_rollouts = in_phase("rollouts", Trainer.generate_rollouts)
    Trainer.policy_update = in_phase("policy update", Trainer.policy_update)

    with tempfile.TemporaryDirectory(prefix="memory-") as tmp:
        work_dir = Path(tmp)
        data_file = work_dir / "additions.jsonl"
        write_dataset(data_file, steps * 4, seed=0)
        settings = Settings(
            steps=steps, model_dir=str(resolve_model_dir("smollm2-135m-instruct")), data_file=str(data_file)
        )
        config = ours_config(settings, work_dir)
        sampler.phase = "model load"
        step_times: list[float] = []

        class StepTimes(TrainerCallback):
            def on_step(self, metrics: dict[str, Any]) -> None:
                step_times.append(metrics["step_time_s"])

        trainer = Trainer(config, callbacks=[StepTimes()])
        rss_loaded = sampler.rss()
        decoder = decoder_for(trainer.model)  # built here (not in the first rollout) to measure it
        rss_decoder = sampler.rss()
        sampler.phase = "other"
        trainer.train()
    sampler.stop()

    model = trainer.model
    weights: dict[str, int] = {}
    for p in model.parameters():
        key = f"{'adapter' if p.requires_grad else 'base'} {str(p.dtype).removeprefix('torch.')}"
        weights[key] = weights.get(key, 0) + p.nbytes
    # oneDNN's packed weights are opaque tensors (no storage to count): their nominal size.
    packed = sum(
        projection.weight.numel() * projection.weight.element_size()
        for projection in [decoder.head, *(p for layer in decoder.layers for p in layer.projections.values())]
        if projection.packed is not None
    )
    adapter_bytes = sum(p.nbytes for p in trainer.params)
    optimizer_bytes = sum(
        v.nbytes for state in trainer.optimizer.state.values() for v in state.values() if torch.is_tensor(v)
    )
    result = {
        "config": config_name,
        "environment": config_environment(config_name),
        "rss_bytes": {
            "interpreter": rss_interpreter,
            "after_import_torch": rss_torch,
            "after_import_libraries": rss_libraries,
            "after_model_load": rss_loaded,
            "after_decoder_build": rss_decoder,
            "peak": peak_rss_bytes(),
        },
        "phase_peak_rss_bytes": sampler.peaks,
        "tensor_bytes": {
            **{f"parameters ({k})": v for k, v in sorted(weights.items())},
            "decoder prepacked projections (bf16 copy)": packed,
            "rollout KV cache (largest)": cache_bytes[0],
            "saved for backward, one micro-batch (largest)": max(saved_peaks, default=0),
            "gradients": adapter_bytes,
            "AdamW state": optimizer_bytes,
        },
        "micro_batches": len(saved_peaks),
        "step_times_s": step_times,
    }
    Path(result_file).write_text(json.dumps(result))


def run_in_child(config_name: str, steps: int, work_dir: Path) -> dict[str, Any]:
    """A fresh spawned interpreter per configuration, with its malloc settings in the environment."""
    result_file = work_dir / f"{config_name}.json"
    saved_env = dict(os.environ)
    os.environ.update(config_environment(config_name))  # read when the child process starts
    try:
        process = multiprocessing.get_context("spawn").Process(
            target=measure, args=(config_name, steps, str(result_file)), name=config_name
        )
        process.start()
        process.join()
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
    if process.exitcode != 0 or not result_file.is_file():
        raise RuntimeError(f"the {config_name} process failed (exit code {process.exitcode}); see above")
    return json.loads(result_file.read_text())


# What each phase holds besides the model: the decoder (packed weights, KV cache) lives only
# during rollouts, the activations kept for backward only during the update.
PHASE_PARTS = {
    "rollouts": ("decoder prepacked projections (bf16 copy)", "rollout KV cache (largest)"),
    "policy update": ("saved for backward, one micro-batch (largest)",),
}
ALWAYS = ("gradients", "AdamW state")


def breakdown(result: dict[str, Any], phase: str) -> list[tuple[str, float]]:
    """A phase's peak RSS, split into what it is made of (MiB); the rest is the allocator's."""
    rss, tensors = result["rss_bytes"], result["tensor_bytes"]
    parameters = {k: v for k, v in tensors.items() if k.startswith("parameters")}
    parts = [
        ("Python + torch + libraries", rss["after_import_libraries"]),
        (
            "model load beyond its parameters (tokenizer, load buffers kept by malloc)",
            rss["after_model_load"] - rss["after_import_libraries"] - sum(parameters.values()),
        ),
        *parameters.items(),
        *((k, tensors[k]) for k in ALWAYS + PHASE_PARTS[phase]),
    ]
    peak = result["phase_peak_rss_bytes"][phase]
    parts.append(("rest: memory malloc keeps, transients", peak - sum(v for _, v in parts)))
    return [(name, value / _MIB) for name, value in parts]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from benchmarks.provenance import provenance, spread, write_report
    from core.models import resolve_model_dir

    origin = provenance(
        shlex.join(["python", "-m", "benchmarks.memory", *argv]), args.out
    )  # the code that runs
    resolve_model_dir("smollm2-135m-instruct")  # converted from GGUF once, outside the measured children
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.configs}
    with tempfile.TemporaryDirectory(prefix="memory-bench-") as tmp:
        for repeat in range(args.repeats):
            for name in args.configs:
                log.info("run %d/%d: %s ...", repeat + 1, args.repeats, name)
                runs[name].append(run_in_child(name, args.steps, Path(tmp)))

    headlines, lines = {}, []
    for name in args.configs:
        peaks = [r["rss_bytes"]["peak"] / _MIB for r in runs[name]]
        steps = [statistics.median(r["step_times_s"][1:]) for r in runs[name]]  # the first is a warm-up
        median_run = sorted(runs[name], key=lambda r: r["rss_bytes"]["peak"])[len(runs[name]) // 2]
        headlines[name] = {
            "peak_rss_mib": spread(peaks),
            "step_time_s": spread(steps),
            "breakdown_mib_of_median_run": {
                phase: dict(breakdown(median_run, phase)) for phase in PHASE_PARTS
            },
        }
        lines.append(
            f"{name}: peak RSS {statistics.median(peaks):.0f} MiB [{min(peaks):.0f}-{max(peaks):.0f}], "
            f"step {statistics.median(steps):.1f} s [{min(steps):.1f}-{max(steps):.1f}]"
        )
        for phase in PHASE_PARTS:
            lines.append(f"  {phase} peak {median_run['phase_peak_rss_bytes'][phase] / _MIB:.0f} MiB:")
            lines += [f"    {value:6.0f} MiB  {part}" for part, value in breakdown(median_run, phase)]
    text = "\n".join(lines)
    log.info("%s", text)
    if args.out is not None:
        report = {
            **origin,
            "steps": args.steps,
            "headlines": headlines,
            "runs": runs,
            "table": lines,
        }
        write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
