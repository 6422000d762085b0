"""The routes, and the checks a request passes before anything is generated for it.

Routes read the hosted models and the server's settings from `request.app.state` (create_app puts
them there). The checks refuse, naming the field: an unknown model (models are chosen by name from
the listing only, so no client input ever becomes a path), a token id outside the vocabulary, a
prompt over the limit (a text far over it before it is tokenized), and a max_tokens that does not
fit the context.
"""

import asyncio
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse

from model.generate import Sampling
from serve.errors import APIError, error_responses
from serve.guards import require_api_key
from serve.hosting import PLAIN_SAMPLING
from serve.replies import ChatReply, CompletionReply, Prompt, respond
from serve.schema import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatRequest,
    Completion,
    CompletionChunk,
    CompletionRequest,
    DetokenizeReply,
    DetokenizeRequest,
    Health,
    ModelList,
    TokenizeReply,
    TokenizeRequest,
    TokenizerInfo,
    event_stream,
)

STATIC = Path(__file__).parent / "static"
pages = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
docs = APIRouter(dependencies=[Depends(require_api_key)], include_in_schema=False)
# vLLM's tokenizer routes, at the root as vLLM serves them: lm-evaluation-harness tokenizes through them.
tokenizing = APIRouter(dependencies=[Depends(require_api_key)])
ROUTERS = (pages, docs, tokenizing, v1)
GENERATION_ERRORS = error_responses(400, 401, 404, 408, 413, 429, 503)


# --- checks ---------------------------------------------------------------------------------------


def _hosted_model(request, name, chat=False):
    models = request.app.state.models
    if name not in models:
        raise APIError(
            404, f"model '{name}' does not exist; available: {', '.join(models)}", "model", "model_not_found"
        )
    hosted = models[name]
    if chat and not hosted.chat:
        raise APIError(400, f"model '{hosted.name}' is a base model; use /v1/completions or a chat model", "model")
    return hosted


def _tokenizer_model(request, name):
    """The model named, or with no name the one tokenizer every hosted model shares."""
    if name is not None:
        return _hosted_model(request, name)
    models = list(request.app.state.models.values())
    if len({hosted.tokenizer_digest for hosted in models}) != 1:
        raise APIError(400, f"name a model: {', '.join(h.name for h in models) or 'none is loaded'}", "model")
    return models[0]


def _prompt_limit(hosted, settings):
    # One token at least must fit after the prompt.
    return min(settings.max_prompt_tokens or hosted.context_length, hosted.context_length - 1)


async def _prompt_ids(hosted, settings, encode, text, chars, field):
    """`encode(text)`, off the event loop, if the prompt is within the limit; a text of `chars` far over it is
    refused untokenized."""
    limit = _prompt_limit(hosted, settings)
    if chars > limit * hosted.max_piece_chars:
        raise APIError(
            400,
            f"the prompt is over {limit} tokens; model '{hosted.name}' takes at most {limit}",
            field,
            "context_length_exceeded",
        )
    ids = await asyncio.to_thread(encode, text)
    _check_prompt_length(hosted, settings, ids, field)
    return ids


def _check_vocabulary(hosted, ids, field):
    if ids and max(ids) >= hosted.vocab_size:
        raise APIError(
            400, f"token id {max(ids)} is not in model '{hosted.name}''s vocabulary of {hosted.vocab_size}", field
        )


def _check_prompt_length(hosted, settings, ids, field):
    limit = _prompt_limit(hosted, settings)
    if len(ids) > limit:
        raise APIError(
            400,
            f"the prompt is {len(ids)} tokens; model '{hosted.name}' takes at most {limit}",
            field,
            "context_length_exceeded",
        )


def _max_tokens(body, hosted, prompt_ids, default):
    room = hosted.context_length - len(prompt_ids)
    max_tokens = body.max_tokens if body.max_tokens is not None else min(default, room)
    if max_tokens > room:
        raise APIError(
            400,
            f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds the "
            f"context of {hosted.context_length} tokens",
            "max_tokens",
            "context_length_exceeded",
        )
    return max_tokens


def _sampling(body, hosted, max_tokens, stop_ids):
    """How to sample: the request's fields, and the model's defaults for those it leaves out."""
    if body.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens ({body.min_tokens}) must not exceed max_tokens ({max_tokens})", "min_tokens")
    chosen = {name: getattr(body, name) for name in PLAIN_SAMPLING if getattr(body, name) is not None}
    return Sampling(
        max_tokens=max_tokens, min_tokens=body.min_tokens, stop_ids=tuple(stop_ids), **{**hosted.sampling, **chosen}
    )


# --- routes ---------------------------------------------------------------------------------------


@pages.get("/health", response_model=Health, responses={503: {"model": Health, "description": "a model is down"}})
async def health(request: Request):
    models = request.app.state.models
    serving = [name for name, hosted in models.items() if hosted.engine.alive]
    if len(serving) < len(models):
        return JSONResponse(Health(status="error", models=serving).model_dump(), status_code=503)
    return Health(status="ok", models=serving)


@pages.get("/", include_in_schema=False)
async def web_ui():
    return FileResponse(STATIC / "index.html")


@docs.get("/openapi.json")
async def openapi_schema(request: Request):
    return JSONResponse(request.app.openapi())


@docs.get("/docs")
async def swagger_ui(request: Request):
    return get_swagger_ui_html(openapi_url="/openapi.json", title=request.app.title)


@docs.get("/redoc")
async def redoc(request: Request):
    return get_redoc_html(openapi_url="/openapi.json", title=request.app.title)


@v1.get("/models", response_model=ModelList, responses=error_responses(401))
async def list_models(request: Request):
    return {"object": "list", "data": [hosted.card() for hosted in request.app.state.models.values()]}


@tokenizing.get("/tokenizer_info", response_model=TokenizerInfo, responses=error_responses(400, 401, 404))
async def tokenizer_info(request: Request, model: str | None = None):
    return _tokenizer_model(request, model).tokenizer_info


@tokenizing.post("/tokenize", response_model=TokenizeReply, responses=error_responses(400, 401, 404, 408, 413))
async def tokenize(body: TokenizeRequest, request: Request):
    hosted = _tokenizer_model(request, body.model)
    encode = hosted.tokenizer.document_prompt if body.add_special_tokens else hosted.tokenizer.document_text
    ids = await asyncio.to_thread(encode, body.prompt)
    return TokenizeReply(count=len(ids), max_model_len=hosted.context_length, tokens=ids)


@tokenizing.post("/detokenize", response_model=DetokenizeReply, responses=error_responses(400, 401, 404, 408, 413))
async def detokenize(body: DetokenizeRequest, request: Request):
    hosted = _tokenizer_model(request, body.model)
    _check_vocabulary(hosted, body.tokens, "tokens")
    return DetokenizeReply(prompt=await asyncio.to_thread(hosted.tokenizer.decode, body.tokens))


@v1.post(
    "/completions",
    response_model=Completion,
    response_model_exclude_none=False,
    responses={
        200: {"content": event_stream(CompletionChunk), "description": "with `stream`, server-sent events"},
        **GENERATION_ERRORS,
    },
)
async def completions(body: CompletionRequest, request: Request):
    hosted = _hosted_model(request, body.model)
    settings = request.app.state.settings
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens 0 generates nothing; it is for scoring a prompt, with echo", "max_tokens")
    # `prompt` is one prompt (a text, or token ids) or a list of them.
    if isinstance(body.prompt, str) or (body.prompt and isinstance(body.prompt[0], int)):
        texts_or_ids = [body.prompt]
    else:
        texts_or_ids = body.prompt
    prompts = []
    for index, text_or_ids in enumerate(texts_or_ids):
        field = "prompt" if len(texts_or_ids) == 1 else f"prompt.{index}"
        if isinstance(text_or_ids, str):
            encode = hosted.tokenizer.document_prompt
            ids = await _prompt_ids(hosted, settings, encode, text_or_ids, len(text_or_ids), field)
        else:
            ids = list(text_or_ids)
            _check_vocabulary(hosted, ids, field)
            _check_prompt_length(hosted, settings, ids, field)
        sampling = _sampling(body, hosted, _max_tokens(body, hosted, ids, 16), hosted.tokenizer.document_end_ids)
        echo_text = hosted.tokenizer.decode(ids) if body.echo else ""
        prompts.append(Prompt(ids, sampling, body.echo, echo_text))
    return await respond(request, hosted, body, prompts, CompletionReply, body.logprobs)


@v1.post(
    "/chat/completions",
    response_model=ChatCompletion,
    response_model_exclude_none=True,
    responses={
        200: {"content": event_stream(ChatCompletionChunk), "description": "with `stream`, server-sent events"},
        **GENERATION_ERRORS,
    },
)
async def chat_completions(body: ChatRequest, request: Request):
    hosted = _hosted_model(request, body.model, chat=True)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    for i, message in enumerate(body.messages):
        if message.role == "system":
            # The training format has no system role; dropping it would answer a conversation the client did
            # not send.
            raise APIError(
                400,
                "this model was trained without system messages; send the instruction in the first user message",
                f"messages.{i}.role",
            )
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            raise APIError(
                400,
                f"messages must alternate user / assistant starting with user and end with a user "
                f"message; message {i} is '{message.role}'",
                "messages",
            )
    if body.messages[-1].role != "user":
        raise APIError(400, "the last message must be from the user", "messages")
    if body.max_tokens == 0:
        raise APIError(400, "max_tokens 0 generates nothing", "max_tokens")
    texts = [message.content for message in body.messages]
    ids = await _prompt_ids(
        hosted, request.app.state.settings, hosted.tokenizer.chat_prompt, texts, sum(map(len, texts)), "messages"
    )
    sampling = _sampling(
        body, hosted, _max_tokens(body, hosted, ids, hosted.context_length), hosted.tokenizer.reply_end_ids
    )
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return await respond(request, hosted, body, [Prompt(ids, sampling)], ChatReply, logprobs)
