"""Request and response bodies of the REST API (they are the OpenAPI schema at /docs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ----- ours under a fine-tuning job (/v1/fine_tuning/jobs/{id}/metrics, /samples) ---------------


class MetricOut(BaseModel):
    step: int
    kind: Literal["train", "eval"]
    values: dict[str, Any]
    created_at: int


class MetricPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[MetricOut]
    has_more: bool


class SampleOut(BaseModel):
    id: int
    step: int
    data: dict[str, Any] = Field(
        description="prompt, completion, demo_prefix_tokens and demo_prefix_text (the demonstration "
        "prefix the completion began with), reward, rewards (per grader), outputs (what each grader "
        "printed) and errors (why a grader failed: its message or traceback)."
    )


class SamplePage(BaseModel):
    object: Literal["list"] = "list"
    data: list[SampleOut]
    has_more: bool
    last_id: int | None = None


# ----- models ----------------------------------------------------------------------------------


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    description: str | None = None
    base_model: str | None = Field(None, description="For an adapter: the model it was trained on.")
    job_id: str | None = None
    # A base model's facts (null for adapters: see their base_model).
    architecture: str | None = None
    parameters: int | None = None
    context_length: int | None = Field(None, description="Tokens: prompt, prefix and completion together.")
    chat_template: bool | None = Field(None, description="Whether chat messages can be formatted for it.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]


# ----- OpenAI's grader endpoints (/v1/fine_tuning/alpha/graders) --------------------------------


class GraderValidateRequest(_Strict):
    """POST /v1/fine_tuning/alpha/graders/validate."""

    grader: dict[str, Any] = Field(
        description="One grader object: string_check, text_similarity, python, score_model, label_model, "
        "multi, or one of ours (numeric, math, regex, json_schema, ...)."
    )


class GraderValidateResponse(BaseModel):
    grader: dict[str, Any] = Field(description="The grader, as given.")


class GraderRunRequest(GraderValidateRequest):
    """POST /v1/fine_tuning/alpha/graders/run: score one sample."""

    model_sample: str = Field(
        max_length=100_000,
        description="The model's output: {{sample.output_text}}, and {{sample.output_json}} when it is JSON.",
    )
    item: dict[str, Any] = Field(default_factory=dict, description="The dataset row: {{item.<key>}}.")


class GraderRunErrors(BaseModel):
    """What went wrong, by OpenAI's names; all false when the grader scored the sample."""

    formula_parse_error: bool = False
    sample_parse_error: bool = False
    truncated_observation_error: bool = False
    unresponsive_reward_error: bool = False
    invalid_variable_error: bool = False
    other_error: bool = False
    python_grader_server_error: bool = False
    python_grader_server_error_type: str | None = None
    python_grader_runtime_error: bool = False
    python_grader_runtime_error_details: str | None = None
    model_grader_server_error: bool = False
    model_grader_refusal_error: bool = False
    model_grader_parse_error: bool = False
    model_grader_server_error_details: str | None = None


class GraderRunMetadata(BaseModel):
    name: str
    type: str
    execution_time: float = Field(description="Seconds spent scoring.")
    scores: dict[str, float] = Field(description="A multi grader's sub-graders' scores, by name.")
    token_usage: int | None = None
    sampled_model_name: str | None = Field(None, description="The judge's served model, for model graders.")
    errors: GraderRunErrors
    messages: dict[str, str] = Field(
        default_factory=dict, description="Ours: per grader that failed, what went wrong (a traceback)."
    )
    output: dict[str, str] = Field(default_factory=dict, description="Ours: what python graders printed.")


class GraderRunResponse(BaseModel):
    reward: float
    metadata: GraderRunMetadata
    sub_rewards: dict[str, float] = Field(description="A multi grader's sub-graders' scores, by name.")
    model_grader_token_usage_per_model: dict[str, Any] = Field(default_factory=dict)


# ----- OpenAI's files (/v1/files) ----------------------------------------------------------------


class FileValidation(BaseModel):
    """Ours: what the upload's validation found (every line was checked before it was stored)."""

    lines: int
    examples: int
    with_demonstration: int = Field(
        description="Examples with a demonstration (a final assistant message or a `demonstration` key): "
        "what sft, psft and prefix_rft train on."
    )
    field_counts: dict[str, int] = Field(
        description="Extra fields (a grader's {{item.x}}) and how many carry each."
    )
    sha256: str


class FileObject(BaseModel):
    """OpenAI's file object; `status` is `processed` because a file is validated before it is stored."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int = Field(description="Unix seconds.")
    filename: str
    purpose: Literal["fine-tune", "fine-tune-results"] = Field(
        "fine-tune", description="`fine-tune-results`: a succeeded job's step metrics, CSV."
    )
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None
    validation: FileValidation


class FilePage(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


# ----- OpenAI's fine-tuning jobs (/v1/fine_tuning/jobs) -----------------------------------------


class FineTuningJobCreate(BaseModel):
    """POST /v1/fine_tuning/jobs, as the official client sends it (api/fine_tuning_methods.py maps it)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Base model id, from GET /v1/models.")
    training_file: str = Field(description="A file id of purpose fine-tune.")
    validation_file: str | None = Field(
        None, description="Held-out file; default: a seeded split of training."
    )
    method: dict[str, Any] | None = Field(
        None,
        description="{type, <type>: {grader?, hyperparameters?, adapter?}}: supervised, reinforcement, "
        "prefix_rft, sft_then_rft, psft, psft_then_rft. Default: supervised.",
    )
    hyperparameters: dict[str, Any] | None = Field(
        None, description="Deprecated: supervised's hyperparameters."
    )
    suffix: str | None = Field(None, min_length=1, max_length=40, pattern=r"^[a-z0-9][a-z0-9-]*$")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = Field(None, max_length=16)
    integrations: list[dict[str, Any]] | None = Field(
        None, max_length=5, description="Not supported: empty or null."
    )


class FineTuningJobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    """OpenAI's fine-tuning job; every documented key is present (null where absent)."""

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    model: str
    organization_id: str
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled", "paused"]
    training_file: str | None
    validation_file: str | None
    result_files: list[str] = Field(
        default_factory=list, description="Once succeeded: the file id of its step metrics (CSV)."
    )
    fine_tuned_model: str | None
    finished_at: int | None
    trained_tokens: int | None = None
    estimated_finish: int | None = None
    error: FineTuningJobError | None
    seed: int
    hyperparameters: dict[str, Any] = Field(
        description="batch_size, learning_rate_multiplier, n_epochs, resolved."
    )
    method: dict[str, Any]
    integrations: list[dict[str, Any]] = Field(default_factory=list)
    metadata: dict[str, str] | None
    user_provided_suffix: str | None
    step: int = Field(description="Ours: steps done.")
    total_steps: int = Field(description="Ours.")
    last_reward: float | None = Field(
        None,
        description="Ours: the mean reward of the latest step (null before one, or for supervised steps).",
    )
    attempt: int = Field(
        0, description="Ours: how many times a worker has started the job (a lost worker's job is retried)."
    )


class FineTuningJobPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class FineTuningJobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"] = "message"
    data: dict[str, Any] | None = None


class FineTuningJobEventPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobEvent]
    has_more: bool


class FineTuningJobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str = Field(
        description="The checkpoint's model name: chat and completions answer with it while the job keeps "
        "the checkpoint."
    )
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, float] = Field(
        description="The step's training metrics, and held-out ones if evaluated."
    )


class FineTuningJobCheckpointPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobCheckpoint]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


# ----- webhooks (/v1/webhooks) -------------------------------------------------------------------


class WebhookEndpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2000, description="http(s) URL that receives the POSTs.")
    events: (
        list[Literal["fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled"]]
        | None
    ) = Field(None, min_length=1, description="Event types to send; default: all three.")
    description: str = Field("", max_length=500)


class WebhookEndpointOut(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    events: list[str]
    description: str
    created_at: int = Field(description="Unix seconds.")
    secret: str | None = Field(
        None, description="`whsec_...`: verifies the signatures. Shown once, in the answer to create."
    )


class WebhookEndpointPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookEndpointOut]
    has_more: bool


class WebhookEndpointDeleted(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    deleted: bool = True


class WebhookDeliveryOut(BaseModel):
    id: str = Field(description="The webhook-id header: the same on every attempt.")
    object: Literal["webhook_delivery"] = "webhook_delivery"
    event_type: str
    event: dict[str, Any] = Field(description="The body sent.")
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    next_attempt_at: int | None
    last_status_code: int | None
    last_error: str | None
    created_at: int
    delivered_at: int | None


class WebhookDeliveryPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookDeliveryOut]
    has_more: bool


class FineTuningJobEstimate(BaseModel):
    """POST /v1/fine_tuning/estimates: a job's duration before it is made (ours)."""

    object: Literal["fine_tuning.job.estimate"] = "fine_tuning.job.estimate"
    model: str
    method: dict[str, Any] = Field(description="The method as the job would echo it, `auto` resolved.")
    estimated_seconds: float | None = Field(
        description="Steps and evaluations at the measured rates; null until this deployment has "
        "measured a step (and an evaluation, if the job has one) of this model and adapter type."
    )
    steps: int
    supervised_steps: int
    reinforcement_steps: int
    evaluations: int = Field(description="Before training, every eval_interval steps, and after.")
    seconds_per_step: dict[str, float | None] = Field(description="supervised and reinforcement.")
    seconds_per_evaluation: float | None
    measured: int = Field(description="The measured steps and evaluations the rates come from.")
