"""The HTTP API: OpenAI-compatible completions and chat completions, the model listing, the web UI.

Models are chosen by name from the listing only; no client input ever becomes a path. Every
error is a 4xx in OpenAI's error shape naming the offending field, and never carries a trace.
Facing the internet: an optional API key guards /v1, CORS stays closed unless origins are named,
and the body size, prompt length, generation time and each model's queue are all bounded.
"""

import asyncio
import hmac
import json
import logging
import time
import uuid
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from model.export import load_export
from model.tokenizer import Tokenizer, check_same_vocabulary
from serve.engine import Engine, Sampling
from serve.schema import (REQUEST_FIELD_NAMES, STREAM_CHUNKS, ChatCompletion, ChatCompletionChunk, ChatRequest,
                          Completion, CompletionChunk, CompletionRequest, ErrorReply, Health, ModelList, event_stream)

log = logging.getLogger("serve")
STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 1_000_000
MAX_GENERATION_SECONDS = 120.0
MAX_QUEUE = 256  # generations waiting for a batch slot, per model
# Below this, sampling is greedy decoding in all but name, and logits / temperature would overflow to NaN.
GREEDY_BELOW_TEMPERATURE = 1e-6
# A top_p under the top token's probability (never under 1 / vocabulary size) keeps that token alone. Raising
# smaller values to this one changes nothing, and keeps them from rounding to 0 in float32, which drops every token.
MIN_TOP_P = 1e-6
ERROR_MEANINGS = {
    400: "a field is invalid; `param` names it",
    401: "the API key is missing or wrong",
    404: "no such model",
    413: "the body is over the size limit",
    429: "the model's queue is full; retry later",
    503: "the model is down: its decoding thread stopped on an error (see the server log)",
    "4XX": "any other refusal",
}


class APIError(Exception):
    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_body(message, param=None, code=None, kind="invalid_request_error"):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_responses(*statuses):
    """OpenAPI `responses` for these error statuses; "4XX" also keeps FastAPI from declaring a 422 we never send."""
    return {status: {"model": ErrorReply, "description": ERROR_MEANINGS[status]} for status in (*statuses, "4XX")}


class HostedModel:
    def __init__(self, name, folder, max_batch, precision):
        model, self.listing = load_export(folder)
        self.name = name
        self.tokenizer = Tokenizer(folder / "tokenizer.model")
        check_same_vocabulary(self.tokenizer, folder / "tokenizer.model", model.config, folder)
        # The tokenizer keeps text as it is (identity normalization), so no token covers more characters than
        # the longest piece: a text longer than limit * this is over the limit before it is tokenized.
        self.max_piece_chars = max(len(self.tokenizer.sp.id_to_piece(i)) for i in range(self.tokenizer.vocab_size))
        self.context_length = model.config.context_length
        self.chat = bool(self.listing.get("chat"))
        self.engine = Engine(model, self.tokenizer, max_batch, precision)

    def card(self):
        return {"id": self.name, "object": "model", "created": 0, "owned_by": "dvc-gpt-pipeline",
                "context_length": self.context_length, **self.listing}


def load_models(models_dir, max_batch, precision):
    """Every loadable model folder under `models_dir`; broken ones are reported and skipped.

    A model folder may be a symlink (an alias such as `latest -> base`) only if it resolves inside
    `models_dir`: the server reads no model from outside the folder it was given.
    """
    root = Path(models_dir).resolve()
    hosted = {}
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        if not folder.resolve().is_relative_to(root):
            log.error("skipping model folder %s: it links to %s, outside %s", folder, folder.resolve(), root)
            continue
        try:
            hosted[folder.name] = HostedModel(folder.name, folder, max_batch, precision)
            log.info("serving model %s from %s", folder.name, folder)
        except Exception as error:  # a broken folder must not take the others down
            log.error("skipping model folder %s: %s: %s", folder, type(error).__name__, error)
    if not hosted:
        raise SystemExit(f"no loadable model under {models_dir}: run `dvc repro` (stage export) first")
    return hosted


def _prompt_ids(hosted, encode, text, chars, field, max_prompt_tokens):
    """`encode(text)` if the prompt is within the limit; a text of `chars` far over it is refused untokenized."""
    # One token at least must fit after the prompt.
    limit = min(max_prompt_tokens or hosted.context_length, hosted.context_length - 1)
    if chars > limit * hosted.max_piece_chars:
        raise APIError(400, f"the prompt is over {limit} tokens; model '{hosted.name}' takes at most {limit}", field,
                       "context_length_exceeded")
    ids = encode(text)
    if len(ids) > limit:
        raise APIError(400, f"the prompt is {len(ids)} tokens; model '{hosted.name}' takes at most {limit}", field,
                       "context_length_exceeded")
    return ids


def _max_tokens(body, hosted, prompt_ids, default):
    room = hosted.context_length - len(prompt_ids)
    max_tokens = body.max_tokens if body.max_tokens is not None else min(default, room)
    if max_tokens > room:
        raise APIError(400, f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds the "
                            f"context of {hosted.context_length} tokens", "max_tokens", "context_length_exceeded")
    return max_tokens


def _sampling(body, max_tokens, stop_ids, max_seconds):
    if body.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens ({body.min_tokens}) must not exceed max_tokens ({max_tokens})", "min_tokens")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    temperature = 0.0 if body.temperature < GREEDY_BELOW_TEMPERATURE else body.temperature
    return Sampling(max_tokens=max_tokens, temperature=temperature, top_p=max(body.top_p, MIN_TOP_P),
                    top_k=body.top_k, min_tokens=body.min_tokens, stop=tuple(stops), stop_ids=stop_ids,
                    seed=body.seed, max_seconds=max_seconds)


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


def create_app(models_dir, max_batch=16, max_body_bytes=MAX_BODY_BYTES, precision="fp32", api_key=None,
               cors_origins=(), max_prompt_tokens=None, max_generation_seconds=MAX_GENERATION_SECONDS,
               max_queue=MAX_QUEUE):
    """`precision`: fp32 (exactly the exported model) or int8 (int8 linear weights, faster on CPUs).
    `api_key`: when given, required as `Authorization: Bearer <key>` on /v1. `cors_origins`: origins whose
    pages may call the API (none by default). `max_prompt_tokens`: None is each model's context.
    `max_queue`: generations that may wait for a batch slot, per model."""
    app = FastAPI(title="GPT pipeline server", version="1.0")
    app.state.models = load_models(models_dir, max_batch, precision)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    if cors_origins:
        # Added last, so outermost: refusals (401, 413) carry the CORS headers too and the page can read them.
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(APIError)
    async def api_error(request, error):
        return JSONResponse(error_body(error.message, error.param, error.code, error.kind), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, error):
        # A union field (prompt: string or list) fails once per member; "not a string" about a list is the
        # least telling, so an error of another kind goes first.
        first = min(error.errors(), key=lambda detail: detail["type"].endswith("_type"))
        if first["type"] == "json_invalid":
            return JSONResponse(error_body("the request body is not valid JSON (UTF-8)"), status_code=400)
        # Keep field names and list indexes; pydantic also puts union member types ("str") in the path.
        location = [str(part) for part in first["loc"] if isinstance(part, int) or part in REQUEST_FIELD_NAMES]
        field = ".".join(location) or None
        return JSONResponse(error_body(f"{field or 'body'}: {first['msg']}", field), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request, error):
        return JSONResponse(error_body(str(error.detail)), status_code=error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def unexpected_error(request, error):
        log.exception("unexpected error")
        return JSONResponse(error_body("internal error", kind="server_error"), status_code=500)

    def require_api_key(credentials: HTTPAuthorizationCredentials | None = Depends(HTTPBearer(auto_error=False))):
        # compare_digest takes the same time wherever the first wrong byte is, so timing reveals nothing of the key.
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), api_key.encode()):
            raise APIError(401, "this server needs an API key: send the header `Authorization: Bearer <key>`",
                           code="invalid_api_key")

    auth_errors = (401,) if api_key else ()
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)] if api_key else [])

    def hosted_model(name):
        if name not in app.state.models:
            raise APIError(404, f"model '{name}' does not exist; available: {', '.join(app.state.models)}",
                           "model", "model_not_found")
        return app.state.models[name]

    async def respond(hosted, body, jobs, chat, http_request):
        """Submits n generations per prompt and answers in one JSON body or as server-sent events."""
        if not hosted.engine.thread.is_alive():  # it died of an error: better a 503 than a reply that never comes
            raise APIError(503, f"model '{hosted.name}' is down (see the server log)", code="model_down",
                           kind="server_error")
        generations = len(jobs) * body.n
        if hosted.engine.waiting.qsize() + generations > max_queue:
            raise APIError(429, f"model '{hosted.name}' has its queue full ({max_queue} generations); retry later",
                           code="queue_full", kind="rate_limit_error")
        requests = []
        for ids, sampling in jobs:
            for choice in range(body.n):
                seed = None if sampling.seed is None else sampling.seed + choice
                requests.append(hosted.engine.submit(ids, Sampling(**{**sampling.__dict__, "seed": seed})))
        kind = "chat.completion" if chat else "text_completion"
        reply_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            return GenerationStream(requests, _stream(requests, hosted.name, reply_id, created, kind, chat))
        collecting = asyncio.ensure_future(_collect(requests, chat))
        client_gone = asyncio.ensure_future(_disconnected(http_request))
        try:
            done, _ = await asyncio.wait((collecting, client_gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            # All finished, the client gone or this handler cancelled: nothing is left worth generating.
            collecting.cancel()
            client_gone.cancel()
            for request in requests:
                request.cancelled = True
        if collecting not in done:
            raise APIError(499, "the client closed the connection before the reply")  # nobody reads it; logged
        choices, completion_tokens = collecting.result()
        prompt_tokens = sum(len(ids) for ids, _ in jobs) * body.n
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        return {"id": reply_id, "object": kind, "created": created, "model": hosted.name, "choices": choices,
                "usage": usage}

    @app.get("/health", response_model=Health, responses={503: {"model": Health, "description": "a model is down"}})
    async def health():
        serving = [name for name, hosted in app.state.models.items() if hosted.engine.thread.is_alive()]
        if len(serving) < len(app.state.models):
            return JSONResponse({"status": "error", "models": serving}, status_code=503)
        return {"status": "ok", "models": serving}

    @app.get("/", include_in_schema=False)
    async def web_ui():
        return FileResponse(STATIC / "index.html")

    @v1.get("/models", response_model=ModelList, responses=error_responses(*auth_errors))
    async def list_models():
        return {"object": "list", "data": [hosted.card() for hosted in app.state.models.values()]}

    @v1.post("/completions", response_model=Completion, responses={
        200: {"content": event_stream(CompletionChunk), "description": "with `stream`, server-sent events"},
        **error_responses(400, *auth_errors, 404, 413, 429, 503)})
    async def completions(body: CompletionRequest, http_request: Request):
        hosted = hosted_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        jobs = []
        for prompt in prompts:
            ids = _prompt_ids(hosted, hosted.tokenizer.document_prompt, prompt, len(prompt), "prompt",
                              max_prompt_tokens)
            sampling = _sampling(body, _max_tokens(body, hosted, ids, 16), hosted.tokenizer.document_end_ids,
                                 max_generation_seconds)
            jobs.append((ids, sampling))
        return await respond(hosted, body, jobs, False, http_request)

    @v1.post("/chat/completions", response_model=ChatCompletion, responses={
        200: {"content": event_stream(ChatCompletionChunk), "description": "with `stream`, server-sent events"},
        **error_responses(400, *auth_errors, 404, 413, 429, 503)})
    async def chat_completions(body: ChatRequest, http_request: Request):
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
        texts = [message.content for message in turns]
        ids = _prompt_ids(hosted, hosted.tokenizer.chat_prompt, texts, sum(map(len, texts)), "messages",
                          max_prompt_tokens)
        sampling = _sampling(body, _max_tokens(body, hosted, ids, hosted.context_length),
                             hosted.tokenizer.reply_end_ids, max_generation_seconds)
        return await respond(hosted, body, [(ids, sampling)], True, http_request)

    app.include_router(v1)
    _complete_openapi_schema(app)
    return app


def _complete_openapi_schema(app):
    """Adds to FastAPI's schema what it cannot derive: the stream chunks' definitions, and the hosted models as
    the only values of `model` (chat models only for chat), so that it describes the requests that can succeed."""
    build_schema = app.openapi

    def complete_schema():
        if app.openapi_schema is None:
            components = build_schema()["components"]["schemas"]
            for chunk in STREAM_CHUNKS:
                definition = chunk.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(definition.pop("$defs", {}), **{chunk.__name__: definition})
            chat_models = [name for name, hosted in app.state.models.items() if hosted.chat]
            for request, names in (("CompletionRequest", list(app.state.models)), ("ChatRequest", chat_models)):
                if names:  # with no chat model at all, any name is as good (all are refused)
                    components[request]["properties"]["model"]["enum"] = names
        return app.openapi_schema

    app.openapi = complete_schema


GENERATION_FAILED = "generating this reply failed on the server (the error is in its log); retry the request"


async def _collect(requests, chat):
    """(choices, completion tokens) once every generation has finished."""
    choices, completion_tokens = [], 0
    for index, request in enumerate(requests):
        text, event = "", None
        while event is None or event.finish_reason is None:
            event = await request.events.get()
            text += event.text
        if event.finish_reason == "error":
            raise APIError(500, GENERATION_FAILED, code="generation_failed", kind="server_error")
        completion_tokens += event.completion_tokens
        message = {"message": {"role": "assistant", "content": text}} if chat else {"text": text, "logprobs": None}
        choices.append({"index": index, "finish_reason": event.finish_reason, **message})
    return choices, completion_tokens


async def _disconnected(http_request):
    """Returns when the client has gone: its body is read already, so a disconnect is all that can arrive."""
    while (await http_request.receive())["type"] != "http.disconnect":
        pass


class GenerationStream(StreamingResponse):
    """Server-sent events of running generations, which are stopped whenever the response ends: finished,
    or cut short because the client left (Starlette then cancels the sending), even before the first chunk."""

    def __init__(self, requests, events):
        super().__init__(events, media_type="text/event-stream")
        self.requests = requests

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            for request in self.requests:
                request.cancelled = True


async def _stream(requests, model_name, reply_id, created, kind, chat):
    """Server-sent events, one chunk per piece of text, ending with `data: [DONE]`."""

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
                if event.finish_reason == "error":
                    yield f"data: {json.dumps(error_body(GENERATION_FAILED, code='generation_failed', kind='server_error'))}\n\n"
                    return
                yield chunk(index, event.text, event.finish_reason, first=index not in started)
                started.add(index)
                if event.finish_reason is None:
                    pending[asyncio.ensure_future(requests[index].events.get())] = index
        yield "data: [DONE]\n\n"
    finally:
        for future in pending:
            future.cancel()
