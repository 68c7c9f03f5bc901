"""The judge of model graders (`score_model`, `label_model`): a chat model behind an OpenAI-style API
(core.rewards.spec.Judge, over HTTP).

The deployment maps each judge name a grader may ask for (`gpt-4o-mini`, `my-judge`) to an
endpoint: our own model server (`prefix-rft serve-model`) with a base model or an adapter, or any
OpenAI-compatible server. A name it does not map is refused before any job runs. Requests for one
grader's samples go out together, so the model server batches them.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from core.rewards.openai_graders import ModelGraderBase, ModelGraderParseError
from core.rewards.templates import InvalidVariable, SampleParseError

DEFAULT_MAX_TOKENS = 256
_CONCURRENT_REQUESTS = 16


class JudgeEndpoint(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field(description="OpenAI-style API root, e.g. http://model-server:8001/v1.")
    model: str = Field(description="The model name that endpoint serves.")
    api_key: SecretStr | None = Field(None, description="Sent as a bearer token, if set.")
    timeout_seconds: float = Field(60.0, gt=0, le=600)


class ModelGraderServerError(RuntimeError):
    """The judge's endpoint failed or answered something that is no chat completion."""


class ChatJudge:
    """Scores model graders by asking the endpoint mapped to their `model`."""

    def __init__(self, endpoints: dict[str, JudgeEndpoint], client: httpx.Client | None = None):
        self.endpoints = endpoints
        self._client = client or httpx.Client()

    def missing(self, names: set[str]) -> list[str]:
        """Judge names with no endpoint here."""
        return sorted(names - set(self.endpoints))

    def score(
        self,
        grader: ModelGraderBase,
        completions: list[str],
        examples: list[dict[str, Any]],
        deadline: float | None,
    ) -> list[tuple[float | None, str | None]]:
        endpoint = self.endpoints.get(grader.model)
        if endpoint is None:
            reason = f"JudgeUnavailable: no judge model {grader.model!r} is configured here"
            return [(None, reason)] * len(completions)
        with ThreadPoolExecutor(min(_CONCURRENT_REQUESTS, max(1, len(completions)))) as pool:
            return list(
                pool.map(lambda c, e: self._one(grader, endpoint, c, e, deadline), completions, examples)
            )

    def _one(
        self,
        grader: ModelGraderBase,
        endpoint: JudgeEndpoint,
        completion: str,
        example: dict[str, Any],
        deadline: float | None,
    ) -> tuple[float | None, str | None]:
        try:
            messages = grader.messages(completion, example)
        except (InvalidVariable, SampleParseError) as exc:
            return None, f"{type(exc).__name__}: {exc}"
        timeout = endpoint.timeout_seconds
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
            if timeout <= 0:
                return None, "TimeoutError: out of time before the judge was asked"
        try:
            answer = self._ask(endpoint, messages, grader, timeout)
        except (httpx.HTTPError, ModelGraderServerError) as exc:
            return None, f"ModelGraderServerError: {type(exc).__name__}: {exc}"
        try:
            return grader.score_answer(answer), None
        except ModelGraderParseError as exc:
            return None, f"ModelGraderParseError: {exc}"

    def _ask(
        self, endpoint: JudgeEndpoint, messages: list[dict[str, str]], grader: ModelGraderBase, timeout: float
    ) -> str:
        sampling = grader.sampling_params
        body: dict[str, Any] = {
            "model": endpoint.model,
            "messages": messages,
            "max_tokens": sampling.max_completions_tokens or DEFAULT_MAX_TOKENS,
            "temperature": sampling.temperature if sampling.temperature is not None else 0.0,
        }
        if sampling.top_p is not None:
            body["top_p"] = sampling.top_p
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        headers = (
            {"Authorization": f"Bearer {endpoint.api_key.get_secret_value()}"} if endpoint.api_key else {}
        )
        response = self._client.post(
            endpoint.base_url.rstrip("/") + "/chat/completions", json=body, headers=headers, timeout=timeout
        )
        if response.status_code != 200:
            raise ModelGraderServerError(f"HTTP {response.status_code}: {response.text[:300]}")
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, LookupError, TypeError) as exc:
            raise ModelGraderServerError(f"not a chat completion: {response.text[:300]}") from exc
        if not isinstance(content, str):
            raise ModelGraderServerError(f"the completion has no text content: {content!r}")
        return content

    def close(self) -> None:
        self._client.close()
