"""The API's request and reply bodies. They are the OpenAPI schema at /openapi.json, so every bound a
request must respect is written here, where clients (and the fuzz tests) can read it.

Types are strict ("1" is not a number) and unknown fields are ignored, as OpenAI's API does.
"""

import json
from typing import Annotated, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    model_validator,
)

MAX_TOKENS = 4096  # bound of max_tokens and min_tokens; each model's context bounds them further
MAX_PROMPTS = 16  # prompts in one completion request (each runs n times)
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 64
MAX_MODEL_NAME_CHARS = 256
MAX_MESSAGES = 256
MAX_LOGPROBS = 5  # completions' top alternatives per token, as OpenAI bounds it
MAX_TOP_LOGPROBS = 20  # chat's
SEED_RANGE = (-(2**63), 2**63 - 1)  # int64, as OpenAI documents; all 64 bits count (model/generate.py)


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


# OpenAI fields this server does not implement, with the values that ask for nothing (client libraries send
# some of them by default). Any other value is refused with a 400 naming the field, never silently ignored.
NEUTRAL_VALUES = {
    "best_of": (None, 1),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None, False),
    "response_format": (None, {"type": "text"}),
    "prediction": (None,),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
}


class StreamOptions(RequestBody):
    include_usage: bool = Field(False, description="a last chunk, with no choices, carries the usage")


class GenerationFields(RequestBody):
    """Sampling fields common to both endpoints."""

    model: _text(max_length=MAX_MODEL_NAME_CHARS)
    max_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS, description="0 only with `echo`: score the prompt")
    # Left out (or null), these take the model's sampling defaults: its export's generation_config.json, as
    # /v1/models lists them (`sampling`).
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 is greedy decoding; null: the model's")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="null: the model's")
    top_k: int | None = Field(None, ge=1, description="null: the model's (none if it sets none)")
    min_tokens: int = Field(0, ge=0, le=MAX_TOKENS, description="no end-of-text before this many tokens")
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="accepted and ignored (an end-user id for abuse tracking)")

    neutral_values: ClassVar[dict] = NEUTRAL_VALUES

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data):
        if isinstance(data, dict):
            for name, neutral in cls.neutral_values.items():
                if name in data and data[name] not in neutral:
                    raise UnsupportedField(name, neutral)
        return data


class UnsupportedField(ValueError):
    def __init__(self, name, neutral):
        values = " or ".join(json.dumps(value) for value in neutral)
        super().__init__(f"{name}: this server does not implement it; send it as {values}, or leave it out")
        self.field = name


# The checks below run as BeforeValidators, on the raw value before pydantic's own validation: a list's own
# validation builds an error per bad element, on the event loop (5 s for a 720 KB list of -1). They look at the
# whole list in one cheap pass and raise one error, so that any body costs about what a valid one does.


def _token_ids(value):
    if isinstance(value, list):
        for index, token in enumerate(value):
            if type(token) is not int or token < 0:  # strict: a bool is not a token id
                raise ValueError(f"item {index} is {json.dumps(token)[:20]}; token ids are integers, 0 or more")
    return value


def _at_most(count):
    def check(value):
        if isinstance(value, list) and len(value) > count:
            raise ValueError(f"should have at most {count} items, not {len(value)}")
        return value

    return BeforeValidator(check)


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1), BeforeValidator(_token_ids)]
PROMPT_SHAPES = "a string, a list of strings, a list of token ids or a list of lists of token ids"


def _prompt_shape(value):
    """Which of the four prompt types `value` can only be (the first item tells a list's), so that pydantic
    validates it against that one alone, not against each in turn with an error from every one."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        first = value[0] if value else ""
        return {str: "texts", int: "token_ids", list: "token_id_lists"}.get(type(first))
    return None


class CompletionRequest(GenerationFields):
    prompt: Annotated[
        Annotated[_text(min_length=1), Tag("text")]
        | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS), _at_most(MAX_PROMPTS), Tag("texts")]
        | Annotated[TokenIds, Tag("token_ids")]
        | Annotated[
            list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS), _at_most(MAX_PROMPTS), Tag("token_id_lists")
        ],
        Discriminator(
            _prompt_shape, custom_error_type="prompt_type", custom_error_message=f"should be {PROMPT_SHAPES}"
        ),
    ] = Field(
        ...,
        description="text, texts, token ids (taken as they are: no <|endoftext|> is put before them), or "
        "lists of token ids",
    )
    echo: bool = Field(False, description="the reply text (and logprobs) start with the prompt")
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description=(
            "log-probabilities of the chosen tokens and of this many most likely alternatives, under the model's "
            "own distribution (before temperature, top-k and top-p)"
        ),
    )


class Message(RequestBody):
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatRequest(GenerationFields):
    # Completions' `echo` repeats the prompt; a chat reply is the assistant's message alone.
    neutral_values: ClassVar[dict] = {**NEUTRAL_VALUES, "echo": (None, False)}
    messages: list[Message] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    logprobs: bool = Field(
        False,
        description="log-probabilities of the reply's tokens, under the model's own "
        "distribution (before temperature, top-k and top-p)",
    )
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="this many most likely alternatives per token; needs `logprobs`"
    )


class TokenizerFields(RequestBody):
    model: _text(max_length=MAX_MODEL_NAME_CHARS) | None = Field(
        None, description="a hosted model; may be left out when every hosted model has the same tokenizer"
    )


class TokenizeRequest(TokenizerFields):
    """vLLM's /tokenize, as lm-evaluation-harness's `tokenizer_backend=remote` calls it."""

    prompt: Text = Field(..., description="a document's text, tokenized as /v1/completions tokenizes its prompt")
    add_special_tokens: bool = Field(True, description="start with <|endoftext|>, as /v1/completions does")


class DetokenizeRequest(TokenizerFields):
    tokens: Annotated[list[Annotated[int, Field(ge=0)]], BeforeValidator(_token_ids)]


class TokenizeReply(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeReply(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """vLLM's /tokenizer_info: the export's tokenizer settings (tokenizer_config.json), as a Hugging Face
    tokenizer would read them."""

    tokenizer_class: str
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    model_max_length: int
    chat_template: str | None = Field(None, description="the chat model's (Jinja), when a chat model is named")


REQUEST_FIELD_NAMES = (
    set(CompletionRequest.model_fields)
    | set(ChatRequest.model_fields)
    | set(TokenizeRequest.model_fields)
    | set(DetokenizeRequest.model_fields)
    | set(Message.model_fields)
    | set(NEUTRAL_VALUES)
    | set(StreamOptions.model_fields)
)


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


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions format, one entry per token (the prompt's first token has no logprob)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
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


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatChoice(BaseModel):
    index: int
    message: ReplyMessage
    logprobs: ChatLogprobs | None = None
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
    sampling: dict[str, float | None] = Field(
        description="what a request gets for temperature, top_p and top_k when it leaves them out: the export's "
        "generation_config.json, else 1.0, 1.0 and none (the model's own distribution)"
    )
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
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = Field(None, description="with stream_options.include_usage, in the last chunk only")


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = Field(None, description="in the first chunk of a choice")
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(None, description="with stream_options.include_usage, in the last chunk only")


STREAM_CHUNKS = (CompletionChunk, ChatCompletionChunk)


def event_stream(chunk):
    """OpenAPI content of a stream of server-sent events: `chunk`s as JSON, then `data: [DONE]`."""
    chunk_json = {
        "contentMediaType": "application/json",
        "contentSchema": {"$ref": f"#/components/schemas/{chunk.__name__}"},
    }
    data = {"type": "string", "if": {"const": "[DONE]"}, "else": chunk_json}
    return {"text/event-stream": {"itemSchema": {"type": "object", "properties": {"data": data}, "required": ["data"]}}}
