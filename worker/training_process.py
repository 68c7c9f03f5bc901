"""One rank of a job that trains in several processes; the worker starts them with torchrun.

    python -m worker.training_process --launch N RUN_DIR
        torchrun in this process (it dies with the worker that started it), which starts N of
    python -m worker.training_process RUN_DIR

RUN_DIR (written by `worker.runner.JobRun`, private to the attempt) holds `request.json`: the job
id, the attempt, the parsed config, the checkpoint to resume from and the deployment's settings.
Rank 0 reports as the worker would in process (`_Reporter`: metrics, events, samples and
checkpoints in the database and storage, every write fenced by the attempt) and asks, between
steps, whether to stop: when the job is cancelled or paused, and when `RUN_DIR/stop` exists (the
worker got SIGTERM or lost its lease). The worker keeps the lease. How it ended goes to
`RUN_DIR/result.json` (rank 0) or `RUN_DIR/error-<rank>.json`, which the worker reads back.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from core.config import parse_config
from core.distributed import Ranks
from core.errors import InvalidInput
from core.rewards import SandboxLimits, SandboxUnavailable
from core.trainer import Trainer
from service.db import make_engine, make_sessionmaker
from service.judge import ChatJudge
from service.lifecycle import LostJob, stop_requested
from service.queue import make_celery
from service.settings import Settings
from service.storage import open_storage
from worker.runner import JobRun, WorkerServices, _Reporter

log = logging.getLogger(__name__)

REQUEST, RESULT, STOP = "request.json", "result.json", "stop"


def error_file(run_dir: Path, rank: int) -> Path:
    return run_dir / f"error-{rank}.json"


ERROR_KINDS = ("lost", "invalid_input", "sandbox_unavailable", "training_error")  # which to believe first


def first_error(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """The ranks' error that says what went wrong: one of the first kind in ERROR_KINDS, the
    earliest of them (the others' errors are often only that a peer went away)."""
    return min(errors, key=lambda e: (ERROR_KINDS.index(e["kind"]), e["time"]))


def error_kind(exc: BaseException) -> str:
    """How the worker treats an error a rank raised (worker.runner.JobRun.run's cases)."""
    if isinstance(exc, LostJob):
        return "lost"
    if isinstance(exc, InvalidInput):
        return "invalid_input"
    if isinstance(exc, SandboxUnavailable):
        return "sandbox_unavailable"
    return "training_error"


class _RankRun(JobRun):
    """The job as rank 0 reports it: the worker's writes, and its stop requests through a file."""

    def __init__(self, services: WorkerServices, job_id: str, attempt: int, stop_file: Path):
        super().__init__(services, job_id, attempt)
        self.stop_file = stop_file

    def should_stop(self) -> bool:
        if self.stop_file.exists():
            return True
        return self.commit(lambda session: stop_requested(session, self.job_id))


def _services(settings: Settings) -> WorkerServices:
    storage = open_storage(
        settings.storage_url, s3_endpoint_url=settings.s3_endpoint_url, s3_region=settings.s3_region
    )
    engine = make_engine(settings.database_url, idle_in_transaction_seconds=settings.lease_seconds)
    return WorkerServices(settings, make_sessionmaker(engine), storage, make_celery(settings))


def train_rank(run_dir: Path, ranks: Ranks) -> None:
    request: dict[str, Any] = json.loads((run_dir / REQUEST).read_text())
    settings = Settings.model_validate(request["settings"])
    config = parse_config(request["config"])
    callbacks = []
    if ranks.is_main:
        run = _RankRun(_services(settings), request["job_id"], request["attempt"], run_dir / STOP)
        callbacks.append(_Reporter(run, config.training.steps))
    trainer = Trainer(
        config,
        callbacks=callbacks,
        sandbox_limits=SandboxLimits.from_settings(settings),
        judge=ChatJudge(settings.judge_models),
        ranks=ranks,
    )
    resume = request.get("resume_from")
    result = trainer.train(resume_from=Path(resume) if resume else None)
    if ranks.is_main:
        done = asdict(result) | {"adapter_dir": str(result.adapter_dir) if result.adapter_dir else None}
        (run_dir / RESULT).write_text(json.dumps(done))


def launch(processes: int, run_dir: Path) -> int:
    """torchrun on this machine with `processes` ranks; SIGTERM when the parent dies (Linux)."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    from torch.distributed.run import main as torchrun

    torchrun(
        ["--standalone", "--nproc_per_node", str(processes), "-m", "worker.training_process", str(run_dir)]
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="worker.training_process")
    parser.add_argument("--launch", type=int, metavar="N", help="start N ranks with torchrun")
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    if args.launch:
        return launch(args.launch, args.run_dir)
    device = json.loads((args.run_dir / REQUEST).read_text())["config"]["training"]["device"]
    ranks = Ranks.from_environment(device)
    logging.basicConfig(
        level=logging.INFO if ranks.is_main else logging.WARNING,
        format=f"%(levelname)s rank {ranks.rank} %(name)s: %(message)s",
    )
    try:
        train_rank(args.run_dir, ranks)
    except BaseException as exc:
        log.exception("rank %d failed", ranks.rank)
        message = (
            str(exc) if isinstance(exc, InvalidInput | SandboxUnavailable) else f"{type(exc).__name__}: {exc}"
        )
        error_file(args.run_dir, ranks.rank).write_text(
            json.dumps({"kind": error_kind(exc), "message": message, "time": time.time()})
        )
        return 1
    finally:
        ranks.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
