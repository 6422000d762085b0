"""Continuous batching: one thread per model decodes every active generation together (with a second
thread for the decode kernel when the batch steps in halves, below).

A generation is one text for one choice of one prompt: a request for n choices of p prompts makes
n * p of them. Each owns a row of a shared KV cache from admission to its end. Its prompt is
prefilled in chunks of PREFILL_CHUNK tokens, one chunk between two decode steps, so a long prompt
delays the other generations' next tokens by one chunk at most. Once prefilled, it joins the batch:
one call of the decode kernel per step (serve/kernel.py) produces the next token of every decoding
generation. A finished (or abandoned) generation leaves at once and its row is free for the next one.

From PIPELINE_FROM decoding generations on, when the kernel's threads leave a core free, the batch
steps in two halves that take turns: the kernel works on one half on a thread of its own (it lets go
of Python's lock meanwhile) while this thread samples the other half's tokens and sends their text.
That Python work (some tenth of a 16-generation step) then runs on the free core: 8% more tokens/s at
16 streams, 20% at 64, with one kernel thread (`--threads 1`) on 2 cores.

A generation's text never depends on what else is batched: the linear layers compute every row on
its own and attention runs sequence by sequence (serve/kernel.py), the chunks of a prompt are
fixed by the prompt alone, and sampling draws from the generation's own stream (model/generate.py).
The HTTP side never waits on the model: events arrive through an asyncio queue (Transport).
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


def available_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# The decode kernel's threads: every core this process may use, as llama.cpp's default (BENCHMARKS.md, "Serving
# against llama.cpp": one stream decodes 1.6 times as fast on 2 threads as on 1 on the 2-core machine there). A
# step's threads wait on each other, so another process that holds a core slows them all: --threads 1 then.
DEFAULT_THREADS = available_cores()
PREFILL_CHUNK = 32  # prompt tokens per forward pass: a few decode steps' time on a CPU
# Decoding generations from which the batch steps in two halves. Below it the Python work per step is short,
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
    """A piece of new text; the last event of a generation also carries finish_reason. With logprobs asked
    for, the tokens generated since the previous event come with them."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None
    logprobs: list = field(default_factory=list)


@dataclass
class Transport:
    """How a generation's events reach the HTTP side: the engine's thread sends each onto `events`, an asyncio
    queue of the event loop that submitted the generation, which the reply receives from."""

    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)

    def send(self, event):
        # asyncio's queue is not thread-safe: the put runs on the queue's own loop.
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    async def receive(self):
        return await self.events.get()


@dataclass
class TextStream:
    """The text a generation has sent so far: it ends before the first of `stop`, and holds back any tail
    that may still grow into one. Unless `streamed`, it is sent once, whole, at the end."""

    stop: tuple = ()  # strings that end the text (not included)
    streamed: bool = True  # sent as it grows (a streamed reply), not only at the end
    sent_chars: int = 0


@dataclass
class Logprobs:
    """The log-probabilities a generation records, when asked for: each generated token's TokenLogprob with
    `alternatives` most likely tokens, and with `of_prompt` each prompt token's too (but the first's)."""

    alternatives: int
    of_prompt: bool = False
    prompt: list = field(default_factory=list)  # the prompt's, from its second token
    generated: list = field(default_factory=list)
    sent: int = 0  # of `generated`, those sent in events so far

    def unsent(self, tokens):
        """The entries of the first `tokens` generated tokens not sent yet, counted as sent from now on."""
        entries, self.sent = self.generated[self.sent : tokens], tokens
        return entries


@dataclass(kw_only=True)
class Generation(Sequence):
    """One text the engine generates: the sequence the sampling step reads (prompt, sampling, random stream,
    tokens so far), its parts (how its events travel, its text, its log-probabilities) and where it stands in
    the batch."""

    transport: Transport
    text_stream: TextStream = field(default_factory=TextStream)
    logprobs: Logprobs | None = None  # None: not asked for
    # Its schedule: when it must end at the latest, its cache row, how far it got and how it ended.
    max_seconds: float | None = None  # from submission; when spent, the text ends as at max_tokens ("length")
    submitted_at: float = field(default_factory=time.monotonic)
    row: int | None = None  # its KV cache row, from admission
    prefilled: int = 0  # prompt tokens in the cache
    last_step: int = 0  # the half step that last took it (the half that waited longer goes next)
    finish_reason: str | None = None
    cancelled: bool = False

    def out_of_time(self):
        return self.max_seconds is not None and time.monotonic() - self.submitted_at >= self.max_seconds


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
        self._undrawn = None  # (generations, their logits): the half stepped last, its tokens not yet drawn
        self._half_steps = 0
        # The decode kernel's own thread for half steps (it lets go of Python's lock while it works).
        self._kernel = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{name}-decode-kernel")
        self._steps_in_halves = threads < available_cores()
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
        """False once the decoding thread has died (it should not: a failed step ends only its generations)."""
        return self._thread.is_alive()

    def pending(self):
        """Generations waiting for a batch slot whose client still wants them."""
        return sum(not generation.cancelled for generation in list(self._waiting))

    def in_flight(self):
        """Generations holding a batch slot (prefilling or decoding)."""
        return len(self._prefilling) + len(self._decoding)

    def submit(
        self,
        prompt_ids,
        sampling,
        seed=None,
        choice=0,
        stop=(),
        max_seconds=None,
        logprobs=None,
        prompt_logprobs=False,
        streamed=True,
    ):
        """Queues a generation; receive its Events with `await generation.transport.receive()` (on the calling
        event loop): as its text grows, or with `streamed` False one event at the end.

        `logprobs`: None, or how many alternatives each token's TokenLogprob lists (0: the token only);
        `prompt_logprobs`: with `logprobs`, the prompt's tokens get theirs too (in `generation.logprobs.prompt`).
        """
        generation = Generation(
            list(prompt_ids),
            sampling,
            random_stream(seed, choice),
            transport=Transport(asyncio.get_running_loop()),
            text_stream=TextStream(tuple(stop), streamed),
            logprobs=None if logprobs is None else Logprobs(logprobs, prompt_logprobs),
            max_seconds=max_seconds,
        )
        with self._wakeup:
            self._waiting.append(generation)
            self._wakeup.notify()
        return generation

    def _has_work(self):
        # Waiting generations are work only while a row is free: a full batch waits for its own steps to end a
        # generation (rows are freed on this thread), not spin over a queue it cannot admit.
        return self._prefilling or self._decoding or (self._waiting and self._free_rows)

    def _run(self):
        with torch.inference_mode():
            while True:
                with self._wakeup:
                    while not (self._has_work() or self._closing):
                        self._wakeup.wait()
                    if self._closing:
                        for generation in [*self._waiting, *self._prefilling, *self._decoding]:
                            self._fail(generation)
                        return
                try:
                    self._admit()
                    halves = self._steps_in_halves and len(self._decoding) >= PIPELINE_FROM
                    # In halves, a generation steps every other half step: so does prefilling, to keep one chunk
                    # at most between two tokens of a generation.
                    if self._prefilling and not (halves and self._half_steps % 2):
                        self._prefill_chunk(self._prefilling[0])
                    if halves:
                        self._half_step()
                    elif self._decoding:
                        self._draw_undrawn()  # a half left from when the batch was larger
                        self._decode_step()
                except Exception:
                    # Each generation's own work fails alone (below); this is the engine's own bookkeeping failing,
                    # where no generation can be told apart: end what was in flight, keep serving.
                    log.exception("generation step failed; ending the %d generations in flight", self.in_flight())
                    self._undrawn = None
                    for generation in [*self._prefilling, *self._decoding]:
                        self._fail(generation)
                self._release_finished()

    @staticmethod
    def _fail(generation):
        if generation.finish_reason is None:
            generation.finish_reason = "error"
            generation.transport.send(Event("", len(generation.new_ids), "error"))

    def _admit(self):
        while self._free_rows and self._waiting:
            generation = self._waiting.popleft()
            if not generation.cancelled:
                generation.row = self._free_rows.pop()
                self._prefilling.append(generation)

    def _prefill_chunk(self, generation):
        if generation.cancelled:
            generation.finish_reason = "cancelled"
            return
        start = generation.prefilled
        chunk = generation.prompt_ids[start : start + PREFILL_CHUNK]
        try:
            logits, _ = self.model(
                torch.tensor([chunk]),
                cache=self.cache,
                rows=torch.tensor([generation.row]),
                positions=torch.arange(start, start + len(chunk))[None],
            )
            generation.prefilled += len(chunk)
            if generation.logprobs is not None and generation.logprobs.of_prompt:
                following = generation.prompt_ids[start + 1 : start + 1 + len(chunk)]  # what each position predicts
                generation.logprobs.prompt += token_logprobs(
                    logits[0, : len(following)], following, generation.logprobs.alternatives
                )
        except Exception:
            log.exception("prefilling a prompt failed; ending its generation")
            self._fail(generation)
            return
        if generation.prefilled == len(generation.prompt_ids):
            # It holds its row in the batch from now on, whatever it does next: _release_finished frees the
            # rows of every finished generation in the batch, so no way of ending can keep one.
            self._prefilling.popleft()
            self._decoding.append(generation)
            if generation.sampling.max_tokens == 0:  # scoring the prompt only
                generation.finish_reason = "length"
                generation.transport.send(Event("", 0, "length"))
                return
            self._draw([generation], logits[:, -1])

    @staticmethod
    def _step_inputs(generations):
        """The decoder's arguments for one step of `generations`: last tokens, cache rows, their positions."""
        return (
            [generation.new_ids[-1] for generation in generations],
            [generation.row for generation in generations],
            [len(generation.prompt_ids) + len(generation.new_ids) - 1 for generation in generations],
        )

    def _decode_step(self):
        generations = self._unfinished()
        if generations:
            self._draw(*self._stepped(generations))

    def _unfinished(self):
        """The decoding generations that want a next token. A generation that finished since it joined
        (cancelled in its last prefill chunk, ended by its first token) has no token to step from; its row is
        freed after the step."""
        return [generation for generation in self._decoding if generation.finish_reason is None]

    def _stepped(self, generations, step=None):
        """(generations, their logits) of one decode step of `generations`, whose kernel call `step` (a Future)
        may be running already. When the batched call fails, each generation steps alone (the kernel computes
        each row on its own, and stepping a row again rewrites the same cache entries), so that only a
        generation whose own step fails ends."""
        try:
            return generations, step.result() if step else self.decoder(*self._step_inputs(generations))
        except Exception:
            if len(generations) == 1:
                log.exception("a decode step failed; ending its generation")
                self._fail(generations[0])
                return [], None
            log.exception("a decode step of %d generations failed; stepping each alone", len(generations))
        alone = [(generation, self._stepped([generation])[1]) for generation in generations]
        survivors = [(generation, logits) for generation, logits in alone if logits is not None]
        if not survivors:
            return [], None
        return [generation for generation, _ in survivors], torch.cat([logits for _, logits in survivors])

    def _half_step(self):
        """The half of the batch that waited longer steps on the kernel's thread while this one draws the
        tokens of the half stepped last; its logits are then drawn from in the next half step."""
        stepped_last = {id(generation) for generation in self._undrawn[0]} if self._undrawn else set()
        unfinished = self._unfinished()
        others = [generation for generation in unfinished if id(generation) not in stepped_last]
        generations = sorted(others, key=lambda generation: generation.last_step)[: (len(unfinished) + 1) // 2]
        if not generations:  # the others have all finished
            self._draw_undrawn()
            return
        self._half_steps += 1
        for generation in generations:
            generation.last_step = self._half_steps
        step = self._kernel.submit(self.decoder, *self._step_inputs(generations))
        try:
            self._draw_undrawn()
        finally:
            concurrent.futures.wait([step])  # the kernel writes their cache rows until it returns
        self._undrawn = self._stepped(generations, step)

    def _draw_undrawn(self):
        if self._undrawn is not None:
            undrawn, self._undrawn = self._undrawn, None
            self._draw(*undrawn)

    def _draw(self, generations, logits):
        """Draws the next token of each of `generations` from its row of `logits`, and sends its text. When that
        fails, each generation draws alone, so that only one whose own draw or text fails ends."""
        if not generations:
            return
        try:
            tokens = next_tokens(logits, generations)
        except Exception:
            if len(generations) == 1:
                log.exception("drawing a token failed; ending its generation")
                self._fail(generations[0])
                return
            log.exception("drawing the tokens of %d generations failed; drawing each alone", len(generations))
            for row, generation in enumerate(generations):
                self._draw([generation], logits[row : row + 1])
            return
        for row, (generation, token) in enumerate(zip(generations, tokens)):
            try:
                self._record_logprobs(generation, logits[row : row + 1], token)
                self._next_token(generation, token)
            except Exception:
                log.exception("sending a token's text failed; ending its generation")
                self._fail(generation)

    @staticmethod
    def _record_logprobs(generation, logits, token):
        if generation.logprobs is not None and not generation.cancelled:
            generation.logprobs.generated += token_logprobs(logits, [token], generation.logprobs.alternatives)

    def _next_token(self, generation, token):
        """Records the generation's next token and sends the text it completes."""
        if generation.cancelled:
            generation.finish_reason = "cancelled"
            return
        generation.new_ids.append(token)
        finish_reason = generation.finished(self.context_length)
        text_stream = generation.text_stream
        if finish_reason is None and not (text_stream.streamed or text_stream.stop):
            # Nobody reads the text before its end, and no stop string can end it early: it is made once, at the
            # end (decoding every token's text is a fifth of a token's time at one stream).
            if not generation.out_of_time():
                return
            finish_reason = "length"
        ids = generation.new_ids[:-1] if finish_reason == "stop" else generation.new_ids
        text = self.tokenizer.decode(ids)
        # A character the text has only begun is not in it: a later token may finish it, and a reply that ends
        # first ends without it (an invalid byte inside the text stays U+FFFD).
        text = text[: len(text) - self.tokenizer.unfinished_character_bytes(ids)]
        sent_chars = text_stream.sent_chars
        for stop in text_stream.stop:
            at = text.find(stop, max(0, sent_chars - len(stop)))
            if at != -1:
                text, finish_reason = text[:at], "stop"
        if finish_reason is None and generation.out_of_time():
            finish_reason = "length"
        if finish_reason is None:  # hold back what may turn out to be the start of a stop string
            text = text[: len(text) - _unsafe_tail(text, text_stream.stop)]
        delta = text[sent_chars:]
        generation.finish_reason = finish_reason
        if finish_reason or (delta and text_stream.streamed):
            text_stream.sent_chars = max(sent_chars, len(text))
            # The logprobs of the tokens generated since the last event (a stop token that ended the text is
            # not part of it, nor of them).
            logprobs = [] if generation.logprobs is None else generation.logprobs.unsent(len(ids))
            generation.transport.send(Event(delta, len(ids), finish_reason, logprobs))

    def _release_finished(self):
        """Frees the row of every finished generation in the batch, prefilling or decoding: however it ended."""
        for generations in (self._prefilling, self._decoding):
            for generation in [generation for generation in generations if generation.finish_reason is not None]:
                generations.remove(generation)
                self._free_rows.append(generation.row)
