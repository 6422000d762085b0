"""Continuous batching: one thread per model decodes every active request together.

Each request owns a row of a shared KV cache from admission to its end. Its prompt is prefilled in
chunks of PREFILL_CHUNK tokens, one chunk between two decode steps, so a long prompt delays the
other requests' next tokens by one chunk at most. Once prefilled, it joins the batch: one call of
the decode kernel per step (model/rowwise.py) produces the next token of every decoding request. A
finished (or abandoned) request leaves at once and its row is free for the next one.

A request's text never depends on what else is batched: the linear layers compute every row on
its own and attention runs sequence by sequence (model/rowwise.py), the chunks of a prompt are
fixed by the prompt alone, and sampling draws from the request's own stream (model/generate.py).
The HTTP side never waits on the model: tokens arrive through an asyncio queue.
"""

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from model.generate import Sequence, next_tokens, random_stream
from model.rowwise import RowwiseDecoder, rowwise_cache, rowwise_model

log = logging.getLogger("serve")
DEFAULT_PRECISION = "int8"
PREFILL_CHUNK = 32  # prompt tokens per forward pass: a few decode steps' time on a CPU


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
    return [TokenLogprob(token, logprob, tuple(zip(ids, values)))
            for token, logprob, ids, values in zip(tokens, chosen, top_ids.tolist(), top_values.tolist())]


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
    def __init__(self, model, tokenizer, max_batch, precision=DEFAULT_PRECISION):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self.model = rowwise_model(model, precision)
        self.tokenizer = tokenizer
        self.context_length = model.config.context_length
        self.cache = rowwise_cache(model.config, max_batch, self.context_length, precision)
        self.decoder = RowwiseDecoder(self.model, self.cache)
        self._waiting = collections.deque()
        self._wakeup = threading.Condition()
        self._free_rows = list(range(max_batch - 1, -1, -1))
        self._prefilling = collections.deque()  # admitted, prompt not yet all in the cache
        self._decoding = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

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

    def submit(self, prompt_ids, sampling, seed=None, choice=0, stop=(), max_seconds=None, logprobs=None,
               prompt_logprobs=False):
        """Queues a generation; read its Events from `request.events` (on the calling event loop).

        `logprobs`: None, or how many alternatives each token's TokenLogprob lists (0: the token only);
        `prompt_logprobs`: the prompt's tokens get theirs too (in `request.prompt_token_logprobs`).
        """
        request = Request(list(prompt_ids), sampling, random_stream(seed, choice), loop=asyncio.get_running_loop(),
                          stop=tuple(stop), max_seconds=max_seconds, logprobs=logprobs,
                          prompt_logprobs=prompt_logprobs)
        with self._wakeup:
            self._waiting.append(request)
            self._wakeup.notify()
        return request

    def _run(self):
        with torch.inference_mode():
            while True:
                with self._wakeup:
                    while not (self._waiting or self._prefilling or self._decoding):
                        self._wakeup.wait()
                try:
                    self._admit()
                    if self._prefilling:
                        self._prefill_chunk(self._prefilling[0])
                    if self._decoding:
                        self._decode_step()
                except Exception:
                    # One bad step must not take the model down: end what was in flight, keep serving.
                    log.exception("generation step failed; ending the %d requests in flight", self.in_flight())
                    for request in [*self._prefilling, *self._decoding]:
                        request.send(Event("", len(request.new_ids), "error"))
                        request.finish_reason = "error"
                self._release_finished()

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
        logits, _ = self.model(torch.tensor([chunk]), cache=self.cache, rows=torch.tensor([request.row]),
                               positions=torch.arange(start, start + len(chunk))[None])
        request.prefilled += len(chunk)
        if request.prompt_logprobs:
            following = request.prompt_ids[start + 1 : start + 1 + len(chunk)]  # what each position predicts
            request.prompt_token_logprobs += token_logprobs(logits[0, : len(following)], following,
                                                            request.logprobs or 0)
        if request.prefilled == len(request.prompt_ids):
            self._prefilling.popleft()
            if request.sampling.max_tokens == 0:  # scoring the prompt only
                request.finish_reason = "length"
                request.send(Event("", 0, "length"))
                return
            self._decoding.append(request)
            token = next_tokens(logits[:, -1], [request])[0]
            self._record_logprobs(request, logits[0, -1:], token)
            self._next_token(request, token)

    def _decode_step(self):
        requests = self._decoding
        logits = self.decoder([request.new_ids[-1] for request in requests], [request.row for request in requests],
                              [len(request.prompt_ids) + len(request.new_ids) - 1 for request in requests])
        for row, (request, token) in enumerate(zip(requests, next_tokens(logits, requests))):
            self._record_logprobs(request, logits[row : row + 1], token)
            self._next_token(request, token)

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
        for stop in request.stop:
            at = text.find(stop, max(0, request.sent_chars - len(stop)))
            if at != -1:
                text, finish_reason = text[:at], "stop"
        if finish_reason is None and request.out_of_time():
            finish_reason = "length"
        if finish_reason is None:
            # Hold back an unfinished UTF-8 character (decoded as U+FFFD) and a possible stop prefix.
            text = text.rstrip("\ufffd")
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
        for requests in (self._prefilling, self._decoding):
            for request in [request for request in requests if request.finish_reason is not None]:
                requests.remove(request)
                self._free_rows.append(request.row)
