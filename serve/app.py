"""The HTTP API: OpenAI-compatible completions and chat completions, the model listing, the web UI.

Models are chosen by name from the listing only; no client input ever becomes a path. Every
error is a 4xx in OpenAI's error shape naming the offending field, and never carries a trace.
Facing the internet: an optional API key guards /v1 and the API docs, CORS stays closed unless
origins are named, a loopback server answers only to loopback host names (no DNS rebinding), and
the body size, body read time, prompt length, generation time and each model's queue are all
bounded.

This module puts the app together, with the limits' defaults; each part is a module of its own:
serve/hosting.py (the models), serve/guards.py (what stands before the routes), serve/routes.py
(the routes and their checks), serve/replies.py (generating and answering), serve/errors.py (every
error body). `create_app` keeps the hosted models and its settings in `app.state`, where the routes
read them.
"""

import asyncio
import contextlib
from dataclasses import dataclass

from fastapi import FastAPI

from serve.engine import DEFAULT_PRECISION, DEFAULT_THREADS
from serve.errors import add_error_handlers
from serve.guards import JSONCORSMiddleware, RequestGuard
from serve.hosting import load_models
from serve.routes import ROUTERS
from serve.schema import STREAM_CHUNKS

MAX_BODY_BYTES = 1_000_000
BODY_SECONDS = 30.0  # to receive a whole request body
MAX_GENERATION_SECONDS = 120.0
MAX_QUEUE = 256  # generations waiting for a batch slot, per model
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Settings:
    """What the routes and guards read of create_app's arguments (as `request.app.state.settings`)."""

    api_key: str | None
    max_prompt_tokens: int | None
    max_generation_seconds: float
    max_queue: int


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
    model's decode kernel's. The models' engines close when the app's lifespan ends (the server stops).
    Raises serve.kernel.KernelBuildError (a PipelineError) when the decode kernel cannot be loaded."""
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
    add_error_handlers(app)
    for router in ROUTERS:
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
