"""Running one job: claim it, fetch its data, train, report, store the adapter.

Every database write goes through service.lifecycle, fenced by the attempt number; a worker
that finds the job gone (cancelled, or claimed by another attempt) stops and writes nothing.
Objects are written under the attempt's own keys before their rows, so a late worker cannot
overwrite what the current one stored either. How an attempt ends:
- what the user must fix (core.errors.InvalidInput: config, data, model, reward) fails the job
  at once; retrying cannot help;
- any other error, a stray ValueError included, queues the job again, until it has failed
  max_attempts times;
- SIGTERM (worker/shutdown.py) checkpoints and releases the job for another worker;
- a worker killed outright stops renewing its lease, and the reaper re-queues the job.
A re-queued job resumes from its last stored checkpoint.

A job asking for several processes (training.processes, or the worker's train_processes) trains
in torchrun's children (worker/training_process.py); its rank 0 reports as this process would,
while this process keeps the lease and passes SIGTERM and a lost lease on as a stop request.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import logging
import math
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from celery import Celery
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from core.config import ConfigError, TrainConfig, parse_config
from core.errors import InvalidInput
from core.reporting import TrainerCallback, TrainResult
from core.rewards import SandboxLimits, SandboxUnavailable
from core.trainer import Trainer
from service.db import connection_lost, make_engine, make_sessionmaker, transaction
from service.judge import ChatJudge
from service.lifecycle import (
    LostJob,
    add_event,
    assert_owned,
    claim_job,
    finish_job,
    pause_finished,
    release_job,
    renew_lease,
    retry_or_fail,
    stop_requested,
    update_job,
)
from service.queue import dispatch_job, make_celery
from service.results import results_csv
from service.settings import Settings, get_settings
from service.storage import ObjectNotFound, Storage, open_storage
from service.tables import (
    RESULTS_PURPOSE,
    Artifact,
    Checkpoint,
    Dataset,
    Job,
    JobMetric,
    JobSample,
    JobStatus,
    fine_tuned_model_name,
    new_id,
)
from worker import shutdown

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class WorkerServices:
    settings: Settings
    sessions: sessionmaker[Session]
    storage: Storage
    celery: Celery  # to send a released or retried job's message


@functools.cache
def worker_services() -> WorkerServices:
    """One engine and storage client per worker process."""
    settings = get_settings()
    storage = open_storage(
        settings.storage_url, s3_endpoint_url=settings.s3_endpoint_url, s3_region=settings.s3_region
    )
    engine = make_engine(settings.database_url, idle_in_transaction_seconds=settings.lease_seconds)
    sessions = make_sessionmaker(engine)
    return WorkerServices(settings, sessions, storage, make_celery(settings))


def run_job(job_id: str, services: WorkerServices | None = None) -> None:
    services = services or worker_services()
    worker_id = f"{socket.gethostname()}:{os.getpid()}"
    with transaction(services.sessions) as session:
        attempt = claim_job(session, job_id, worker_id, services.settings.lease_seconds)
        if attempt is None:  # a duplicate delivery, or cancelled before it started
            log.info("job %s: nothing to claim", job_id)
            return
        add_event(session, job_id, f"started on {worker_id} (attempt {attempt})")
    JobRun(services, job_id, attempt).run()


class JobRun:
    def __init__(self, services: WorkerServices, job_id: str, attempt: int):
        self.services, self.job_id, self.attempt = services, job_id, attempt
        self.log = logging.LoggerAdapter(log, {"job_id": job_id, "attempt": attempt})
        self.lost = threading.Event()
        self._stop_heartbeat = threading.Event()

    # ----- the whole run ----------------------------------------------------------------------

    def run(self) -> None:
        heartbeat = threading.Thread(target=self._heartbeat, name=f"lease-{self.job_id}", daemon=True)
        heartbeat.start()
        self.services.settings.scratch_dir.mkdir(parents=True, exist_ok=True)
        try:
            with (
                shutdown.stop_between_steps_on_sigterm(),
                tempfile.TemporaryDirectory(
                    dir=self.services.settings.scratch_dir, prefix=f"{self.job_id}-"
                ) as tmp,
            ):
                self._train(Path(tmp))
        except LostJob:
            self.log.warning("job %s: lost (cancelled or taken over); stopping without writing", self.job_id)
        except InvalidInput as exc:  # what the user must fix (config, data, model, reward): no retry helps
            self._fail("invalid_input", str(exc))
        except SandboxUnavailable as exc:  # this deployment cannot isolate python graders: no retry helps
            self._fail("sandbox_unavailable", str(exc))
        except Exception as exc:
            self.log.exception("job %s: attempt %d failed", self.job_id, self.attempt)
            message = str(exc) if isinstance(exc, TrainingProcessesFailed) else f"{type(exc).__name__}: {exc}"
            self._retry_or_fail("training_error", message)
        finally:
            self._stop_heartbeat.set()
            heartbeat.join(timeout=5)

    def _train(self, workdir: Path) -> None:
        with self.services.sessions() as session:  # read, then close: no transaction held while downloading
            job = session.get(Job, self.job_id)
            train = session.get(Dataset, job.training_dataset_id) if job.training_dataset_id else None
            heldout = session.get(Dataset, job.validation_dataset_id) if job.validation_dataset_id else None
            checkpoint = session.scalar(
                select(Checkpoint)
                .where(Checkpoint.job_id == self.job_id)
                .order_by(Checkpoint.step.desc())
                .limit(1)
            )
        config = self._config(job, train, heldout, workdir)
        resume_from = self._restore(checkpoint, workdir / "run") if checkpoint else None
        processes = config.training.processes or self.services.settings.train_processes
        self.log.info(
            "job %s: training %d steps of %s in %d process(es)",
            self.job_id,
            config.training.steps,
            config.method,
            processes,
        )
        if processes > 1:
            result = self._train_in_processes(config, resume_from, workdir, processes)
        else:
            trainer = Trainer(
                config,
                callbacks=[_Reporter(self, config.training.steps)],
                sandbox_limits=SandboxLimits.from_settings(self.services.settings),
                judge=ChatJudge(self.services.settings.judge_models),
            )
            result = trainer.train(resume_from=resume_from)
        if self.lost.is_set():
            raise LostJob(self.job_id)
        if result.stopped and shutdown.requested.is_set():
            self.commit(
                lambda s: release_job(
                    s,
                    self.job_id,
                    self.attempt,
                    f"worker shutting down; checkpoint at step {result.steps_done}",
                )
            )
            self._dispatch()
            return
        if result.stopped:

            def stopped(session: Session) -> str:
                status = session.scalar(select(Job.status).where(Job.id == self.job_id))
                if status == JobStatus.PAUSING:
                    pause_finished(session, self.job_id, self.attempt, result.steps_done)
                else:
                    finish_job(
                        session, self.job_id, self.attempt, JobStatus.CANCELLED, step=result.steps_done
                    )
                    add_event(session, self.job_id, f"cancelled at step {result.steps_done}")
                return status

            if self.commit(stopped) != JobStatus.PAUSING:
                self._remove_orphans()  # a paused job keeps its checkpoints to resume from
            return
        self._store_adapter(job, result, workdir)

    def _train_in_processes(
        self, config: TrainConfig, resume_from: Path | None, workdir: Path, processes: int
    ) -> TrainResult:
        """Train in `processes` ranks started by torchrun on this machine; rank 0 reports.

        This process keeps renewing the lease; SIGTERM or a lost lease becomes the stop file that
        rank 0 reads between steps (it checkpoints and stops, as in process). The launcher is in
        a session of its own (a terminal's Ctrl-C is not its) and gets SIGTERM if this process
        dies, which torchrun passes on to the ranks.
        """
        from worker import training_process

        run_dir = workdir / "ranks"
        run_dir.mkdir()
        request = {
            "job_id": self.job_id,
            "attempt": self.attempt,
            "config": config.model_dump(mode="json"),
            "resume_from": str(resume_from) if resume_from else None,
            "settings": self.services.settings.model_dump(mode="json"),
        }
        request_file = run_dir / training_process.REQUEST
        request_file.touch(mode=0o600)  # the settings hold the database's and storage's secrets
        request_file.write_text(json.dumps(request))
        command = [sys.executable, "-m", "worker.training_process", "--launch", str(processes), str(run_dir)]
        root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(name, None)
        stop_file = run_dir / training_process.STOP
        with subprocess.Popen(command, env=env, cwd=workdir, start_new_session=True) as children:
            while children.poll() is None:
                if (self.lost.is_set() or shutdown.requested.is_set()) and not stop_file.exists():
                    stop_file.touch()
                time.sleep(0.2)
        result_file = run_dir / training_process.RESULT
        if children.returncode == 0 and result_file.is_file():
            done = json.loads(result_file.read_text())
            adapter_dir = done.pop("adapter_dir", None)
            return TrainResult(**done, adapter_dir=Path(adapter_dir) if adapter_dir else None)
        errors = [
            json.loads(training_process.error_file(run_dir, rank).read_text())
            for rank in range(processes)
            if training_process.error_file(run_dir, rank).is_file()
        ]
        if not errors:
            raise TrainingProcessesFailed(
                f"the {processes} training processes exited with {children.returncode}"
            )
        error = training_process.first_error(errors)
        if error["kind"] == "lost":
            raise LostJob(self.job_id)
        if error["kind"] == "invalid_input":
            raise InvalidInput(error["message"])
        if error["kind"] == "sandbox_unavailable":
            raise SandboxUnavailable(error["message"])
        raise TrainingProcessesFailed(error["message"])

    def _config(self, job: Job, train: Dataset | None, heldout: Dataset | None, workdir: Path) -> TrainConfig:
        raw = dict(job.config)
        raw["data"] = dict(raw["data"], train=str(self._fetch_dataset(train, workdir)))
        if job.validation_dataset_id:
            raw["data"]["eval"] = str(self._fetch_dataset(heldout, workdir))
        raw["output_dir"] = str(workdir / "run")
        return parse_config(raw)

    def _fetch_dataset(self, dataset: Dataset | None, workdir: Path) -> Path:
        if dataset is None:
            raise ConfigError(["the job's dataset was deleted"])
        target = workdir / "data" / f"{dataset.id}.jsonl"
        try:
            self.services.storage.download(dataset.storage_key, target)
        except ObjectNotFound as exc:  # lost data: no retry brings it back
            raise ConfigError([f"the data of dataset {dataset.id!r} is missing from storage"]) from exc
        return target

    def _restore(self, checkpoint: Checkpoint, run_dir: Path) -> Path:
        """Unpack the latest stored checkpoint so the trainer resumes from it."""
        target = run_dir / "checkpoints" / f"step-{checkpoint.step:06d}"
        archive = run_dir / "restore.tar"
        self.services.storage.download(checkpoint.storage_key, archive)
        with tarfile.open(archive) as tar:  # the checkpoint directory's contents (on_checkpoint)
            tar.extractall(target, filter="data")
        archive.unlink()

        def resuming(session: Session) -> None:
            assert_owned(session, self.job_id, self.attempt)
            add_event(session, self.job_id, f"resuming from the checkpoint of step {checkpoint.step}")

        self.commit(resuming)
        return target

    def _store_adapter(self, job: Job, result: TrainResult, workdir: Path) -> None:
        archive = workdir / "adapter.tar.gz"
        write_archive(result.adapter_dir, archive, arcname="adapter")
        digest, size = sha256_of(archive), archive.stat().st_size
        key = f"jobs/{self.job_id}/attempt-{self.attempt}/adapter.tar.gz"
        self.services.storage.put_file(key, archive)
        results = self._store_results(job, workdir)
        name = fine_tuned_model_name(job)
        try:
            self.commit(lambda session: self._succeed(session, key, digest, size, name, result, results))
        except LostJob:
            for stored in (key, results.storage_key):  # no row will ever point at them
                self.services.storage.delete(stored)
            raise
        self.log.info("job %s: succeeded, adapter %s (%d bytes)", self.job_id, digest[:12], size)
        self._remove_orphans()

    def _store_results(self, job: Job, workdir: Path) -> Dataset:
        """The step metrics as CSV in storage, and the file row that the success commits."""
        with self.services.sessions() as session:
            metrics = session.scalars(select(JobMetric).where(JobMetric.job_id == self.job_id)).all()
        train = {m.step: m.values for m in metrics if m.kind == "train"}
        evals = {m.step: m.values for m in metrics if m.kind == "eval"}
        path = workdir / "results.csv"
        path.write_text(results_csv(train, evals))
        file = Dataset(
            id=new_id("file"),
            project_id=job.project_id,
            name=f"{self.job_id}-results.csv",
            purpose=RESULTS_PURPOSE,
            bytes=path.stat().st_size,
            sha256=sha256_of(path),
            storage_key=f"jobs/{self.job_id}/attempt-{self.attempt}/results.csv",
            lines=len(set(train) | set(evals)) + 1,
            examples=0,
            with_demonstration=0,
            field_counts={},
        )
        self.services.storage.put_file(file.storage_key, path)
        return file

    def _succeed(
        self,
        session: Session,
        key: str,
        digest: str,
        size: int,
        name: str,
        result: TrainResult,
        results: Dataset,
    ) -> None:
        # The unique job_id of artifacts makes a second success impossible; the fence makes
        # sure that only the current attempt gets here.
        assert_owned(session, self.job_id, self.attempt)
        session.merge(results)  # merge, not add: JobRun.commit may run this again in a new session
        session.flush()  # the file row before the job names it
        finish_job(
            session,
            self.job_id,
            self.attempt,
            JobStatus.SUCCEEDED,
            step=result.steps_done,
            fine_tuned_model=name,
            result_file_id=results.id,
        )
        session.merge(
            Artifact(
                id=f"art_{self.job_id.removeprefix('job_')}",
                job_id=self.job_id,
                storage_key=key,
                sha256=digest,
                bytes=size,
            )
        )
        final = result.final_eval or {}
        summary = ", ".join(f"{k} {v:.3f}" for k, v in final.items() if k in ("accuracy", "reward_mean"))
        add_event(
            session,
            self.job_id,
            f"succeeded after {result.steps_done} steps" + (f": {summary}" if summary else ""),
            data={"initial_eval": _finite(result.initial_eval), "final_eval": _finite(final)},
        )

    def _remove_orphans(self) -> None:
        """Delete the job's objects that no row points at: uploads of an attempt that was killed
        between storing an object and committing its row. Best effort; the job is finished."""
        try:
            with self.services.sessions() as session:
                kept = set(
                    session.scalars(select(Checkpoint.storage_key).where(Checkpoint.job_id == self.job_id))
                )
                kept |= set(
                    session.scalars(select(Artifact.storage_key).where(Artifact.job_id == self.job_id))
                )
                kept |= set(
                    session.scalars(
                        select(Dataset.storage_key).where(
                            Dataset.storage_key.startswith(f"jobs/{self.job_id}/")
                        )
                    )
                )
            for key in self.services.storage.list_keys(f"jobs/{self.job_id}/"):
                if key not in kept:
                    self.services.storage.delete(key)
                    self.log.info(
                        "job %s: removed %s, stored by an attempt that did not finish", self.job_id, key
                    )
        except Exception:
            self.log.warning("job %s: could not remove orphaned objects", self.job_id, exc_info=True)

    def _fail(self, code: str, message: str) -> None:
        def failed(session: Session) -> None:
            finish_job(
                session,
                self.job_id,
                self.attempt,
                JobStatus.FAILED,
                error={"code": code, "message": message[:4000]},
            )
            add_event(session, self.job_id, f"failed: {message[:4000]}", level="error")

        try:
            self.commit(failed)
        except LostJob:
            self.log.warning("job %s: failed, but the job is no longer ours", self.job_id)
            return
        self._remove_orphans()

    def _retry_or_fail(self, code: str, message: str) -> None:
        error = {"code": code, "message": message[:4000]}
        max_attempts = self.services.settings.max_attempts
        try:
            status = self.commit(lambda s: retry_or_fail(s, self.job_id, self.attempt, error, max_attempts))
        except LostJob:
            self.log.warning("job %s: failed, but the job is no longer ours", self.job_id)
            return
        if status == JobStatus.QUEUED:
            self._dispatch()
        else:
            self._remove_orphans()

    def _dispatch(self) -> None:
        dispatch_job(self.services.celery, self.services.sessions, self.job_id)

    # ----- reporting and the lease -------------------------------------------------------------

    def commit(self, work: Callable[[Session], T]) -> T:
        """Run work(session) in a transaction. While the database is unreachable (restarting,
        failing over, or it ended a transaction this worker left idle while frozen), retry for up
        to a lease's length from the first failure rather than lose the attempt; the writes are
        idempotent (updates and merges), and a retried transaction had been rolled back."""
        deadline = None
        delay = 0.25
        while True:
            try:
                with transaction(self.services.sessions) as session:
                    return work(session)
            except DBAPIError as exc:
                # Timed from the failure, not the call: a worker frozen mid-call wakes up past any
                # deadline set before, and must still try once more to learn whether it lost the job.
                deadline = deadline or time.monotonic() + self.services.settings.lease_seconds
                if not connection_lost(exc) or time.monotonic() + delay > deadline:
                    raise
                self.log.warning("job %s: database unavailable (%s); retrying", self.job_id, exc.orig)
                time.sleep(delay)
                delay = min(2 * delay, 5.0)

    def _heartbeat(self) -> None:
        settings = self.services.settings
        while not self._stop_heartbeat.wait(settings.heartbeat_seconds):
            try:
                with transaction(self.services.sessions) as session:
                    renew_lease(session, self.job_id, self.attempt, settings.lease_seconds)
            except LostJob:
                self.lost.set()
                return
            except Exception:  # the database may be briefly away; the lease has slack
                self.log.warning("job %s: lease renewal failed; retrying", self.job_id, exc_info=True)

    def should_stop(self) -> bool:
        if self.lost.is_set() or shutdown.requested.is_set():
            return True
        return self.commit(lambda session: stop_requested(session, self.job_id))


class TrainingProcessesFailed(RuntimeError):
    """A job training in several processes failed; the message is the failing rank's error."""


class _Reporter(TrainerCallback):
    """Trainer callbacks -> rows in the database and objects in storage."""

    def __init__(self, run: JobRun, total_steps: int):
        self.run = run
        self.total_steps = total_steps

    def on_step(self, metrics: dict[str, Any]) -> None:
        step = metrics["step"]
        values = _finite(metrics)

        def record(session: Session) -> None:
            update_job(session, self.run.job_id, self.run.attempt, step=step)
            session.merge(JobMetric(job_id=self.run.job_id, kind="train", step=step, values=values))
            self._metrics_event(session, f"step {step}/{self.total_steps}", "train", values)

        self.run.commit(record)

    def on_eval(self, metrics: dict[str, Any]) -> None:
        step, values = metrics["step"], _finite(metrics)

        def record(session: Session) -> None:
            assert_owned(session, self.run.job_id, self.run.attempt)
            session.merge(JobMetric(job_id=self.run.job_id, kind="eval", step=step, values=values))
            self._metrics_event(session, f"evaluation at step {step}", "validation", values)

        self.run.commit(record)

    def _metrics_event(self, session: Session, title: str, split: str, values: dict[str, Any]) -> None:
        """A `metrics` event: the headline numbers in its message, all of them in its data."""
        data = {"split": split, "total_steps": self.total_steps, **values}
        add_event(session, self.run.job_id, f"{title}: {_shown(values)}", data=data, type="metrics")

    def on_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        def record(session: Session) -> None:
            assert_owned(session, self.run.job_id, self.run.attempt)
            session.add_all(JobSample(job_id=self.run.job_id, step=step, data=_finite(s)) for s in samples)

        self.run.commit(record)

    def on_event(self, message: str, level: str = "info", data: dict[str, Any] | None = None) -> None:
        def record(session: Session) -> None:
            assert_owned(session, self.run.job_id, self.run.attempt)
            add_event(session, self.run.job_id, message, level=level, data=_finite(data) if data else None)

        self.run.commit(record)

    def on_checkpoint(self, step: int, path: Path) -> None:
        """Upload under this attempt's own key, then point the step's row at it (fenced). A step
        redone after a resume replaces the earlier object; a fenced-out upload is removed."""
        storage = self.run.services.storage
        archive = path.with_name(path.name + ".tar")
        write_archive(path, archive, arcname=".", compress=False)
        key = f"jobs/{self.run.job_id}/checkpoints/step-{step:06d}-attempt-{self.run.attempt}.tar"
        storage.put_file(key, archive)
        size, digest = archive.stat().st_size, sha256_of(archive)
        archive.unlink()

        def record(session: Session) -> str | None:
            assert_owned(session, self.run.job_id, self.run.attempt)
            row = session.scalar(
                select(Checkpoint).where(Checkpoint.job_id == self.run.job_id, Checkpoint.step == step)
            )
            replaced = None
            if row is None:
                row = Checkpoint(job_id=self.run.job_id, step=step, storage_key=key)
                session.add(row)
            elif row.storage_key != key:
                replaced, row.storage_key = row.storage_key, key
            row.bytes, row.sha256 = size, digest
            add_event(session, self.run.job_id, f"checkpoint saved at step {step}")
            return replaced

        try:
            replaced = self.run.commit(record)
        except LostJob:
            storage.delete(key)
            raise
        if replaced:
            storage.delete(replaced)

    def should_stop(self) -> bool:
        return self.run.should_stop()


def write_archive(source: Path, target: Path, arcname: str, compress: bool = True) -> None:
    """A tar of a directory with sorted entries and fixed metadata, so equal trees give equal bytes."""

    def normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        return info

    with (
        target.open("wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) if compress else raw as out,
        tarfile.open(fileobj=out, mode="w") as tar,
    ):
        tar.add(source, arcname=arcname, recursive=False, filter=normalise)
        for path in sorted(source.rglob("*")):
            tar.add(path, arcname=f"{arcname}/{path.relative_to(source)}", recursive=False, filter=normalise)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _shown(metrics: dict[str, Any]) -> str:
    """The headline numbers of a step or an evaluation, for its event's message."""
    keys = ("loss", "reward_mean", "accuracy")
    return ", ".join(f"{k}={metrics[k]:.4g}" for k in keys if isinstance(metrics.get(k), float | int))


def _finite(value: Any) -> Any:
    """JSON for the database: NaN and infinities (not valid JSON) become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
