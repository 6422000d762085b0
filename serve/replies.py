"""Answering a generation request: its prompts' generations submitted to the model's engine, and the reply
built from them, one JSON body or server-sent events.

Reply bodies are built from the schema's classes, so they cannot drift from /openapi.json. What a
completion and a chat reply have in common (ids, usage, collecting the text, streaming it) is in
Reply; how their choices look is in CompletionReply and ChatReply. Generations stop as soon as
nobody waits for them: the reply is done, or the client has gone.
"""

import asyncio
import codecs
import json
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass

from fastapi.responses import StreamingResponse

from model.generate import Sampling
from serve.errors import GENERATION_FAILED, APIError, error_body
from serve.schema import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionLogprobs,
    ReplyMessage,
    TokenLogprob,
    TopLogprob,
    Usage,
)


@dataclass
class Prompt:
    """One prompt of a request: its ids, how to sample its replies, and whether they repeat it (echo)."""

    ids: list
    sampling: Sampling
    echo: bool = False
    echo_text: str = ""  # the prompt's text, with echo


async def respond(request, hosted, body, prompts, reply_type, logprobs):
    """Submits n generations per prompt and answers with a `reply_type` (CompletionReply or ChatReply) in one
    JSON body or as server-sent events. `logprobs`: None, or how many alternatives each token lists."""
    settings = request.app.state.settings
    if not hosted.engine.alive:  # it died of an error: better a 503 than a reply that never comes
        raise APIError(
            503, f"model '{hosted.name}' is down (see the server log)", code="model_down", kind="server_error"
        )
    if hosted.engine.pending() + len(prompts) * body.n > settings.max_queue:
        raise APIError(
            429,
            f"model '{hosted.name}' has its queue full ({settings.max_queue} generations); retry later",
            code="queue_full",
            kind="rate_limit_error",
        )
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    generations = [
        (
            prompt,
            hosted.engine.submit(
                prompt.ids,
                prompt.sampling,
                body.seed,
                choice,
                stop,
                settings.max_generation_seconds,
                logprobs,
                prompt.echo and logprobs is not None,
                streamed=bool(body.stream),
            ),
        )
        for prompt in prompts
        for choice in range(body.n)
    ]
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    reply = reply_type(hosted, generations, include_usage)
    if body.stream:
        return GenerationStream([generation for _, generation in generations], reply.events())
    collecting = asyncio.ensure_future(reply.collect())
    client_gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait((collecting, client_gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        # All finished, the client gone or this handler cancelled: nothing is left worth generating.
        collecting.cancel()
        client_gone.cancel()
        for _, generation in generations:
            generation.cancelled = True
    if collecting not in done:
        raise APIError(499, "the client closed the connection before the reply")  # nobody reads it; logged
    return collecting.result()


async def _disconnected(request):
    """Returns when the client has gone: its body is read already, so a disconnect is all that can arrive."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class GenerationStream(StreamingResponse):
    """Server-sent events of running generations, which are stopped whenever the response ends: finished,
    or cut short because the client left (Starlette then cancels the sending), even before the first chunk."""

    def __init__(self, generations, events):
        super().__init__(events, media_type="text/event-stream")
        self.generations = generations

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            for generation in self.generations:
                generation.cancelled = True


class Reply(ABC):
    """The reply to one request: `collect` waits for every choice's whole text and builds one body, `events`
    streams each piece of text as it comes. A subclass says what its bodies are and how a choice looks."""

    id_prefix: str
    body_type: type  # the whole reply's schema class, and its `object`
    body_object: str
    chunk_type: type  # a stream chunk's schema class, and its `object`
    chunk_object: str
    # model_dump's options for a body and a chunk; by default every field, null or not.
    body_dump: dict = {}
    chunk_dump: dict = {}

    def __init__(self, hosted, generations, include_usage):
        """`generations`: (prompt, generation) of each choice, in the order of the choices."""
        self.hosted, self.generations, self.include_usage = hosted, generations, include_usage
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        prompts = {id(prompt): prompt for prompt, _ in generations}.values()  # each runs n times; it counts once
        self.prompt_tokens = sum(len(prompt.ids) for prompt in prompts)

    @abstractmethod
    def _choice(self, index, prompt, generation, text, logprobs, finish_reason):
        """Choice `index` of the whole reply: its `text` and the engine's TokenLogprobs of its tokens."""

    @abstractmethod
    def _chunk_choice(self, index, prompt, generation, event, first):
        """Choice `index` in a stream chunk: the piece of text that `event` brings (`first`: the choice's first)."""

    def _usage(self, completion_tokens):
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=self.prompt_tokens + completion_tokens,
        )

    async def collect(self):
        choices, completion_tokens = [], 0
        for index, (prompt, generation) in enumerate(self.generations):
            text, logprobs, event = "", [], None
            while event is None or event.finish_reason is None:
                event = await generation.transport.receive()
                text += event.text
                logprobs += event.logprobs
            if event.finish_reason == "error":
                raise APIError(500, GENERATION_FAILED, code="generation_failed", kind="server_error")
            completion_tokens += event.completion_tokens
            choices.append(self._choice(index, prompt, generation, text, logprobs, event.finish_reason))
        body = self.body_type(
            id=self.id,
            object=self.body_object,
            created=self.created,
            model=self.hosted.name,
            choices=choices,
            usage=self._usage(completion_tokens),
        )
        return body.model_dump(**self.body_dump)

    def _chunk(self, choices, usage=None):
        body = self.chunk_type(
            id=self.id,
            object=self.chunk_object,
            created=self.created,
            model=self.hosted.name,
            choices=choices,
            **({} if usage is None else {"usage": usage}),
        )
        return f"data: {body.model_dump_json(**self.chunk_dump)}\n\n"

    async def events(self):
        """Server-sent events, one chunk per piece of text, ending with `data: [DONE]`."""
        generations = self.generations
        pending = {
            asyncio.ensure_future(generation.transport.receive()): index
            for index, (_, generation) in enumerate(generations)
        }
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
                    prompt, generation = generations[index]
                    yield self._chunk([self._chunk_choice(index, prompt, generation, event, index not in started)])
                    started.add(index)
                    completion_tokens[index] = event.completion_tokens
                    if event.finish_reason is None:
                        pending[asyncio.ensure_future(generation.transport.receive())] = index
            if self.include_usage:
                yield self._chunk([], self._usage(sum(completion_tokens.values())))
            yield "data: [DONE]\n\n"
        finally:
            for future in pending:
                future.cancel()


class TextOffsets:
    """The text_offset of each token of one choice, fed in order: where in the reply's text (the echoed prompt
    and what follows) the token's text starts, in characters. A control token adds no text; a byte piece may
    add part of a character, whose offset is then that character's."""

    def __init__(self, tokenizer):
        self.tokenizer, self.chars = tokenizer, 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def next(self, token):
        offset = self.chars
        self.chars += len(self.decoder.decode(self.tokenizer.decoded_bytes(token)))
        return offset


class CompletionReply(Reply):
    """/v1/completions: each choice's text follows its prompt's when the request echoes it, and its logprobs
    come in OpenAI's legacy format (with the echoed prompt's tokens first)."""

    id_prefix = "cmpl"
    body_type, body_object = Completion, "text_completion"
    chunk_type, chunk_object = CompletionChunk, "text_completion"

    def __init__(self, hosted, generations, include_usage):
        super().__init__(hosted, generations, include_usage)
        self.offsets = [TextOffsets(hosted.tokenizer) for _ in generations]  # each choice's, across its chunks

    def _choice(self, index, prompt, generation, text, logprobs, finish_reason):
        return CompletionChoice(
            index=index,
            text=prompt.echo_text + text,
            logprobs=self._logprobs(index, prompt, generation, prompt.echo, logprobs),
            finish_reason=finish_reason,
        )

    def _chunk_choice(self, index, prompt, generation, event, first):
        echo = first and prompt.echo  # the first chunk starts with the prompt
        return CompletionChunkChoice(
            index=index,
            text=(prompt.echo_text if echo else "") + event.text,
            logprobs=self._logprobs(index, prompt, generation, echo, event.logprobs),
            finish_reason=event.finish_reason,
        )

    def _logprobs(self, index, prompt, generation, echo, generated):
        """CompletionLogprobs of choice `index`'s next tokens: with `echo` the prompt's first (its first token
        has no logprob), then the `generated` tokens' TokenLogprobs. None when the request asked for none."""
        if generation.logprobs is None:
            return None
        entries = [(entry.token, entry) for entry in generated]
        if echo:
            entries = list(zip(prompt.ids, [None, *generation.logprobs.prompt])) + entries
        offsets, token_text = self.offsets[index], self.hosted.tokenizer.token_text
        return CompletionLogprobs(
            tokens=[token_text(token)[0] for token, _ in entries],
            text_offset=[offsets.next(token) for token, _ in entries],
            token_logprobs=[None if entry is None else entry.logprob for _, entry in entries],
            top_logprobs=[
                None if entry is None else {token_text(token)[0]: logprob for token, logprob in entry.top}
                for _, entry in entries
            ],
        )


class ChatReply(Reply):
    """/v1/chat/completions: each choice is the assistant's message, its logprobs in the chat format."""

    id_prefix = "chatcmpl"
    body_type, body_object = ChatCompletion, "chat.completion"
    chunk_type, chunk_object = ChatCompletionChunk, "chat.completion.chunk"
    # A chat body leaves out what is null. A chat chunk holds what was set: the role once, content when there
    # is some, logprobs when asked for, and always finish_reason (null until the last), as OpenAI's do.
    body_dump = {"exclude_none": True}
    chunk_dump = {"exclude_unset": True}

    def _choice(self, index, prompt, generation, text, logprobs, finish_reason):
        return ChatChoice(
            index=index,
            message=ReplyMessage(role="assistant", content=text),
            logprobs=self._logprobs(logprobs) if generation.logprobs is not None else None,
            finish_reason=finish_reason,
        )

    def _chunk_choice(self, index, prompt, generation, event, first):
        delta = ChatDelta(
            **({"role": "assistant"} if first else {}), **({"content": event.text} if first or event.text else {})
        )
        logprobs = {"logprobs": self._logprobs(event.logprobs)} if generation.logprobs is not None else {}
        return ChatChunkChoice(index=index, delta=delta, finish_reason=event.finish_reason, **logprobs)

    def _logprobs(self, entries):
        """ChatLogprobs of the engine's TokenLogprobs `entries`."""

        def top(token, logprob):
            text, raw = self.hosted.tokenizer.token_text(token)
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
