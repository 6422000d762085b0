"""The HTTP API: OpenAI-compatible completions and chat completions, the model listing, the web UI.

Models are chosen by name from the listing only; no client input ever becomes a path. Every
error is a 4xx in OpenAI's error shape naming the offending field, and never carries a trace.
Facing the internet: an optional API key guards /v1 and the API docs, CORS stays closed unless
origins are named, a loopback server answers only to loopback host names (no DNS rebinding), and
the body size, body read time, prompt length, generation time and each model's queue are all
bounded.

`create_app` keeps its settings in `app.state`; the routes below read them from there.
"""

import asyncio
import codecs
import contextlib
import hashlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from model.export import load_export
from model.generate import Sampling
from model.token_arrays import check_same_vocabulary
from model.tokenizer import Tokenizer
from serve.engine import DEFAULT_PRECISION, DEFAULT_THREADS, Engine
from serve.schema import (
    REQUEST_FIELD_NAMES,
    STREAM_CHUNKS,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    ChatRequest,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionLogprobs,
    CompletionRequest,
    DetokenizeReply,
    DetokenizeRequest,
    ErrorReply,
    Health,
    ModelList,
    ReplyMessage,
    TokenizeReply,
    TokenizeRequest,
    TokenizerInfo,
    TokenLogprob,
    TopLogprob,
    UnsupportedField,
    Usage,
    event_stream,
)

log = logging.getLogger("serve")
STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 1_000_000
BODY_SECONDS = 30.0  # to receive a whole request body
MAX_GENERATION_SECONDS = 120.0
MAX_QUEUE = 256  # generations waiting for a batch slot, per model
# Sampling from the model's own distribution: what a request gets where neither it nor the export says otherwise.
PLAIN_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": None}
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
ERROR_MEANINGS = {
    400: "a field is invalid; `param` names it",
    401: "the API key is missing or wrong (only when the server has one)",
    404: "no such model",
    408: "the request body did not arrive in time",
    413: "the body is over the size limit",
    429: "the model's queue is full; retry later",
    503: "the model is down: its decoding thread stopped on an error (see the server log)",
    "4XX": "any other refusal",
}
GENERATION_FAILED = "generating this reply failed on the server (the error is in its log); retry the request"


class APIError(Exception):
    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_body(message, param=None, code=None, kind="invalid_request_error"):
    return ErrorReply(error={"message": message, "type": kind, "param": param, "code": code}).model_dump()


def error_responses(*statuses):
    """OpenAPI `responses` for these error statuses; "4XX" also keeps FastAPI from declaring a 422 we never send."""
    return {status: {"model": ErrorReply, "description": ERROR_MEANINGS[status]} for status in (*statuses, "4XX")}


@dataclass(frozen=True)
class Settings:
    api_key: str | None
    max_prompt_tokens: int | None
    max_generation_seconds: float
    max_queue: int


class HostedModel:
    def __init__(self, name, folder, max_batch, precision, threads):
        model, self.listing = load_export(folder)
        self.name = name
        self.tokenizer = Tokenizer(folder / "tokenizer.model")
        check_same_vocabulary(self.tokenizer.vocab_size, folder / "tokenizer.model", model.config, folder)
        # The export holds no timestamp (a rerun writes the same bytes): the weights' file time is when it was
        # written (or checked out) here.
        self.created = int((folder / "model.safetensors").stat().st_mtime)
        # What a request gets for each sampling field it leaves out: the export's defaults, as transformers and
        # vLLM take them from generation_config.json (the GGUF and the Modelfile carry the same), else sampling
        # from the model's own distribution.
        generation_config = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
        self.sampling = {name: generation_config.get(name, plain) for name, plain in PLAIN_SAMPLING.items()}
        self.tokenizer_digest = hashlib.sha256((folder / "tokenizer.model").read_bytes()).hexdigest()
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        self.tokenizer_info = TokenizerInfo.model_validate(
            {name: tokenizer_config.get(name) for name in TokenizerInfo.model_fields}
        )
        # The tokenizer keeps text as it is (identity normalization), so no token covers more characters than
        # the longest piece: a text longer than limit * this is over the limit before it is tokenized.
        self.max_piece_chars = max(len(self.tokenizer.sp.id_to_piece(i)) for i in range(self.tokenizer.vocab_size))
        self.vocab_size = self.tokenizer.vocab_size
        self.context_length = model.config.context_length
        self.chat = bool(self.listing.get("chat"))
        self.engine = Engine(model, self.tokenizer, max_batch, precision, threads, name)

    def card(self):
        return {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "dvc-gpt-pipeline",
            "context_length": self.context_length,
            "sampling": self.sampling,
            **self.listing,
        }

    def text_bytes(self, token):
        """The UTF-8 bytes `token` adds to a decoded text: a control token (<|endoftext|>) adds none, a byte
        piece its byte (maybe a part of a character)."""
        if self.tokenizer.sp.is_control(token):
            return b""
        return bytes(self.token_text(token)[1])

    def token_text(self, token):
        """(text, UTF-8 bytes) of one token; a byte piece of a longer character is 'bytes:\\xNN', as OpenAI does."""
        piece = self.tokenizer.sp.id_to_piece(token)
        if self.tokenizer.sp.is_byte(token):
            byte = int(piece[3:5], 16)
            return (chr(byte) if byte < 128 else f"bytes:\\x{byte:02x}"), [byte]
        text = piece if self.tokenizer.sp.is_control(token) else self.tokenizer.decode([token])
        return text, list(text.encode("utf-8"))


def _linked_out(folder, root):
    """Why `folder` (under `root`) must not be loaded: it or a file in it links outside `root`, or a link is
    dangling; None when it is sound."""
    if not folder.resolve().is_relative_to(root):
        return f"it links to {folder.resolve()}, outside {root}"
    for path in sorted(folder.rglob("*")):
        if path.is_symlink() and not path.exists():
            return f"{path.name} is a dangling link"
        if not path.resolve().is_relative_to(root):
            return f"{path.name} links to {path.resolve()}, outside {root}"
    return None


def load_models(models_dir, max_batch, precision, threads):
    """Every loadable model folder under `models_dir`; broken ones are reported and skipped.

    A model folder, or a file in it, may be a symlink (an alias such as `latest -> base`) only if it
    resolves inside `models_dir`: the server reads no model from outside the folder it was given.
    """
    root = Path(models_dir).resolve()
    hosted = {}
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.name.startswith("."):
            continue
        if folder.is_symlink() and not folder.exists():
            log.error("skipping model folder %s: it is a dangling or looping link", folder)
            continue
        if not folder.is_dir():
            continue
        problem = _linked_out(folder, root)
        if problem:
            log.error("skipping model folder %s: %s", folder, problem)
            continue
        try:
            hosted[folder.name] = HostedModel(folder.name, folder, max_batch, precision, threads)
            log.info("serving model %s from %s", folder.name, folder)
        except Exception as error:  # a broken folder must not take the others down
            log.error("skipping model folder %s: %s: %s", folder, type(error).__name__, error)
    if not hosted:
        raise SystemExit(f"no loadable model under {models_dir}: run `dvc repro` (stage export) first")
    return hosted


# --- middleware ----------------------------------------------------------------------------------


CLOSE = (b"connection", b"close")


async def _send_error(send, status, message, code=None):
    body = json.dumps(error_body(message, code=code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), CLOSE],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """Refuses, in OpenAI's error shape and before any route runs: a Host that is not allowed (a web page
    reaching a loopback server through DNS rebinding), a body framed two ways at once, a declared body over the
    limit (413 before the client is told to continue), a body that grows over the limit, and a body that takes
    longer than `body_seconds` in all, from the first time the app asks for it (a deadline per read would let a
    client trickle a byte at a time forever). A response that starts before its body is all in closes the
    connection, so that nothing the client still sends is read as another request, or keeps the socket open."""

    def __init__(self, app, max_bytes, body_seconds, allowed_hosts):
        self.app, self.max_bytes, self.body_seconds = app, max_bytes, body_seconds
        self.allowed_hosts = None if allowed_hosts is None else {host.lower() for host in allowed_hosts}

    def _host_allowed(self, headers):
        if self.allowed_hosts is None:
            return True
        host = headers.get(b"host", b"").decode("latin-1").lower()
        name = host[1 : host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0] if ":" in host else host
        return name in self.allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if not self._host_allowed(headers):
            return await _send_error(
                send,
                400,
                "this server does not answer to that Host header; start it with --allowed-host NAME to add one",
                "invalid_host",
            )
        if b"transfer-encoding" in headers and b"content-length" in headers:
            # RFC 9112 6.3: such a message may be refused, and must be, where a proxy in front could read its
            # length the other way (request smuggling).
            return await _send_error(
                send, 400, "the request has both Transfer-Encoding and Content-Length; send one of them", "invalid_http"
            )
        declared = headers.get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await _send_error(send, 413, f"the request body is over the limit of {self.max_bytes} bytes")
        # A request without a body (no length, or 0, and no chunks) is complete before it is read.
        received, deadline = 0, None
        complete = b"transfer-encoding" not in headers and declared.isdigit() and int(declared) == 0

        async def guarded_receive():
            nonlocal received, complete, deadline
            if complete:  # the body is in: what comes now is a disconnect, which may take any time
                return await receive()
            loop = asyncio.get_running_loop()
            deadline = deadline or loop.time() + self.body_seconds
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise HTTPException(408, f"the request body did not arrive within {self.body_seconds:g} s") from None
            received += len(message.get("body", b""))
            complete = not message.get("more_body", False) or message["type"] == "http.disconnect"
            if received > self.max_bytes:
                raise HTTPException(413, f"the request body is over the limit of {self.max_bytes} bytes")
            return message

        async def closing_send(message):
            if message["type"] == "http.response.start" and not complete:
                message = {**message, "headers": [*message.get("headers", []), CLOSE]}
            await send(message)

        await self.app(scope, guarded_receive, closing_send)


class JSONCORSMiddleware(CORSMiddleware):
    """CORSMiddleware whose refusals of a preflight come in OpenAI's error shape, as every other error."""

    def preflight_response(self, request_headers):
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        reason = response.body.decode()
        return JSONResponse(error_body(f"CORS: {reason}", code="cors_refused"), status_code=400)


# --- authentication and errors --------------------------------------------------------------------


def require_api_key(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(HTTPBearer(auto_error=False))
):
    api_key = request.app.state.settings.api_key
    # compare_digest takes the same time wherever the first wrong byte is, so timing reveals nothing of the key.
    if api_key and (credentials is None or not hmac.compare_digest(credentials.credentials.encode(), api_key.encode())):
        raise APIError(
            401, "this server needs an API key: send the header `Authorization: Bearer <key>`", code="invalid_api_key"
        )


async def api_error(request, error):
    return JSONResponse(error_body(error.message, error.param, error.code, error.kind), status_code=error.status)


async def validation_error(request, error):
    # A union field (prompt: string or list) fails once per member; "not a string" about a list is the
    # least telling, so an error of another kind goes first.
    first = min(error.errors(), key=lambda detail: detail["type"].endswith("_type"))
    if first["type"] == "json_invalid":
        return JSONResponse(error_body("the request body is not valid JSON (UTF-8)"), status_code=400)
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, UnsupportedField):
        return JSONResponse(error_body(str(cause), cause.field, "unsupported_field"), status_code=400)
    # Keep field names and list indexes; pydantic also puts union member types ("str") in the path.
    location = [str(part) for part in first["loc"] if isinstance(part, int) or part in REQUEST_FIELD_NAMES]
    field = ".".join(location) or None
    return JSONResponse(error_body(f"{field or 'body'}: {first['msg']}", field), status_code=400)


async def http_error(request, error):
    return JSONResponse(error_body(str(error.detail)), status_code=error.status_code, headers=error.headers)


async def unexpected_error(request, error):
    log.exception("unexpected error")
    return JSONResponse(error_body("internal error", kind="server_error"), status_code=500)


# --- requests -------------------------------------------------------------------------------------


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


@dataclass
class Job:
    """One prompt of a request: its ids, how to sample, and what the reply repeats of it (echo)."""

    prompt_ids: list
    sampling: Sampling
    echo_text: str = ""
    echo_ids: tuple = ()


async def respond(request, hosted, body, jobs, chat, logprobs):
    """Submits n generations per job and answers in one JSON body or as server-sent events."""
    settings = request.app.state.settings
    if not hosted.engine.alive:  # it died of an error: better a 503 than a reply that never comes
        raise APIError(
            503, f"model '{hosted.name}' is down (see the server log)", code="model_down", kind="server_error"
        )
    generations = len(jobs) * body.n
    if hosted.engine.pending() + generations > settings.max_queue:
        raise APIError(
            429,
            f"model '{hosted.name}' has its queue full ({settings.max_queue} generations); retry later",
            code="queue_full",
            kind="rate_limit_error",
        )
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    runs = [
        (
            job,
            hosted.engine.submit(
                job.prompt_ids,
                job.sampling,
                body.seed,
                choice,
                stop,
                settings.max_generation_seconds,
                logprobs,
                bool(job.echo_ids) and logprobs is not None,
            ),
        )
        for job in jobs
        for choice in range(body.n)
    ]
    reply = Reply(hosted, chat, runs, include_usage=bool(body.stream_options and body.stream_options.include_usage))
    if body.stream:
        return GenerationStream([run for _, run in runs], reply.events())
    collecting = asyncio.ensure_future(reply.collect())
    client_gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait((collecting, client_gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        # All finished, the client gone or this handler cancelled: nothing is left worth generating.
        collecting.cancel()
        client_gone.cancel()
        for _, run in runs:
            run.cancelled = True
    if collecting not in done:
        raise APIError(499, "the client closed the connection before the reply")  # nobody reads it; logged
    return collecting.result()


class TextOffsets:
    """The text_offset of each token of one choice, fed in order: where in the reply's text (the echoed prompt
    and what follows) the token's text starts, in characters. A control token adds no text; a byte piece may
    add part of a character, whose offset is then that character's."""

    def __init__(self, hosted):
        self.hosted, self.chars = hosted, 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def next(self, token):
        offset = self.chars
        self.chars += len(self.decoder.decode(self.hosted.text_bytes(token)))
        return offset


class Reply:
    """Builds reply bodies from the schema's classes, so they cannot drift from /openapi.json."""

    def __init__(self, hosted, chat, runs, include_usage):
        self.hosted, self.chat, self.runs, self.include_usage = hosted, chat, runs, include_usage
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        jobs = {id(job): job for job, _ in runs}.values()  # each job runs n times; its prompt counts once
        self.prompt_tokens = sum(len(job.prompt_ids) for job in jobs)
        self.offsets = [TextOffsets(hosted) for _ in runs]  # each choice's, across its stream's chunks

    def _usage(self, completion_tokens):
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=self.prompt_tokens + completion_tokens,
        )

    def _legacy_logprobs(self, entries, offsets):
        """CompletionLogprobs of (token, TokenLogprob or None) pairs; `offsets` is the choice's TextOffsets."""
        return CompletionLogprobs(
            tokens=[self.hosted.token_text(token)[0] for token, _ in entries],
            text_offset=[offsets.next(token) for token, _ in entries],
            token_logprobs=[None if entry is None else entry.logprob for _, entry in entries],
            top_logprobs=[
                None if entry is None else {self.hosted.token_text(t)[0]: lp for t, lp in entry.top}
                for _, entry in entries
            ],
        )

    def _chat_logprobs(self, entries):
        def top(token, logprob):
            text, raw = self.hosted.token_text(token)
            return TopLogprob(token=text, logprob=logprob, bytes=raw)

        return ChatLogprobs(
            content=[
                TokenLogprob(
                    **top(entry.token, entry.logprob).model_dump(),
                    top_logprobs=[top(token, logprob) for token, logprob in entry.top],
                )
                for entry in entries
            ]
        )

    def _echo_entries(self, job, run):
        """The prompt's (token, TokenLogprob) pairs, the first without one."""
        scored = run.prompt_token_logprobs if run.prompt_logprobs else [None] * (len(job.prompt_ids) - 1)
        return list(zip(job.prompt_ids, [None, *scored]))

    async def collect(self):
        choices, completion_tokens = [], 0
        for index, (job, run) in enumerate(self.runs):
            text, logprobs, event = "", [], None
            while event is None or event.finish_reason is None:
                event = await run.events.get()
                text += event.text
                logprobs += event.logprobs
            if event.finish_reason == "error":
                raise APIError(500, GENERATION_FAILED, code="generation_failed", kind="server_error")
            completion_tokens += event.completion_tokens
            if self.chat:
                choices.append(
                    ChatChoice(
                        index=index,
                        message=ReplyMessage(role="assistant", content=text),
                        logprobs=self._chat_logprobs(logprobs) if run.logprobs is not None else None,
                        finish_reason=event.finish_reason,
                    )
                )
            else:
                legacy = None
                if run.logprobs is not None:
                    entries = (self._echo_entries(job, run) if job.echo_ids else []) + [
                        (entry.token, entry) for entry in logprobs
                    ]
                    legacy = self._legacy_logprobs(entries, self.offsets[index])
                choices.append(
                    CompletionChoice(
                        index=index, text=job.echo_text + text, logprobs=legacy, finish_reason=event.finish_reason
                    )
                )
        body = (ChatCompletion if self.chat else Completion)(
            id=self.id,
            object="chat.completion" if self.chat else "text_completion",
            created=self.created,
            model=self.hosted.name,
            choices=choices,
            usage=self._usage(completion_tokens),
        )
        return body.model_dump(exclude_none=self.chat)

    def _chunk(self, choices, usage=None):
        kind, chunk = (
            ("chat.completion.chunk", ChatCompletionChunk) if self.chat else ("text_completion", CompletionChunk)
        )
        body = chunk(
            id=self.id,
            object=kind,
            created=self.created,
            model=self.hosted.name,
            choices=choices,
            **({} if usage is None else {"usage": usage}),
        )
        # A chat chunk holds what was set: the role once, content when there is some, logprobs when asked for,
        # and always finish_reason (null until the last), as OpenAI's do; a completion chunk holds every field.
        return f"data: {body.model_dump_json(exclude_unset=self.chat)}\n\n"

    def _chunk_choice(self, index, job, run, event, first):
        if self.chat:
            delta = ChatDelta(
                **({"role": "assistant"} if first else {}), **({"content": event.text} if first or event.text else {})
            )
            logprobs = {"logprobs": self._chat_logprobs(event.logprobs)} if run.logprobs is not None else {}
            return ChatChunkChoice(index=index, delta=delta, finish_reason=event.finish_reason, **logprobs)
        text, entries = event.text, [(entry.token, entry) for entry in event.logprobs]
        if first and job.echo_ids:
            text, entries = job.echo_text + text, self._echo_entries(job, run) + entries
        logprobs = self._legacy_logprobs(entries, self.offsets[index]) if run.logprobs is not None else None
        return CompletionChunkChoice(index=index, text=text, logprobs=logprobs, finish_reason=event.finish_reason)

    async def events(self):
        """Server-sent events, one chunk per piece of text, ending with `data: [DONE]`."""
        runs = self.runs
        pending = {asyncio.ensure_future(run.events.get()): index for index, (_, run) in enumerate(runs)}
        started, completion_tokens = set(), {}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    index = pending.pop(future)
                    event = future.result()
                    if event.finish_reason == "error":
                        failed = error_body(GENERATION_FAILED, code="generation_failed", kind="server_error")
                        yield f"data: {json.dumps(failed)}\n\n"
                        return
                    job, run = runs[index]
                    yield self._chunk([self._chunk_choice(index, job, run, event, index not in started)])
                    started.add(index)
                    completion_tokens[index] = event.completion_tokens
                    if event.finish_reason is None:
                        pending[asyncio.ensure_future(run.events.get())] = index
            if self.include_usage:
                yield self._chunk([], self._usage(sum(completion_tokens.values())))
            yield "data: [DONE]\n\n"
        finally:
            for future in pending:
                future.cancel()


async def _disconnected(request):
    """Returns when the client has gone: its body is read already, so a disconnect is all that can arrive."""
    while (await request.receive())["type"] != "http.disconnect":
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


# --- routes ---------------------------------------------------------------------------------------

pages = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
docs = APIRouter(dependencies=[Depends(require_api_key)], include_in_schema=False)
# vLLM's tokenizer routes, at the root as vLLM serves them: lm-evaluation-harness tokenizes through them.
tokenizing = APIRouter(dependencies=[Depends(require_api_key)])
GENERATION_ERRORS = error_responses(400, 401, 404, 408, 413, 429, 503)


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


def _tokenizer_model(request, name):
    """The model named, or with no name the one tokenizer every hosted model shares."""
    if name is not None:
        return _hosted_model(request, name)
    models = list(request.app.state.models.values())
    if len({hosted.tokenizer_digest for hosted in models}) != 1:
        raise APIError(400, f"name a model: {', '.join(h.name for h in models) or 'none is loaded'}", "model")
    return models[0]


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
    if isinstance(body.prompt, str) or (body.prompt and isinstance(body.prompt[0], int)):
        prompts = [body.prompt]
    else:
        prompts = body.prompt
    jobs = []
    for index, prompt in enumerate(prompts):
        field = "prompt" if len(prompts) == 1 else f"prompt.{index}"
        if isinstance(prompt, str):
            ids = await _prompt_ids(hosted, settings, hosted.tokenizer.document_prompt, prompt, len(prompt), field)
        else:
            ids = list(prompt)
            _check_vocabulary(hosted, ids, field)
            _check_prompt_length(hosted, settings, ids, field)
        sampling = _sampling(body, hosted, _max_tokens(body, hosted, ids, 16), hosted.tokenizer.document_end_ids)
        echo_text = hosted.tokenizer.decode(ids) if body.echo else ""
        jobs.append(Job(ids, sampling, echo_text, tuple(ids) if body.echo else ()))
    return await respond(request, hosted, body, jobs, False, body.logprobs)


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
    return await respond(request, hosted, body, [Job(ids, sampling)], True, logprobs)


# --- the app --------------------------------------------------------------------------------------


def create_app(
    models_dir,
    max_batch=16,
    max_body_bytes=MAX_BODY_BYTES,
    precision=DEFAULT_PRECISION,
    api_key=None,
    cors_origins=(),
    max_prompt_tokens=None,
    max_generation_seconds=MAX_GENERATION_SECONDS,
    max_queue=MAX_QUEUE,
    allowed_hosts=LOOPBACK_HOSTS,
    body_seconds=BODY_SECONDS,
    threads=DEFAULT_THREADS,
):
    """`precision`: int8 (int8 linear weights, faster on CPUs) or fp32 (exactly the exported weights).
    `api_key`: when given, required as `Authorization: Bearer <key>` on /v1 and the API docs. `cors_origins`:
    origins whose pages may call the API (none by default). `max_prompt_tokens`: None is each model's context.
    `max_queue`: generations that may wait for a batch slot, per model. `allowed_hosts`: the Host header names
    answered (None: any). `body_seconds`: time a client has to send its whole request body. `threads`: each
    model's decode kernel's. The models' engines close when the app's lifespan ends (the server stops)."""
    models = load_models(models_dir, max_batch, precision, threads)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            for hosted in models.values():
                await asyncio.to_thread(hosted.engine.close)

    app = FastAPI(
        title="GPT pipeline server", version="1.0", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    app.state.models = models
    app.state.settings = Settings(api_key, max_prompt_tokens, max_generation_seconds, max_queue)
    app.add_middleware(RequestGuard, max_bytes=max_body_bytes, body_seconds=body_seconds, allowed_hosts=allowed_hosts)
    if cors_origins:
        # Added last, so outermost: refusals (401, 413) carry the CORS headers too and the page can read them.
        app.add_middleware(
            JSONCORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)
    for router in (pages, docs, tokenizing, v1):
        app.include_router(router)
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
