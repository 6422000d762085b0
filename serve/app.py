"""The HTTP API: OpenAI-compatible completions and chat completions, the model listing, the web UI.

Models are chosen by name from the listing only; no client input ever becomes a path. Every
error is a 4xx in OpenAI's error shape naming the offending field, and never carries a trace.
"""

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from model.export import load_export
from model.tokenizer import Tokenizer
from serve.engine import Engine, Sampling

log = logging.getLogger("serve")
STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 1_000_000
MAX_STOP_STRINGS = 4


class APIError(Exception):
    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_body(message, param=None, code=None, kind="invalid_request_error"):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class GenerationFields(BaseModel):
    """Sampling fields common to both endpoints; types are strict ("1" is not a number)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy decoding")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    min_tokens: int = Field(0, ge=0, description="no end-of-text before this many tokens")
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=8)
    stream: bool = False


class CompletionRequest(GenerationFields):
    prompt: str | list[str] = Field(..., min_length=1)


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(GenerationFields):
    messages: list[Message] = Field(..., min_length=1)


FIELD_NAMES = set(CompletionRequest.model_fields) | set(ChatRequest.model_fields) | set(Message.model_fields)


class HostedModel:
    def __init__(self, name, folder, max_batch, precision):
        model, self.listing = load_export(folder)
        self.name = name
        self.tokenizer = Tokenizer(folder / "tokenizer.model")
        if self.tokenizer.vocab_size != model.config.vocab_size:
            raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} tokens, the model {model.config.vocab_size}")
        self.context_length = model.config.context_length
        self.chat = bool(self.listing.get("chat"))
        self.engine = Engine(model, self.tokenizer, max_batch, precision)

    def card(self):
        return {"id": self.name, "object": "model", "created": 0, "owned_by": "dvc-gpt-pipeline",
                "context_length": self.context_length, **self.listing}


def load_models(models_dir, max_batch, precision):
    """Every loadable model folder under `models_dir`; broken ones are reported and skipped."""
    hosted = {}
    for folder in sorted(Path(models_dir).iterdir()) if Path(models_dir).is_dir() else []:
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        try:
            hosted[folder.name] = HostedModel(folder.name, folder, max_batch, precision)
            log.info("serving model %s from %s", folder.name, folder)
        except Exception as error:  # a broken folder must not take the others down
            log.error("skipping model folder %s: %s: %s", folder, type(error).__name__, error)
    if not hosted:
        raise SystemExit(f"no loadable model under {models_dir}: run `dvc repro` (stage export) first")
    return hosted


def _sampling(body, max_tokens, stop_ids):
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOP_STRINGS or any(stop == "" for stop in stops):
        raise APIError(400, f"stop must be up to {MAX_STOP_STRINGS} non-empty strings", "stop")
    if body.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens ({body.min_tokens}) must not exceed max_tokens ({max_tokens})", "min_tokens")
    return Sampling(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                    min_tokens=body.min_tokens, stop=tuple(stops), stop_ids=stop_ids, seed=body.seed)


def _max_tokens(body, hosted, prompt_ids, default, prompt_field):
    room = hosted.context_length - len(prompt_ids)
    if room < 1:
        raise APIError(400, f"the prompt is {len(prompt_ids)} tokens; model '{hosted.name}' holds "
                            f"{hosted.context_length} in all", prompt_field,
                       "context_length_exceeded")
    max_tokens = body.max_tokens if body.max_tokens is not None else min(default, room)
    if max_tokens > room:
        raise APIError(400, f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds the "
                            f"context of {hosted.context_length} tokens", "max_tokens", "context_length_exceeded")
    return max_tokens


class BodySizeLimit:
    """Refuses request bodies over `max_bytes` (413) while they arrive, declared length or not."""

    def __init__(self, app, max_bytes):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes or (declared.isdigit() and int(declared) > self.max_bytes):
                raise HTTPException(413, f"the request body is over the limit of {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)


def create_app(models_dir, max_batch=16, max_body_bytes=MAX_BODY_BYTES, precision="fp32"):
    """`precision`: fp32 (exactly the exported model) or int8 (int8 linear weights, faster on CPUs)."""
    app = FastAPI(title="GPT pipeline server", version="1.0")
    app.state.models = load_models(models_dir, max_batch, precision)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)

    @app.exception_handler(APIError)
    async def api_error(request, error):
        return JSONResponse(error_body(error.message, error.param, error.code, error.kind), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, error):
        first = error.errors()[0]
        # Keep field names and list indexes; pydantic also puts union member types ("str") in the path.
        location = [str(part) for part in first["loc"] if isinstance(part, int) or part in FIELD_NAMES]
        if first["type"] == "json_invalid":
            return JSONResponse(error_body("the request body is not valid JSON (UTF-8)"), status_code=400)
        field = ".".join(location) or None
        return JSONResponse(error_body(f"{field or 'body'}: {first['msg']}", field), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request, error):
        return JSONResponse(error_body(str(error.detail)), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def unexpected_error(request, error):
        log.exception("unexpected error")
        return JSONResponse(error_body("internal error", kind="server_error"), status_code=500)

    def hosted_model(name):
        if name not in app.state.models:
            raise APIError(404, f"model '{name}' does not exist; available: {', '.join(app.state.models)}",
                           "model", "model_not_found")
        return app.state.models[name]

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(app.state.models)}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [hosted.card() for hosted in app.state.models.values()]}

    @app.get("/", include_in_schema=False)
    async def web_ui():
        return FileResponse(STATIC / "index.html")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        hosted = hosted_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        encoded = [hosted.tokenizer.document_prompt(prompt) for prompt in prompts]
        jobs = [(ids, _sampling(body, _max_tokens(body, hosted, ids, 16, "prompt"), hosted.tokenizer.document_end_ids))
                for ids in encoded]
        return await _respond(hosted, body, jobs, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        hosted = hosted_model(body.model)
        if not hosted.chat:
            raise APIError(400, f"model '{hosted.name}' is a base model; use /v1/completions or a chat model",
                           "model")
        # The training format has no system role: system messages are dropped.
        turns = [message for message in body.messages if message.role != "system"]
        for i, message in enumerate(turns):
            expected = "user" if i % 2 == 0 else "assistant"
            if message.role != expected:
                raise APIError(400, f"messages must alternate user / assistant starting with user and end with "
                                    f"a user message; message {i} is '{message.role}'", "messages")
        if not turns or turns[-1].role != "user":
            raise APIError(400, "the last message must be from the user", "messages")
        ids = hosted.tokenizer.chat_prompt([message.content for message in turns])
        jobs = [(ids, _sampling(body, _max_tokens(body, hosted, ids, hosted.context_length, "messages"),
                                   hosted.tokenizer.reply_end_ids))]
        return await _respond(hosted, body, jobs, chat=True)

    return app


async def _respond(hosted, body, jobs, chat):
    """Submits n generations per prompt and answers in one JSON body or as server-sent events."""
    requests = []
    for ids, sampling in jobs:
        for choice in range(body.n):
            seed = None if sampling.seed is None else sampling.seed + choice
            requests.append(hosted.engine.submit(ids, Sampling(**{**sampling.__dict__, "seed": seed})))
    kind = "chat.completion" if chat else "text_completion"
    reply_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    prompt_tokens = sum(len(ids) for ids, _ in jobs) * body.n

    if body.stream:
        return StreamingResponse(_stream(requests, hosted.name, reply_id, created, kind, chat),
                                 media_type="text/event-stream")
    try:
        choices, completion_tokens = [], 0
        for index, request in enumerate(requests):
            text, event = "", None
            while event is None or event.finish_reason is None:
                event = await request.events.get()
                text += event.text
            completion_tokens += event.completion_tokens
            message = {"message": {"role": "assistant", "content": text}} if chat else {"text": text, "logprobs": None}
            choices.append({"index": index, "finish_reason": event.finish_reason, **message})
    finally:
        for request in requests:
            request.cancelled = True
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    return {"id": reply_id, "object": kind, "created": created, "model": hosted.name, "choices": choices,
            "usage": usage}


async def _stream(requests, model_name, reply_id, created, kind, chat):
    """Server-sent events, one chunk per piece of text, ending with `data: [DONE]`.

    If the client goes away, Starlette cancels this generator and `finally` stops the generations.
    """

    def chunk(index, text, finish_reason, first=False):
        if chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
        body = {"id": reply_id, "object": f"{kind}.chunk" if chat else kind, "created": created, "model": model_name,
                "choices": [choice]}
        return f"data: {json.dumps(body)}\n\n"

    pending = {asyncio.ensure_future(request.events.get()): index for index, request in enumerate(requests)}
    started = set()
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                index = pending.pop(future)
                event = future.result()
                yield chunk(index, event.text, event.finish_reason, first=index not in started)
                started.add(index)
                if event.finish_reason is None:
                    pending[asyncio.ensure_future(requests[index].events.get())] = index
        yield "data: [DONE]\n\n"
    finally:
        for future in pending:
            future.cancel()
        for request in requests:
            request.cancelled = True
