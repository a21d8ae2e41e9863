"""Request and response bodies: KServe / TF-Serving V1, KServe V2 (Open Inference Protocol), OpenAI.

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


def predict_response(output_schemas: list[dict[str, Any]]) -> type[BaseModel]:
    """The `:predict` answer, each prediction described by the served tasks' output schemas."""
    items = _one_of(output_schemas)  # a model without a schema may answer anything
    return create_model(
        "PredictResponse",
        predictions=(list[Any], Field(description="one output per instance, in order",
                                      json_schema_extra={"items": items})),
    )


class ExplainResponse(BaseModel):
    explanations: list[dict[str, Any]] = Field(description="one explanation per instance, in order")


class Batching(BaseModel):
    max_batch_size: int
    max_wait_ms: float


class ModelInfo(BaseModel):
    """One model, readable both as KServe's model entry and as OpenAI's model object."""

    id: str = Field(description="the model's name (OpenAI's `id`)")
    object: Literal["model"] = "model"
    created: int = Field(description="when the server loaded it (Unix seconds)")
    owned_by: str = "dapeng"
    name: str
    ready: bool
    task: str
    labels: list[str] | None
    precision: str | None
    capabilities: dict[str, Any] = Field(description="what the task does: input, output, verbs, explanation "
                                         "methods, batching")
    generates: bool = Field(description="whether /v1/completions and /v1/chat/completions serve it")
    embeds: bool = Field(False, description="whether /v1/embeddings serves it")
    batching: Batching


class ModelList(BaseModel):
    """The served models: OpenAI's list (`object`, `data`) beside KServe's (`models`)."""

    object: Literal["list"] = "list"
    data: list[ModelInfo]
    models: list[ModelInfo]


class Status(BaseModel):
    status: str


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = Field(description="a text, or a list of text parts")
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(BaseModel):
    """Every error of the /v1/completions, /v1/chat/completions and /v1/embeddings routes (OpenAI's shape)."""

    error: OpenAIError


class V2Error(BaseModel):
    """Every error of the /v2 routes (the Open Inference Protocol's shape)."""

    error: str


class V2Tensor(_Strict):
    name: str
    shape: list[Annotated[int, Field(ge=0)]]
    datatype: Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16",
                      "FP32", "FP64", "BYTES"]
    data: list[Any] | None = Field(None, description="the elements, flat or nested in row-major order (none "
                                   "with the binary extension's parameters.binary_data_size)")
    parameters: dict[str, Any] | None = None


class V2RequestedOutput(_Strict):
    name: str
    parameters: dict[str, Any] | None = None


class V2InferRequest(_Strict):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[V2Tensor] = Field(min_length=1)
    outputs: list[V2RequestedOutput] | None = Field(None, description="the outputs to send; default all")


class V2OutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[Any]


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[V2OutputTensor]


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for a dimension of any size")


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2Live(BaseModel):
    live: bool


class V2Ready(BaseModel):
    ready: bool


class V2ModelReady(BaseModel):
    name: str
    ready: bool


class StreamOptions(_Strict):
    include_usage: bool = Field(False, description="send a last chunk with the usage of the whole request")


class ResponseFormat(_Strict):
    type: Literal["text"] = Field(description="only plain text")


class RequestModels(NamedTuple):
    predict: type[BaseModel]
    explain: type[BaseModel]
    completion: type[BaseModel]
    chat: type[BaseModel]
    embedding: type[BaseModel]


def _one_of(schemas: list[dict[str, Any]]) -> dict[str, Any]:
    """One schema for values of any of `schemas` (duplicates dropped; {} when one of them is open)."""
    unique = [s for i, s in enumerate(schemas) if s not in schemas[:i]]
    if not unique or not all(unique):
        return {}
    return unique[0] if len(unique) == 1 else {"anyOf": unique}


def build_request_models(config: ServeConfig, input_schemas: list[dict[str, Any]] | None = None) -> RequestModels:
    """The request bodies, with this server's limits in their schemas.

    `input_schemas` are the served tasks' declared inputs (`Capabilities.input_schema`): the
    OpenAPI document states what one instance is, e.g. `{"image": {"b64": ...}, "text": ...}`.

    Where OpenAI's API leaves a default open, the server takes `dapeng generate`'s: no
    top-k, no penalties; the token budget is the rest of the model's context, up to the
    server's `max_new_tokens`. `temperature` and `top_p` default to 1 as OpenAI's do.
    """
    instances = Annotated[
        list[Instance],
        Field(min_length=1, max_length=config.max_items, description="the inputs, one prediction each",
              json_schema_extra={"items": _one_of(input_schemas or [])}),
    ]
    predict = create_model("PredictRequest", __base__=_Strict, instances=(instances, ...))
    explain = create_model(
        "ExplainRequest",
        __base__=_Strict,
        instances=(instances, ...),
        method=(str, Field("ig", description="ig, saliency, gradcam, attention or rollout")),
        target=(str | int | None, Field(None, description="the label to explain; default the predicted one")),
    )
    budget = (int | None, Field(None, ge=1, le=config.max_new_tokens,
                                description="tokens to generate at most; default the rest of the context"))
    sampling: dict[str, Any] = {
        "model": (str, Field(description="a served model that generates text")),
        "max_tokens": budget,
        "max_completion_tokens": budget,
        "temperature": (float, Field(1.0, ge=0.0, le=2.0, description="0 is greedy; below 1e-5 too")),
        "top_p": (float, Field(1.0, gt=0.0, le=1.0)),
        "top_k": (int | None, Field(None, ge=1)),
        "stop": (str | list[str] | None, Field(None, max_length=4, description="text that ends the completion")),
        "stream": (bool, Field(False, description="send pieces as server-sent events")),
        "stream_options": (StreamOptions | None, None),
        "seed": (int | None, Field(None, ge=-(2**63), lt=2**63, description="choice i samples with seed + i")),
        "n": (int, Field(1, ge=1, le=config.max_items, description="choices per prompt")),
        "presence_penalty": (float, Field(0.0, ge=-2.0, le=2.0)),
        "frequency_penalty": (float, Field(0.0, ge=-2.0, le=2.0)),
        "user": (str | None, None),
    }
    prompt_text = Annotated[str, Field(max_length=config.max_input_chars)]
    completion = create_model(
        "CompletionRequest",
        __base__=_Strict,
        prompt=(prompt_text | Annotated[list[prompt_text], Field(min_length=1, max_length=config.max_items)],
                Field(description="a text, or a list of texts (one choice each)")),
        logprobs=(int | None, Field(None, ge=0, le=5, description="log-probabilities of this many alternatives")),
        **sampling,
    )
    chat = create_model(
        "ChatCompletionRequest",
        __base__=_Strict,
        messages=(list[ChatMessage], Field(min_length=1, max_length=config.max_items)),
        logprobs=(bool, Field(False, description="log-probabilities of the generated tokens")),
        top_logprobs=(int | None, Field(None, ge=0, le=20, description="alternatives per token (with logprobs)")),
        response_format=(ResponseFormat | None, None),
        **sampling,
    )
    text = Annotated[str, Field(max_length=config.max_input_chars)]
    embedding = create_model(
        "EmbeddingRequest",
        __base__=_Strict,
        model=(str, Field(description="a served embedding model")),
        input=(text | Annotated[list[text], Field(min_length=1, max_length=config.max_items)], ...),
        encoding_format=(Literal["float", "base64"], "float"),
        dimensions=(int | None, Field(None, ge=1, description="must be the model's own size")),
        user=(str | None, None),
    )
    return RequestModels(predict, explain, completion, chat, embedding)
