"""Deployment settings, read from `PREFIX_RFT_*` environment variables.

Every setting has an embedded default, so one machine needs none of them: SQLite, a local object
directory and a broker kept in files, all under the data directory. Production points the same
code at PostgreSQL, Redis and S3 through the same variables.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.base_models import check_name
from core.base_models import data_dir as default_data_dir
from core.errors import InvalidInput
from service.judge import JudgeEndpoint
from service.limits import JobLimits


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PREFIX_RFT_", extra="ignore")

    environment: Literal["local", "production"] = Field(
        "local", description="production refuses the embedded defaults for the database, broker and storage."
    )
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Local state: converted base models, the SQLite file, local objects, worker scratch.",
    )
    database_url: str = Field("", description="SQLAlchemy URL; default: SQLite file in the data dir.")
    broker_url: str = Field("", description="Celery broker; default: a broker kept in files in the data dir.")
    storage_url: str = Field(
        "", description="file:///dir or s3://bucket[/prefix]; default: the data dir's objects/ folder."
    )
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, ...).")
    s3_region: str | None = Field(None, description="S3 region; default: boto3's.")
    max_upload_bytes: int = Field(
        1 << 30, ge=1, description="Largest dataset upload, counted while streaming."
    )
    max_line_bytes: int = Field(1 << 20, ge=1, description="Longest dataset line.")
    # A worker that dies is noticed when its lease runs out and the next reaper round looks:
    # within lease + reaper seconds (20 s by default). Renewing every 3 s leaves five renewals of
    # slack for a slow database before a live worker would lose its job.
    lease_seconds: int = Field(15, ge=1, description="A running job's lease; the worker renews it.")
    heartbeat_seconds: float = Field(3, gt=0, description="How often the worker renews the lease.")
    max_attempts: int = Field(
        3, ge=1, description="Attempts a job gets (worker lost or training error) before it fails."
    )
    train_processes: int = Field(
        1,
        ge=1,
        le=1024,
        description="Processes one job trains in (one per GPU of the worker): above 1 the worker starts "
        "them with torchrun, data-parallel. A job's training.processes overrides it.",
    )
    reaper_seconds: float = Field(
        5,
        ge=0,
        description="How often the API looks for expired leases and undelivered jobs; 0 turns it off.",
    )
    redispatch_seconds: int = Field(
        600,
        ge=1,
        description="A queued job unclaimed this long is sent to the broker again (a lost message).",
    )
    job_limits: JobLimits = Field(
        default_factory=JobLimits,
        description="The largest job accepted, as JSON with any of service/limits.py's fields: "
        '{"steps": 2000, "max_completion_tokens": 1024}; checked when a job is created.',
    )
    stream_poll_seconds: float = Field(
        0.5, gt=0, le=10, description="How often an event stream looks for a job's new events."
    )
    stream_keepalive_seconds: float = Field(
        15,
        gt=0,
        le=300,
        description="A quiet event stream sends a comment this often (proxies close idle ones).",
    )
    webhook_seconds: float = Field(1.0, gt=0, description="How often each API process sends due webhooks.")
    webhook_timeout_seconds: float = Field(10.0, gt=0, le=60, description="How long a receiver may take.")
    webhook_retry_seconds: list[float] = Field(
        [5, 30, 120, 600, 1800, 3600, 10800, 21600, 43200, 86400],
        min_length=1,
        description="Waits before each retry of a failed delivery (about two days in all), then it fails.",
    )
    webhook_private_addresses: bool | None = Field(
        None,
        description="Whether webhooks may go to private, loopback or link-local addresses; default: "
        "only when the environment is local.",
    )
    idempotency_hours: int = Field(48, ge=24, description="How long an Idempotency-Key is remembered.")

    # ----- base models --------------------------------------------------------------------------
    base_models: dict[str, str] = Field(
        default_factory=dict,
        description="Base models beside the built-in ones and those `prefix-rft models add` recorded, as "
        'JSON: {"my-llama": "/models/my-llama", "smollm2-360m": "HuggingFaceTB/SmolLM2-360M-Instruct"} '
        "(local Hugging Face directories, or hub ids in the local cache); the API, the worker and the "
        "model server must all see the files.",
    )
    worker_memory_gb: float | None = Field(
        None,
        gt=0,
        description="Memory a worker trains in (its GPU's, or RAM on CPU); a job on a base model that "
        "needs more is refused at creation. Default: this machine's memory (one machine runs both).",
    )
    log_level: str = Field("INFO", description="Logging level of the API and worker.")

    # ----- inference -----------------------------------------------------------------------------
    inference_url: str = Field(
        "",
        description="The model server the API forwards /v1/chat/completions and /v1/completions to; "
        "default: http://127.0.0.1:8001 (the one `prefix-rft serve` starts).",
    )
    inference_adapter_cache_mb: int = Field(
        1024, ge=1, description="Memory the model server keeps trained adapters in, per base model (LRU)."
    )
    inference_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="The base models' weights in the model server; auto: bfloat16 on CUDA and on CPUs "
        "with AMX or AVX512-BF16, else float32.",
    )
    inference_max_batch: int = Field(
        64, ge=1, description="Rows one base model decodes at once; later requests wait for a free row."
    )
    inference_max_queue: int = Field(
        256, ge=1, description="Rows that may wait for a place in a base model's batch; more answer 429."
    )
    inference_timeout_seconds: float = Field(
        600, gt=0, description="How long the API waits for a non-streamed completion (and a model to load)."
    )

    # ----- judge models -------------------------------------------------------------------------
    judge_models: dict[str, JudgeEndpoint] = Field(
        default_factory=dict,
        description="Judges that score_model and label_model graders may name, as JSON: "
        '{"gpt-4o-mini": {"base_url": "http://model-server:8001/v1", "model": "smollm2-135m-instruct"}}. '
        "A grader naming another judge is refused.",
    )

    # ----- reward sandbox -----------------------------------------------------------------------
    # Limits of the processes that run python graders (core.rewards.sandbox.SandboxLimits, same
    # defaults; docs/sandbox.md). The API's reward test endpoint and the worker both use them.
    sandbox_require_isolation: bool = Field(
        True,
        description="Refuse python graders where the sandbox's namespaces cannot be created; false runs them "
        "with rlimits only (no network isolation): a trusted single-user machine only.",
    )
    sandbox_timeout_seconds: float = Field(
        10.0, gt=0, le=600, description="Wall clock per sample (a batch-form call: per completion in it)."
    )
    sandbox_cpu_seconds: int = Field(120, ge=1, description="CPU time of one sandbox process over its life.")
    sandbox_memory_mb: int = Field(1024, ge=64, description="Address space of one sandbox process.")
    sandbox_max_processes: int = Field(
        1, ge=1, description="Processes and threads of one sandbox, itself included (1: no fork, no threads)."
    )
    sandbox_file_size_mb: int = Field(
        16, ge=1, description="Largest file, and all files, in a sandbox's /tmp."
    )
    sandbox_output_bytes: int = Field(4096, ge=0, description="What a grader prints, kept per sample.")
    sandbox_workers: int = Field(
        2, ge=1, le=64, description="Warm sandbox processes per API or worker process."
    )
    sandbox_test_seconds: float = Field(
        60.0, gt=0, description="Time budget of one POST /v1/fine_tuning/alpha/graders/run request."
    )

    @model_validator(mode="after")
    def _fill_embedded_defaults(self) -> Settings:
        if self.environment == "production":
            missing = [
                f"PREFIX_RFT_{name.upper()}"
                for name in ("database_url", "broker_url", "storage_url")
                if not getattr(self, name)
            ]
            if missing:
                raise ValueError(
                    f"production needs {', '.join(missing)} (the embedded defaults are for one machine)"
                )
            weak = weak_secrets(self.database_url, self.broker_url, self.storage_url, self.s3_endpoint_url)
            if weak:
                raise ValueError(
                    "production refuses development or empty secrets: "
                    + "; ".join(weak)
                    + " (docker-compose.yml's defaults are for trying it out; set your own)"
                )
        self.data_dir = self.data_dir.expanduser().resolve()
        for name in self.base_models:
            try:
                check_name(name)
            except InvalidInput as exc:  # a settings error, as pydantic reports them
                raise ValueError(f"PREFIX_RFT_BASE_MODELS: {exc}") from None
        self.database_url = self.database_url or f"sqlite:///{self.data_dir / 'service.db'}"
        self.broker_url = self.broker_url or "filesystem://"
        self.storage_url = self.storage_url or (self.data_dir / "objects").as_uri()
        self.inference_url = (self.inference_url or "http://127.0.0.1:8001").rstrip("/")
        return self

    @property
    def worker_memory_bytes(self) -> int:
        if self.worker_memory_gb is not None:
            return int(self.worker_memory_gb * 1e9)
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    @property
    def broker_dir(self) -> Path:
        """Message folder of the file broker (one machine only)."""
        return self.data_dir / "broker"

    @property
    def scratch_dir(self) -> Path:
        """Where workers unpack datasets and write checkpoints before uploading them."""
        return self.data_dir / "scratch"


# The compose file's development defaults and the usual shipped ones: never a production secret.
DEVELOPMENT_SECRETS = frozenset(
    {
        "prefix",
        "prefix-rft",
        "prefix-rft-dev-secret",
        "postgres",
        "password",
        "secret",
        "changeme",
        "minioadmin",
        "guest",
        "admin",
        "root",
        "redis",
        "test",
    }
)


def weak_secrets(
    database_url: str, broker_url: str, storage_url: str, s3_endpoint_url: str | None
) -> list[str]:
    """What is wrong with a deployment's secrets: the database's and the broker's passwords in
    their URLs (SQLite and the file broker have none), and the S3 secret key in the environment
    (boto3's chain). On AWS itself no key is fine (an instance role); an S3-compatible server
    (`s3_endpoint_url`) needs one."""
    problems = []
    for name, url in (("PREFIX_RFT_DATABASE_URL", database_url), ("PREFIX_RFT_BROKER_URL", broker_url)):
        parts = urlsplit(url)
        if parts.scheme.startswith(("sqlite", "filesystem", "memory")):
            continue
        password = unquote(parts.password or "")
        if not password:
            problems.append(f"{name} has no password")
        elif password.lower() in DEVELOPMENT_SECRETS:
            problems.append(f"{name} has a development password")
    if storage_url.startswith("s3://"):
        secret = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        if secret.lower() in DEVELOPMENT_SECRETS or (not secret and s3_endpoint_url):
            problems.append(f"AWS_SECRET_ACCESS_KEY is {'a development secret' if secret else 'empty'}")
    return problems


@functools.cache
def get_settings() -> Settings:
    return Settings()
