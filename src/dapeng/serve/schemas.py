"""Request and response bodies: the KServe / TF-Serving V1 protocol and OpenAI completions.

The request models forbid unknown fields, so a misspelt field is a 422 that names it.
Limits that depend on the server's settings (items per request, tokens per completion)
are built into the models by `build_request_models`, so the OpenAPI spec states them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, create_model

from dapeng.serve.config import ServeConfig

# One instance: a text, a record ({"text": ...}, {"b64": ...}) or an array of pixels.
Instance = str | dict[str, Any] | list[Any]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(BaseModel):
    """Every 4xx/5xx that is not a validation error."""

    detail: str


class PredictResponse(BaseModel):
    predictions: list[Any] = Field(description="one output per instance, in order")


class ExplainResponse(BaseModel):
    explanations: list[dict[str, Any]] = Field(description="one explanation per instance, in order")


class Batching(BaseModel):
    max_batch_size: int
    max_wait_ms: float


class ModelInfo(BaseModel):
    name: str
    ready: bool
    task: str
    labels: list[str] | None
    precision: str | None
    generates: bool = Field(description="whether /v1/completions and /v1/chat/completions serve it")
    batching: Batching


class ModelList(BaseModel):
    models: list[ModelInfo]


class Status(BaseModel):
    status: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]


class RequestModels(NamedTuple):
    predict: type[BaseModel]
    explain: type[BaseModel]
    completion: type[BaseModel]
    chat: type[BaseModel]


def build_request_models(config: ServeConfig) -> RequestModels:
    """The request bodies, with this server's limits in their schemas."""
    instances = Annotated[
        list[Instance],
        Field(min_length=1, max_length=config.max_items, description="the inputs, one prediction each"),
    ]
    predict = create_model("PredictRequest", __base__=_Strict, instances=(instances, ...))
    explain = create_model(
        "ExplainRequest",
        __base__=_Strict,
        instances=(instances, ...),
        method=(str, Field("ig", description="ig, saliency, gradcam, attention or rollout")),
        target=(str | int | None, Field(None, description="the label to explain; default the predicted one")),
    )
    sampling: dict[str, Any] = {
        "model": (str, Field(description="a served model that generates text")),
        "max_tokens": (int, Field(16, ge=1, le=config.max_new_tokens)),
        "temperature": (float, Field(1.0, ge=0.0, le=2.0)),
        "top_p": (float, Field(1.0, gt=0.0, le=1.0)),
        "top_k": (int | None, Field(None, ge=1)),
        "stop": (str | list[str] | None, Field(None, description="text that ends the completion")),
        "stream": (bool, Field(False, description="send pieces as server-sent events")),
        "seed": (int | None, Field(None, ge=0, lt=2**63)),
        "n": (Literal[1], Field(1, description="only one choice per request")),
        "user": (str | None, None),
    }
    completion = create_model(
        "CompletionRequest",
        __base__=_Strict,
        prompt=(str, Field(max_length=config.max_input_chars)),
        **sampling,
    )
    chat = create_model(
        "ChatCompletionRequest",
        __base__=_Strict,
        messages=(list[ChatMessage], Field(min_length=1, max_length=config.max_items)),
        **sampling,
    )
    return RequestModels(predict, explain, completion, chat)
