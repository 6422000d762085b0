"""Continuous batching: one thread per model decodes every active request together (with a second
thread for the decode kernel when the batch steps in halves, below).

Each request owns a row of a shared KV cache from admission to its end. Its prompt is prefilled in
chunks of PREFILL_CHUNK tokens, one chunk between two decode steps, so a long prompt delays the
other requests' next tokens by one chunk at most. Once prefilled, it joins the batch: one call of
the decode kernel per step (serve/kernel.py) produces the next token of every decoding request. A
finished (or abandoned) request leaves at once and its row is free for the next one.

From PIPELINE_FROM decoding requests on, when the kernel's threads leave a core free, the batch steps
in two halves that take turns: the kernel works on one half on a thread of its own (it lets go of
Python's lock meanwhile) while this thread samples the other half's tokens and sends their text. That
Python work (some tenth of a 16-request step) then runs on the free core: 8% more tokens/s at 16
streams, 20% at 64, with the server's default single kernel thread on 2 cores.

A request's text never depends on what else is batched: the linear layers compute every row on
its own and attention runs sequence by sequence (serve/kernel.py), the chunks of a prompt are
fixed by the prompt alone, and sampling draws from the request's own stream (model/generate.py).
The HTTP side never waits on the model: tokens arrive through an asyncio queue.
"""

import asyncio
import collections
import concurrent.futures
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import torch

from model.generate import Sequence, next_tokens, random_stream
from serve.kernel import RowwiseDecoder, rowwise_cache, rowwise_model

log = logging.getLogger("serve")
DEFAULT_PRECISION = "int8"
# The decode kernel's threads: a few rows are bound by memory, and threads that wait on each other stall
# whenever another process holds a core.
DEFAULT_THREADS = 1
PREFILL_CHUNK = 32  # prompt tokens per forward pass: a few decode steps' time on a CPU
# Decoding requests from which the batch steps in two halves. Below it the Python work per step is short,
# and handing the kernel to another thread costs more than it saves (Python's lock changes hands twice).
PIPELINE_FROM = 8


@dataclass(frozen=True)
class TokenLogprob:
    """A token, its log-probability under the model, and the `count` most likely tokens with theirs."""

    token: int
    logprob: float
    top: tuple  # ((token, logprob), ...), most likely first


def token_logprobs(logits, tokens, count):
    """TokenLogprob of each of `tokens` under the rows of (T, vocab) `logits` (the model's own distribution:
    no temperature, no filtering)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()
    top_values, top_ids = torch.topk(logprobs, count, dim=-1) if count else (logprobs[:, :0], logprobs[:, :0])
    return [
        TokenLogprob(token, logprob, tuple(zip(ids, values)))
        for token, logprob, ids, values in zip(tokens, chosen, top_ids.tolist(), top_values.tolist())
    ]


@dataclass
class Event:
    """A piece of new text; the last event of a request also carries finish_reason. With logprobs asked
    for, the tokens generated since the previous event come with them."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None
    logprobs: list = field(default_factory=list)


@dataclass(kw_only=True)
class Request(Sequence):
    loop: asyncio.AbstractEventLoop
    stop: tuple = ()  # strings that end the text (not included)
    max_seconds: float | None = None  # from submission; when spent, the text ends as at max_tokens ("length")
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    logprobs: int | None = None  # with a number, each generated token's TokenLogprob, with that many alternatives
    prompt_logprobs: bool = False  # also each prompt token's (but the first), in `prompt_token_logprobs`
    prompt_token_logprobs: list = field(default_factory=list)
    new_token_logprobs: list = field(default_factory=list)
    sent_logprobs: int = 0
    row: int | None = None  # its KV cache row, from admission
    prefilled: int = 0  # prompt tokens in the cache
    sent_chars: int = 0
    finish_reason: str | None = None
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.monotonic)
    last_step: int = 0  # the half step that last took it (the half that waited longer goes next)

    def out_of_time(self):
        return self.max_seconds is not None and time.monotonic() - self.submitted_at >= self.max_seconds

    def send(self, event):
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def _unsafe_tail(text, stops):
    """Characters at the end of `text` that may still grow into a stop string (held back)."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-size:]):
                longest = size
                break
    return longest


class Engine:
    def __init__(self, model, tokenizer, max_batch, precision=DEFAULT_PRECISION, threads=DEFAULT_THREADS, name="model"):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self.model = rowwise_model(model, precision, threads)
        self.tokenizer = tokenizer
        self.context_length = model.config.context_length
        self.cache = rowwise_cache(model.config, max_batch, self.context_length, precision)
        self.decoder = RowwiseDecoder(self.model, self.cache, threads)
        self._waiting = collections.deque()
        self._wakeup = threading.Condition()
        self._free_rows = list(range(max_batch - 1, -1, -1))
        self._prefilling = collections.deque()  # admitted, prompt not yet all in the cache
        self._decoding = []
        self._undrawn = None  # (requests, their logits): the half stepped last, its tokens not yet drawn
        self._half_steps = 0
        # The decode kernel's own thread for half steps (it lets go of Python's lock while it works).
        self._kernel = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{name}-decode-kernel")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self._steps_in_halves = threads < cores
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"{name}-engine", daemon=True)
        self._thread.start()

    def close(self):
        """Ends every generation still queued or in flight (as an error, which their replies report) and stops
        both threads; the engine serves nothing after."""
        with self._wakeup:
            self._closing = True
            self._wakeup.notify()
        self._thread.join()
        self._kernel.shutdown()

    @property
    def alive(self):
        """False once the decoding thread has died (it should not: a failed step ends only its requests)."""
        return self._thread.is_alive()

    def pending(self):
        """Generations waiting for a batch slot whose client still wants them."""
        return sum(not request.cancelled for request in list(self._waiting))

    def in_flight(self):
        """Generations holding a batch slot (prefilling or decoding)."""
        return len(self._prefilling) + len(self._decoding)

    def submit(
        self, prompt_ids, sampling, seed=None, choice=0, stop=(), max_seconds=None, logprobs=None, prompt_logprobs=False
    ):
        """Queues a generation; read its Events from `request.events` (on the calling event loop).

        `logprobs`: None, or how many alternatives each token's TokenLogprob lists (0: the token only);
        `prompt_logprobs`: the prompt's tokens get theirs too (in `request.prompt_token_logprobs`).
        """
        request = Request(
            list(prompt_ids),
            sampling,
            random_stream(seed, choice),
            loop=asyncio.get_running_loop(),
            stop=tuple(stop),
            max_seconds=max_seconds,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )
        with self._wakeup:
            self._waiting.append(request)
            self._wakeup.notify()
        return request

    def _has_work(self):
        # Waiting requests are work only while a row is free: a full batch waits for its own steps to end a
        # generation (rows are freed on this thread), not spin over a queue it cannot admit.
        return self._prefilling or self._decoding or (self._waiting and self._free_rows)

    def _run(self):
        with torch.inference_mode():
            while True:
                with self._wakeup:
                    while not (self._has_work() or self._closing):
                        self._wakeup.wait()
                    if self._closing:
                        for request in [*self._waiting, *self._prefilling, *self._decoding]:
                            self._fail(request)
                        return
                try:
                    self._admit()
                    halves = self._steps_in_halves and len(self._decoding) >= PIPELINE_FROM
                    # In halves, a request steps every other half step: so does prefilling, to keep one chunk
                    # at most between two tokens of a request.
                    if self._prefilling and not (halves and self._half_steps % 2):
                        self._prefill_chunk(self._prefilling[0])
                    if halves:
                        self._half_step()
                    elif self._decoding:
                        self._draw_undrawn()  # a half left from when the batch was larger
                        self._decode_step()
                except Exception:
                    # Each request's own work fails alone (below); this is the engine's own bookkeeping failing,
                    # where no request can be told apart: end what was in flight, keep serving.
                    log.exception("generation step failed; ending the %d requests in flight", self.in_flight())
                    self._undrawn = None
                    for request in [*self._prefilling, *self._decoding]:
                        self._fail(request)
                self._release_finished()

    @staticmethod
    def _fail(request):
        if request.finish_reason is None:
            request.finish_reason = "error"
            request.send(Event("", len(request.new_ids), "error"))

    def _admit(self):
        while self._free_rows and self._waiting:
            request = self._waiting.popleft()
            if not request.cancelled:
                request.row = self._free_rows.pop()
                self._prefilling.append(request)

    def _prefill_chunk(self, request):
        if request.cancelled:
            request.finish_reason = "cancelled"
            return
        start = request.prefilled
        chunk = request.prompt_ids[start : start + PREFILL_CHUNK]
        try:
            logits, _ = self.model(
                torch.tensor([chunk]),
                cache=self.cache,
                rows=torch.tensor([request.row]),
                positions=torch.arange(start, start + len(chunk))[None],
            )
            request.prefilled += len(chunk)
            if request.prompt_logprobs:
                following = request.prompt_ids[start + 1 : start + 1 + len(chunk)]  # what each position predicts
                request.prompt_token_logprobs += token_logprobs(
                    logits[0, : len(following)], following, request.logprobs or 0
                )
        except Exception:
            log.exception("prefilling a prompt failed; ending its request")
            self._fail(request)
            return
        if request.prefilled == len(request.prompt_ids):
            # It holds its row in the batch from now on, whatever it does next: _release_finished frees the
            # rows of every finished request in the batch, so no way of ending can keep one.
            self._prefilling.popleft()
            self._decoding.append(request)
            if request.sampling.max_tokens == 0:  # scoring the prompt only
                request.finish_reason = "length"
                request.send(Event("", 0, "length"))
                return
            self._draw([request], logits[:, -1])

    @staticmethod
    def _step_inputs(requests):
        """The decoder's arguments for one step of `requests`: last tokens, cache rows, their positions."""
        return (
            [request.new_ids[-1] for request in requests],
            [request.row for request in requests],
            [len(request.prompt_ids) + len(request.new_ids) - 1 for request in requests],
        )

    def _decode_step(self):
        requests = self._unfinished()
        if requests:
            self._draw(*self._stepped(requests))

    def _unfinished(self):
        """The decoding requests that want a next token. A request that finished since it joined (cancelled in
        its last prefill chunk, ended by its first token) has no token to step from; its row is freed after the
        step."""
        return [request for request in self._decoding if request.finish_reason is None]

    def _stepped(self, requests, step=None):
        """(requests, their logits) of one decode step of `requests`, whose kernel call `step` (a Future) may
        be running already. When the batched call fails, each request steps alone (the kernel computes each row
        on its own, and stepping a row again rewrites the same cache entries), so that only a request whose own
        step fails ends."""
        try:
            return requests, step.result() if step else self.decoder(*self._step_inputs(requests))
        except Exception:
            if len(requests) == 1:
                log.exception("a decode step failed; ending its request")
                self._fail(requests[0])
                return [], None
            log.exception("a decode step of %d requests failed; stepping each alone", len(requests))
        alone = [(request, self._stepped([request])[1]) for request in requests]
        survivors = [(request, logits) for request, logits in alone if logits is not None]
        if not survivors:
            return [], None
        return [request for request, _ in survivors], torch.cat([logits for _, logits in survivors])

    def _half_step(self):
        """The half of the batch that waited longer steps on the kernel's thread while this one draws the
        tokens of the half stepped last; its logits are then drawn from in the next half step."""
        stepped_last = {id(request) for request in self._undrawn[0]} if self._undrawn else set()
        unfinished = self._unfinished()
        others = [request for request in unfinished if id(request) not in stepped_last]
        requests = sorted(others, key=lambda request: request.last_step)[: (len(unfinished) + 1) // 2]
        if not requests:  # the others have all finished
            self._draw_undrawn()
            return
        self._half_steps += 1
        for request in requests:
            request.last_step = self._half_steps
        step = self._kernel.submit(self.decoder, *self._step_inputs(requests))
        try:
            self._draw_undrawn()
        finally:
            concurrent.futures.wait([step])  # the kernel writes their cache rows until it returns
        self._undrawn = self._stepped(requests, step)

    def _draw_undrawn(self):
        if self._undrawn is not None:
            undrawn, self._undrawn = self._undrawn, None
            self._draw(*undrawn)

    def _draw(self, requests, logits):
        """Draws the next token of each of `requests` from its row of `logits`, and sends its text. When that
        fails, each request draws alone, so that only one whose own draw or text fails ends."""
        if not requests:
            return
        try:
            tokens = next_tokens(logits, requests)
        except Exception:
            if len(requests) == 1:
                log.exception("drawing a token failed; ending its request")
                self._fail(requests[0])
                return
            log.exception("drawing the tokens of %d requests failed; drawing each alone", len(requests))
            for row, request in enumerate(requests):
                self._draw([request], logits[row : row + 1])
            return
        for row, (request, token) in enumerate(zip(requests, tokens)):
            try:
                self._record_logprobs(request, logits[row : row + 1], token)
                self._next_token(request, token)
            except Exception:
                log.exception("sending a token's text failed; ending its request")
                self._fail(request)

    @staticmethod
    def _record_logprobs(request, logits, token):
        if request.logprobs is not None and not request.cancelled:
            request.new_token_logprobs += token_logprobs(logits, [token], request.logprobs)

    def _next_token(self, request, token):
        """Records the request's next token and sends the text it completes."""
        if request.cancelled:
            request.finish_reason = "cancelled"
            return
        request.new_ids.append(token)
        finish_reason = request.finished(self.context_length)
        ids = request.new_ids[:-1] if finish_reason == "stop" else request.new_ids
        text = self.tokenizer.decode(ids)
        # A character the text has only begun is not in it: a later token may finish it, and a reply that ends
        # first ends without it (an invalid byte inside the text stays U+FFFD).
        text = text[: len(text) - self.tokenizer.unfinished_character_bytes(ids)]
        for stop in request.stop:
            at = text.find(stop, max(0, request.sent_chars - len(stop)))
            if at != -1:
                text, finish_reason = text[:at], "stop"
        if finish_reason is None and request.out_of_time():
            finish_reason = "length"
        if finish_reason is None:  # hold back what may turn out to be the start of a stop string
            text = text[: len(text) - _unsafe_tail(text, request.stop)]
        delta = text[request.sent_chars :]
        request.sent_chars = max(request.sent_chars, len(text))
        request.finish_reason = finish_reason
        if delta or finish_reason:
            # The logprobs of the tokens generated since the last event (a stop token that ended the text is
            # not part of it, nor of them).
            logprobs = request.new_token_logprobs[request.sent_logprobs : len(ids)]
            request.sent_logprobs = len(ids)
            request.send(Event(delta, len(ids), finish_reason, logprobs))

    def _release_finished(self):
        """Frees the row of every finished request in the batch, prefilling or decoding: however it ended."""
        for requests in (self._prefilling, self._decoding):
            for request in [request for request in requests if request.finish_reason is not None]:
                requests.remove(request)
                self._free_rows.append(request.row)
