"""Continuous batching: one thread per model decodes every active request together.

Each request owns a row of a shared KV cache. A new request is prefilled into the next free row,
then joins the batch: one forward pass per step produces the next token of every active row. A
finished (or abandoned) request leaves at once and the last row moves into its place, so the
active rows stay packed at the top of the cache and each step computes only what is needed.
The HTTP side never waits on the model: tokens arrive through an asyncio queue.
"""

import asyncio
import logging
import queue
import threading
import time
import warnings
from dataclasses import dataclass, field

import torch

from model.generate import draw, logits_to_probs
from model.gpt import KVCache

log = logging.getLogger("serve")


def int8_weights(model):
    """A copy of `model` whose linear layers hold int8 weights (activations quantized on the fly).

    Decoding one token reads every weight once, so on a CPU its speed is bound by memory traffic:
    int8 weights are a quarter of fp32's (and the ryangpt shape's 20 MB then fits in cache).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch points eager quantization users at torchao, in 2.13 still here
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_tokens: int = 0
    stop: tuple = ()  # strings
    stop_ids: tuple = ()  # tokens that end the text (not included); min_tokens holds them back
    seed: int | None = None
    max_seconds: float | None = None  # from submission; when spent, the text ends as at max_tokens ("length")


@dataclass
class Event:
    """A piece of new text; the last event of a request also carries finish_reason."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None


@dataclass
class Request:
    prompt_ids: list
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    new_ids: list = field(default_factory=list)
    sent_chars: int = 0
    finish_reason: str | None = None
    cancelled: bool = False
    generator: torch.Generator = None
    submitted_at: float = field(default_factory=time.monotonic)

    def out_of_time(self):
        limit = self.sampling.max_seconds
        return limit is not None and time.monotonic() - self.submitted_at >= limit

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
    def __init__(self, model, tokenizer, max_batch, precision="fp32"):
        self.model = int8_weights(model) if precision == "int8" else model
        self.tokenizer, self.max_batch = tokenizer, max_batch
        self.context_length = model.config.context_length
        self.cache = KVCache(model.config, max_batch, self.context_length)
        self.waiting = queue.Queue()
        self.active = []  # active[i] decodes in cache row i
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def submit(self, prompt_ids, sampling):
        """Queues a generation; read its Events from `request.events` (on the calling event loop)."""
        request = Request(list(prompt_ids), sampling, asyncio.get_running_loop())
        seed = sampling.seed if sampling.seed is not None else torch.seed()
        request.generator = torch.Generator().manual_seed(seed)
        self.waiting.put(request)
        return request

    def _run(self):
        with torch.inference_mode():
            while True:
                try:
                    if not self.active:
                        self._admit(self.waiting.get())
                    while len(self.active) < self.max_batch and not self.waiting.empty():
                        self._admit(self.waiting.get_nowait())
                    if self.active:
                        self._decode_step()
                except Exception:
                    # One bad step must not take the model down: end what was in flight, keep serving.
                    log.exception("generation step failed; ending the %d requests in flight", len(self.active))
                    for request in self.active:
                        request.send(Event("", len(request.new_ids), "error"))
                    self.active = []

    def _admit(self, request):
        if request.cancelled:
            return
        self.cache.first_row = len(self.active)
        self.active.append(request)
        prompt = torch.tensor([request.prompt_ids])
        logits, _ = self.model(prompt, cache=self.cache, positions=torch.arange(prompt.shape[1])[None])
        self._next_token(request, self._sample([request], logits[:, -1])[0])
        self._drop_finished()

    def _decode_step(self):
        self.cache.first_row = 0
        tokens = torch.tensor([[request.new_ids[-1]] for request in self.active])
        positions = torch.tensor([[len(request.prompt_ids) + len(request.new_ids) - 1] for request in self.active])
        logits, _ = self.model(tokens, cache=self.cache, positions=positions)
        for request, token in zip(self.active, self._sample(self.active, logits[:, -1])):
            self._next_token(request, token)
        self._drop_finished()

    def _sample(self, requests, logits):
        """The next token of each request, from its row of (B, vocab) `logits`.

        Rows with the same sampling settings are filtered in one batch; each row then draws with its
        request's own generator, so a seeded request gives the same text however it was batched.
        """
        logits = logits.float()
        for row, request in enumerate(requests):
            if len(request.new_ids) < request.sampling.min_tokens:
                logits[row, list(request.sampling.stop_ids)] = float("-inf")
        tokens = [0] * len(requests)
        groups = {}
        for row, request in enumerate(requests):
            settings = (request.sampling.temperature, request.sampling.top_k, request.sampling.top_p)
            groups.setdefault(settings, []).append(row)
        for (temperature, top_k, top_p), rows in groups.items():
            if temperature == 0:
                chosen = logits[rows].argmax(dim=-1)
            else:
                probs = logits_to_probs(logits[rows], temperature, top_k, top_p)
                chosen = draw(probs, [requests[row].generator for row in rows])
            for row, token in zip(rows, chosen.tolist()):
                tokens[row] = token
        return tokens

    def _next_token(self, request, token):
        """Records the request's next token and sends the text it completes."""
        if request.cancelled:
            request.finish_reason = "cancelled"
            return
        sampling = request.sampling
        request.new_ids.append(token)
        finish_reason = None
        if token in sampling.stop_ids:
            finish_reason, ids = "stop", request.new_ids[:-1]
        else:
            ids = request.new_ids
        text = self.tokenizer.decode(ids)
        for stop in sampling.stop:
            at = text.find(stop, max(0, request.sent_chars - len(stop)))
            if at != -1:
                text, finish_reason = text[:at], "stop"
        if finish_reason is None and (len(request.new_ids) >= sampling.max_tokens
                                      or len(request.prompt_ids) + len(request.new_ids) >= self.context_length
                                      or request.out_of_time()):
            finish_reason = "length"
        if finish_reason is None:
            # Hold back an unfinished UTF-8 character (decoded as U+FFFD) and a possible stop prefix.
            text = text.rstrip("\ufffd")
            text = text[: len(text) - _unsafe_tail(text, sampling.stop)]
        delta = text[request.sent_chars :]
        request.sent_chars = max(request.sent_chars, len(text))
        request.finish_reason = finish_reason
        if delta or finish_reason:
            completion_tokens = len(request.new_ids) - (token in sampling.stop_ids)
            request.send(Event(delta, completion_tokens, finish_reason))

    def _drop_finished(self):
        for row in range(len(self.active) - 1, -1, -1):
            if self.active[row].finish_reason is not None:
                last = len(self.active) - 1
                if row != last:
                    self.cache.move_row(last, row)
                    self.active[row] = self.active[last]
                self.active.pop()
