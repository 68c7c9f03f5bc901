"""OpenAI's grader endpoints: validate a grader object, or score one sample with it.

The same graders, sandbox and judge as training (core/rewards): what scores here scores the same
in a job. Plain `def` handlers: python graders and judges are waited for in the thread pool.
"""

from __future__ import annotations

import time

from fastapi import APIRouter

from api.deps import ProjectDep, ServicesDep
from api.schemas import (
    GraderRunErrors,
    GraderRunMetadata,
    GraderRunRequest,
    GraderRunResponse,
    GraderValidateRequest,
    GraderValidateResponse,
)
from core.config import ConfigError, parse_grader
from core.rewards import RewardSpec, SandboxUnavailable, score_completions
from core.rewards.openai_graders import ModelGraderBase
from core.rewards.spec import CALCULATE_OUTPUT, error_kind
from protocol.errors import APIError, joined

router = APIRouter(prefix="/v1/fine_tuning/alpha/graders", tags=["graders"])


def grader_spec(grader: dict, services: ServicesDep) -> RewardSpec:
    """The grader as a reward spec, or a 400 whose param points into the body (`grader.operation`)."""
    try:
        spec = parse_grader(grader)
    except ConfigError as exc:
        details = [
            {"param": ".".join(x for x in ("grader", p.param) if x), "message": p.message}
            for p in exc.details
        ]
        raise APIError(400, "invalid_grader", joined(details), details[0]["param"], details) from exc
    missing = services.judge.missing(spec.judge_models)
    if missing:
        served = ", ".join(sorted(services.judge.endpoints)) or "none"
        raise APIError(
            400,
            "judge_model_unavailable",
            f"model graders here need a judge this deployment serves; {', '.join(missing)} is not one "
            f"(served judges: {served}; an operator adds them with PREFIX_RFT_JUDGE_MODELS)",
            "grader.model",
        )
    return spec


@router.post("/validate", response_model=GraderValidateResponse)
def validate_grader(
    body: GraderValidateRequest, _project_id: ProjectDep, services: ServicesDep
) -> GraderValidateResponse:
    grader_spec(body.grader, services)
    return GraderValidateResponse(grader=body.grader)


@router.post("/run", response_model=GraderRunResponse)
def run_grader(body: GraderRunRequest, project_id: ProjectDep, services: ServicesDep) -> GraderRunResponse:
    spec = grader_spec(body.grader, services)
    started = time.perf_counter()
    try:
        result = score_completions(
            spec,
            [body.model_sample],
            [body.item],
            sandbox=services.sandbox if spec.runs_user_code else None,
            deadline=time.monotonic() + services.settings.sandbox_test_seconds,
            owner=project_id,  # a warm sandbox never serves two projects
            judge=services.judge,
        )
    except SandboxUnavailable as exc:
        raise APIError(503, "sandbox_unavailable", str(exc), headers={"Retry-After": "5"}) from exc
    is_multi = body.grader.get("type") == "multi"
    scores = {label: values[0] for label, values in result.per_grader.items()}
    failures = {label: reasons[0] for label, reasons in result.failures.items() if reasons[0]}
    judges = {g.model for g in spec.graders if isinstance(g, ModelGraderBase)}
    return GraderRunResponse(
        reward=result.totals[0],
        metadata=GraderRunMetadata(
            name=str(body.grader.get("name") or body.grader["type"]),
            type=str(body.grader["type"]),
            execution_time=time.perf_counter() - started,
            scores=scores if is_multi else {},
            sampled_model_name=services.judge.endpoints[min(judges)].model if judges else None,
            errors=_errors(spec, failures),
            messages=failures,
            output={label: printed[0] for label, printed in result.outputs.items() if printed[0]},
        ),
        sub_rewards=scores if is_multi else {},
    )


def _errors(spec: RewardSpec, failures: dict[str, str]) -> GraderRunErrors:
    types = {g.label: g.type for g in spec.graders} | {CALCULATE_OUTPUT: CALCULATE_OUTPUT}
    flags: dict[str, bool | str] = {}
    for label, reason in failures.items():
        kind = error_kind(types[label], reason)
        flags[kind] = True
        if kind == "python_grader_runtime_error":
            flags["python_grader_runtime_error_details"] = reason
        elif kind == "python_grader_server_error":
            flags["python_grader_server_error_type"] = reason.strip().splitlines()[-1][:200]
        elif kind == "model_grader_server_error":
            flags["model_grader_server_error_details"] = reason
    return GraderRunErrors(**flags)
