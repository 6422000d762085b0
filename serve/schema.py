"""The API's request and reply bodies. They are the OpenAPI schema at /openapi.json, so every bound a
request must respect is written here, where clients (and the fuzz tests) can read it.

Types are strict ("1" is not a number) and unknown fields are ignored, as OpenAI's API does.
"""

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

MAX_TOKENS = 4096  # bound of max_tokens and min_tokens; each model's context bounds them further
MAX_PROMPTS = 16  # prompts in one completion request (each runs n times)
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 64
MAX_MODEL_NAME_CHARS = 256
SEED_RANGE = (-(2**63), 2**63 - 1)  # int64; torch's manual_seed takes up to 2**64 - 1, room for seed + choice


def _valid_unicode(text):
    # JSON can carry lone surrogates ("\ud800"), which neither the tokenizer nor a UTF-8 reply can hold.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it holds a lone surrogate code point)") from None
    return text


def _text(**bounds):
    """A string type within `bounds` (min_length, max_length) that must be valid Unicode."""
    return Annotated[str, StringConstraints(**bounds), AfterValidator(_valid_unicode)]


Text = _text()
StopString = _text(min_length=1, max_length=MAX_STOP_CHARS)


class RequestBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class GenerationFields(RequestBody):
    """Sampling fields common to both endpoints."""

    model: _text(max_length=MAX_MODEL_NAME_CHARS)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy decoding")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    min_tokens: int = Field(0, ge=0, le=MAX_TOKENS, description="no end-of-text before this many tokens")
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    n: int = Field(1, ge=1, le=8)
    stream: bool = False


class CompletionRequest(GenerationFields):
    prompt: _text(min_length=1) | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)]


class Message(RequestBody):
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatRequest(GenerationFields):
    messages: list[Message] = Field(..., min_length=1)


REQUEST_FIELD_NAMES = set(CompletionRequest.model_fields) | set(ChatRequest.model_fields) | set(Message.model_fields)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = Field(description="the request field at fault, dotted (messages.0.content)")
    code: str | None


class ErrorReply(BaseModel):
    """OpenAI's error shape: every refusal comes in it."""

    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length"]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None
    finish_reason: FinishReason


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ReplyMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ReplyMessage
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    """A hosted model; the export's pipeline.json (metrics, training, data) comes along as extra fields."""

    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    context_length: int
    chat: bool
    parameters: int
    revision: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "error"]
    models: list[str] = Field(description="the models serving; with status error, some are down")


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: None
    finish_reason: FinishReason | None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = Field(None, description="in the first chunk of a choice")
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]


STREAM_CHUNKS = (CompletionChunk, ChatCompletionChunk)


def event_stream(chunk):
    """OpenAPI content of a stream of server-sent events: `chunk`s as JSON, then `data: [DONE]`."""
    chunk_json = {"contentMediaType": "application/json",
                  "contentSchema": {"$ref": f"#/components/schemas/{chunk.__name__}"}}
    data = {"type": "string", "if": {"const": "[DONE]"}, "else": chunk_json}
    return {"text/event-stream": {"itemSchema": {"type": "object", "properties": {"data": data}, "required": ["data"]}}}
