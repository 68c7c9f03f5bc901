"""Running one job: claim it, fetch its data, train, report, store the adapter.

Every database write goes through service.lifecycle, fenced by the attempt number; a worker
that finds the job gone (cancelled, or claimed by another attempt) stops and writes nothing.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import math
import os
import socket
import tarfile
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.config import ConfigError, parse_config
from core.trainer import Trainer, TrainerCallback
from service.db import make_engine, make_sessionmaker, transaction
from service.lifecycle import (
    LostJob,
    add_event,
    assert_owned,
    cancel_requested,
    claim_job,
    finish_job,
    renew_lease,
    update_job,
)
from service.settings import Settings, get_settings
from service.storage import Storage, open_storage
from service.tables import Artifact, Checkpoint, Dataset, Job, JobMetric, JobSample, JobStatus

log = logging.getLogger(__name__)


@dataclass
class WorkerServices:
    settings: Settings
    sessions: sessionmaker[Session]
    storage: Storage


@functools.cache
def worker_services() -> WorkerServices:
    """One engine and storage client per worker process."""
    settings = get_settings()
    storage = open_storage(
        settings.storage_url, s3_endpoint_url=settings.s3_endpoint_url, s3_region=settings.s3_region
    )
    return WorkerServices(settings, make_sessionmaker(make_engine(settings.database_url)), storage)


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
            with tempfile.TemporaryDirectory(
                dir=self.services.settings.scratch_dir, prefix=f"{self.job_id}-"
            ) as tmp:
                self._train(Path(tmp))
        except LostJob:
            self.log.warning("job %s: lost (cancelled or taken over); stopping without writing", self.job_id)
        except ValueError as exc:  # the trainer's word for bad input: config, data, model (ConfigError, ...)
            self._fail("invalid_input", str(exc))
        except Exception as exc:
            self.log.exception("job %s: training failed", self.job_id)
            self._fail("training_error", f"{type(exc).__name__}: {exc}")
        finally:
            self._stop_heartbeat.set()
            heartbeat.join(timeout=5)

    def _train(self, workdir: Path) -> None:
        with self.services.sessions() as session:
            job = session.get(Job, self.job_id)
            config = self._config(session, job, workdir)
            checkpoint = session.scalar(
                select(Checkpoint)
                .where(Checkpoint.job_id == self.job_id)
                .order_by(Checkpoint.step.desc())
                .limit(1)
            )
        resume_from = self._restore(checkpoint, workdir / "run") if checkpoint else None
        trainer = Trainer(config, callbacks=[_Reporter(self)])
        self.log.info("job %s: training %d steps of %s", self.job_id, config.training.steps, config.method)
        result = trainer.train(resume_from=resume_from)
        if self.lost.is_set():
            raise LostJob(self.job_id)
        if result.stopped:
            with self.write() as session:
                finish_job(session, self.job_id, self.attempt, JobStatus.CANCELLED, step=result.steps_done)
                add_event(session, self.job_id, f"cancelled at step {result.steps_done}")
            return
        self._store_adapter(job, result, workdir)

    def _config(self, session: Session, job: Job, workdir: Path):
        raw = dict(job.config)
        raw["data"] = dict(
            raw["data"], train=str(self._fetch_dataset(session, job.training_dataset_id, workdir))
        )
        if job.validation_dataset_id:
            raw["data"]["eval"] = str(self._fetch_dataset(session, job.validation_dataset_id, workdir))
        raw["output_dir"] = str(workdir / "run")
        return parse_config(raw)

    def _fetch_dataset(self, session: Session, dataset_id: str | None, workdir: Path) -> Path:
        dataset = session.get(Dataset, dataset_id) if dataset_id else None
        if dataset is None:
            raise ConfigError(["the job's dataset was deleted"])
        target = workdir / "data" / f"{dataset.id}.jsonl"
        self.services.storage.download(dataset.storage_key, target)
        return target

    def _restore(self, checkpoint: Checkpoint, run_dir: Path) -> Path:
        """Unpack the latest stored checkpoint so the trainer resumes from it."""
        target = run_dir / "checkpoints"
        archive = run_dir / "restore.tar"
        self.services.storage.download(checkpoint.storage_key, archive)
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
        archive.unlink()
        with self.write() as session:
            add_event(session, self.job_id, f"resuming from the checkpoint of step {checkpoint.step}")
        return target / f"step-{checkpoint.step:06d}"

    def _store_adapter(self, job: Job, result, workdir: Path) -> None:
        archive = workdir / "adapter.tar.gz"
        write_archive(result.adapter_dir, archive, arcname="adapter")
        digest, size = sha256_of(archive), archive.stat().st_size
        key = f"jobs/{self.job_id}/adapter.tar.gz"
        self.services.storage.put_file(key, archive)
        name = f"ft:{job.model}:{job.suffix or ''}:{self.job_id}"
        with self.write() as session:
            # The unique job_id of artifacts makes a second success impossible; the fence makes
            # sure that only the current attempt gets here.
            finish_job(
                session,
                self.job_id,
                self.attempt,
                JobStatus.SUCCEEDED,
                step=result.steps_done,
                fine_tuned_model=name,
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
        self.log.info("job %s: succeeded, adapter %s (%d bytes)", self.job_id, digest[:12], size)

    def _fail(self, code: str, message: str) -> None:
        try:
            with self.write() as session:
                finish_job(
                    session,
                    self.job_id,
                    self.attempt,
                    JobStatus.FAILED,
                    error={"code": code, "message": message[:4000]},
                )
                add_event(session, self.job_id, f"failed: {message[:4000]}", level="error")
        except LostJob:
            self.log.warning("job %s: failed, but the job is no longer ours", self.job_id)

    # ----- reporting and the lease -------------------------------------------------------------

    def write(self):
        return transaction(self.services.sessions)

    def _heartbeat(self) -> None:
        settings = self.services.settings
        while not self._stop_heartbeat.wait(settings.heartbeat_seconds):
            try:
                with self.write() as session:
                    renew_lease(session, self.job_id, self.attempt, settings.lease_seconds)
            except LostJob:
                self.lost.set()
                return
            except Exception:  # the database may be briefly away; the lease has slack
                self.log.warning("job %s: lease renewal failed; retrying", self.job_id, exc_info=True)

    def should_stop(self) -> bool:
        if self.lost.is_set():
            return True
        with self.services.sessions() as session:
            return cancel_requested(session, self.job_id)


class _Reporter(TrainerCallback):
    """Trainer callbacks -> rows in the database and objects in storage."""

    def __init__(self, run: JobRun):
        self.run = run

    def on_step(self, metrics: dict[str, Any]) -> None:
        step = metrics["step"]
        with self.run.write() as session:
            update_job(session, self.run.job_id, self.run.attempt, step=step)
            session.merge(JobMetric(job_id=self.run.job_id, kind="train", step=step, values=_finite(metrics)))

    def on_eval(self, metrics: dict[str, Any]) -> None:
        with self.run.write() as session:
            assert_owned(session, self.run.job_id, self.run.attempt)
            session.merge(
                JobMetric(job_id=self.run.job_id, kind="eval", step=metrics["step"], values=_finite(metrics))
            )
            shown = {k: round(v, 4) for k, v in metrics.items() if k in ("accuracy", "reward_mean")}
            add_event(
                session,
                self.run.job_id,
                f"evaluation at step {metrics['step']}: {shown}",
                data=_finite(metrics),
            )

    def on_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        with self.run.write() as session:
            assert_owned(session, self.run.job_id, self.run.attempt)
            session.add_all(JobSample(job_id=self.run.job_id, step=step, data=_finite(s)) for s in samples)

    def on_checkpoint(self, step: int, path: Path) -> None:
        archive = path.with_name(path.name + ".tar")
        write_archive(path, archive, arcname=".", compress=False)
        key = f"jobs/{self.run.job_id}/checkpoints/step-{step:06d}.tar"
        self.run.services.storage.put_file(key, archive)
        size = archive.stat().st_size
        archive.unlink()
        with self.run.write() as session:
            assert_owned(session, self.run.job_id, self.run.attempt)
            existing = session.scalar(
                select(Checkpoint).where(Checkpoint.job_id == self.run.job_id, Checkpoint.step == step)
            )
            if existing is None:
                session.add(Checkpoint(job_id=self.run.job_id, step=step, storage_key=key, bytes=size))
            add_event(session, self.run.job_id, f"checkpoint saved at step {step}")

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


def _finite(value: Any) -> Any:
    """JSON for the database: NaN and infinities (not valid JSON) become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
