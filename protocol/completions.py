"""The OpenAI-compatible request bodies, and what the API sends the model server. No torch here.

The API validates a request with these models (a malformed one answers 400 naming the field),
finds the model the caller may use, and forwards `Forwarded` to the model server, which parses
the same models again and answers in OpenAI's response and stream-chunk formats.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP_STRINGS = 4
MAX_CHOICES = 16  # n, and n x prompts of one completions request
MAX_TEXT_CHARS = 1_000_000  # per message or prompt: far beyond any context window, cheap to refuse
MAX_MESSAGES = 1024
StopString = Annotated[str, Field(min_length=1, max_length=1000)]
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="`developer` is read as `system`."
    )
    content: Text | Annotated[list[TextPart], Field(min_length=1, max_length=MAX_MESSAGES)] = Field(
        description="Text, or a list of text parts (images and audio are not supported)."
    )
    name: str | None = Field(None, max_length=256)

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields both endpoints share; unknown fields are refused (a silently ignored option misleads)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(
        min_length=1, max_length=500, description="A base model id, or a trained adapter's `ft:...` name."
    )
    max_tokens: int | None = Field(None, ge=1, description="Completion tokens at most.")
    temperature: float = Field(1.0, ge=0, le=2, description="0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Completions per prompt.")
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = Field(
        None, description=f"Up to {MAX_STOP_STRINGS} strings; the text ends before the first one found."
    )
    seed: int | None = Field(None, description="Same seed and request, same completion.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: int | None = Field(None, ge=1, description="The newer name of `max_tokens`.")

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_CHOICES)]
    max_tokens: int | None = Field(16, ge=1, description="Completion tokens at most (default 16, as OpenAI).")

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


class AdapterRef(BaseModel):
    """Where a trained adapter's archive lies in object storage, and its digest."""

    storage_key: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    # The adapter's folder inside the archive: a job's adapter and a checkpoint's both use `adapter`.
    directory: str = Field("adapter", pattern=r"^[A-Za-z0-9_.-]+$")


class Target(BaseModel):
    """The model the API resolved for the caller's `model`."""

    name: str  # what the caller asked for, echoed in every response
    base_model: str
    adapter: AdapterRef | None = None


class ForwardedChat(BaseModel):
    target: Target
    request: ChatCompletionRequest


class ForwardedCompletion(BaseModel):
    target: Target
    request: CompletionRequest


CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
