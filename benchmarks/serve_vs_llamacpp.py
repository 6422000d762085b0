"""Serving against llama.cpp: our server and llama.cpp's `llama-server` side by side, in one run.

usage (from the repository root, after `make setup`):
    .venv/bin/python -m benchmarks.serve_vs_llamacpp [--tokens 128] [--streams 1 4 16] [--threads 1 2] [--quick]

The ryangpt shape, random weights (serve_load's export), served by `python -m serve` at its defaults but
--threads (int8), and by llama-server built for this CPU from the llama.cpp vendored in the pinned
llama-cpp-python sdist, on the q8_0 GGUF that the gguf stage's code writes (-t/-tb = threads, a slot per
client). Both get the same requests: one prompt, seeded, temperature 0.8 over the whole vocabulary (llama.cpp's
top-k, top-p and min-p off, as ours has none by default), exactly --tokens new tokens (checked in every reply's
usage). The servers take turns:
- tokens/s, threads x streams, and at both servers' defaults (no --threads, no -t/-tb);
- whether a seeded and a greedy request keep their text alone again and beside other requests;
- ms per token at one stream: the server's, our engine's in process with its decode kernel and sampling
  timed inside it (HTTP: the server's less the engine's), llama.cpp's own decode time (its `timings`);
  against the bound: the weight bytes a token reads at the memory bandwidth measured in the same run;
- the gaps between streamed tokens while a prompt that fills the context arrives beside the streams.
ours / llama.cpp above 1: ours is faster. Writes the section "## Serving against llama.cpp" of BENCHMARKS.md.
"""

import argparse
import asyncio
import itertools
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import gguf  # installed by `make setup`, with llama.cpp's converter
import httpx
import torch
import torch.nn as nn

from benchmarks.data_pipeline import busy_cpu_seconds
from benchmarks.decode import read_bandwidth
from benchmarks.report import machine_line, percentile, running_server, write_section
from benchmarks.serve_load import PROMPT, build_export, context_filling_prompt
from model import llama_server
from model.export import load_export
from model.generate import Sampling, next_tokens
from model.llamacpp import LLAMA_CPP_PYTHON, convert
from serve.engine import DEFAULT_THREADS, Engine

COMMAND = ".venv/bin/python -m benchmarks.serve_vs_llamacpp"
ROUNDS = 5
REQUESTS = 16  # per measurement, at least: one stream's figure then rests on 16 requests, not 2
SERVERS = ("ours", "llama.cpp")


def body(server, prompt, tokens, temperature, seed, stream=False):
    """A completion request for exactly `tokens` new tokens, in each server's words."""
    fields = {"prompt": prompt, "max_tokens": tokens, "temperature": temperature, "seed": seed, "stream": stream}
    if server == "ours":
        return {**fields, "model": "base", "min_tokens": tokens}
    return {**fields, "ignore_eos": True, "top_k": 0, "top_p": 1.0, "min_p": 0.0}


def requests_per_client(clients):
    return max(2, -(-REQUESTS // clients))


async def complete(client, url, request):
    reply = await client.post(url + "/v1/completions", json=request)
    reply.raise_for_status()
    reply = reply.json()
    if reply["usage"]["completion_tokens"] != request["max_tokens"]:
        raise RuntimeError(f"{url}: {reply['usage']['completion_tokens']} new tokens, not {request['max_tokens']}")
    return reply


async def throughput(url, server, clients, tokens):
    """(tokens/s of `clients` clients each sending requests_per_client(clients) requests one after the other, the median
    of the server's own decode ms per token in its replies: llama.cpp's `timings`, None for ours)."""
    async with httpx.AsyncClient(timeout=600) as client:

        async def client_loop(index):
            requests = [body(server, PROMPT, tokens, 0.8, index * 100 + i) for i in range(requests_per_client(clients))]
            return [(await complete(client, url, request)).get("timings") for request in requests]

        await complete(client, url, body(server, PROMPT, 8, 0.8, 0))  # warm-up
        start = time.perf_counter()
        per_client = await asyncio.gather(*(client_loop(index) for index in range(clients)))
        speed = clients * requests_per_client(clients) * tokens / (time.perf_counter() - start)
    timings = list(itertools.chain(*per_client))
    return speed, None if None in timings else statistics.median(t["predicted_per_token_ms"] for t in timings)


async def same_text(url, server, tokens, others):
    """{"seeded"/"greedy": (same text alone again, same text beside `others` requests and each other)}."""
    probes = [body(server, PROMPT, tokens, 0.8, 7), body(server, PROMPT, tokens, 0.0, 7)]
    crowd = [body(server, PROMPT, tokens, 0.8, 1000 + index) for index in range(others)]
    async with httpx.AsyncClient(timeout=600) as client:

        async def texts(requests):
            replies = await asyncio.gather(*(complete(client, url, request) for request in requests))
            return [reply["choices"][0]["text"] for reply in replies[:2]]

        alone = [(await texts([probe]))[0] for probe in probes]
        again = [(await texts([probe]))[0] for probe in probes]
        beside = await texts(probes + crowd)
    return {kind: (alone[i] == again[i], alone[i] == beside[i]) for i, kind in enumerate(("seeded", "greedy"))}


async def prefill_gaps(url, server, long_prompt, streams, tokens):
    """(median gap between the chunks of `streams` streams of up to `tokens` tokens, their p99 gap while a
    context-filling prompt is prefilled beside them, that request's reply time, its prompt tokens)."""
    arrivals = [[] for _ in range(streams)]
    started, over = asyncio.Event(), asyncio.Event()

    async def stream(client, index):
        request = body(server, PROMPT, tokens, 0.8, index, stream=True)
        async with client.stream("POST", url + "/v1/completions", json=request) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if over.is_set():
                    break  # hangs up: the server stops this stream
                if line.startswith("data:") and line.strip() != "data: [DONE]":
                    arrivals[index].append(time.perf_counter())
                    if all(len(times) > 5 for times in arrivals):
                        started.set()

    async with httpx.AsyncClient(timeout=600) as client:
        decoding = asyncio.gather(*(stream(client, index) for index in range(streams)))
        await asyncio.wait_for(started.wait(), 120)
        await asyncio.sleep(0.25)
        sent = time.perf_counter()
        reply = await complete(client, url, body(server, long_prompt, 1, 0.0, 0))
        answered = time.perf_counter()
        await asyncio.sleep(0.1)
        over.set()
        await decoding
    gaps = [(later, later - earlier) for times in arrivals for earlier, later in zip(times, times[1:])]
    before = statistics.median(gap for at, gap in gaps if at < sent)
    during = percentile([gap for at, gap in gaps if sent <= at <= answered + 0.05], 0.99)
    return before, during, answered - sent, reply["usage"]["prompt_tokens"]


def engine_profile(model, tokenizer, tokens, threads, runs=3):
    """ms per token of our engine alone at one stream (the server's decoding, no HTTP), and of its decode kernel
    and its sampling within it: the median of `runs` seeded requests, after a warm-up."""
    torch.set_num_threads(threads)  # as the server does: torch's own operations (sampling) take as many
    engine = Engine(model, tokenizer, 1, threads=threads)
    spent = {}

    def timed(part, call):
        def run(*args):
            start = time.perf_counter()
            result = call(*args)
            spent[part] += time.perf_counter() - start
            return result

        return run

    async def request(seed):
        sampling = Sampling(tokens, temperature=0.8, min_tokens=tokens, stop_ids=tokenizer.document_end_ids)
        # Not streamed, as the measured requests: the text is made once, at the end.
        generation = engine.submit(tokenizer.document_prompt(PROMPT), sampling, seed, streamed=False)
        while (await generation.transport.receive()).finish_reason is None:
            pass
        assert len(generation.new_ids) == tokens, f"the engine generated {len(generation.new_ids)} tokens"

    engine.decoder = timed("kernel", engine.decoder)
    samples = []
    with mock.patch("serve.engine.next_tokens", timed("sampling", next_tokens)):
        for seed in range(runs + 1):
            spent.update(kernel=0.0, sampling=0.0)
            start = time.perf_counter()
            asyncio.run(request(seed))
            samples.append({**spent, "engine": time.perf_counter() - start})
    engine.close()
    median = sorted(samples[1:], key=lambda sample: sample["engine"])[runs // 2]
    return {part: seconds * 1000 / tokens for part, seconds in median.items()}


def measure(args, folder, tokenizer, gguf_file, log_file):
    model, _ = load_export(folder)
    context, most = model.config.context_length, max(args.streams)
    long_prompt = context_filling_prompt(tokenizer, context)
    got = {"speeds": {}, "gaps": {}, "texts": {}, "bandwidth": {}, "profile": {}}
    for threads in args.threads:
        torch.set_num_threads(threads)
        got["bandwidth"][threads] = read_bandwidth()
        got["profile"][threads] = engine_profile(model, tokenizer, args.tokens, threads)

    def llama(threads, slots):  # threads None: llama-server's own count
        return llama_server.running(gguf_file, log_file, threads, slots, native=True)

    for threads in [*args.threads, None]:  # None: both servers' defaults
        with running_server(folder.parent, *(("--threads", str(threads)) if threads else ())) as (url, _):
            for streams in args.streams:
                with llama(threads, streams) as llama_url:
                    # The servers take turns, ROUNDS times, and each keeps its median: this machine's speed drifts
                    # by a quarter between minutes (measured), more than what is compared here.
                    rounds = {"ours": [], "llama.cpp": []}
                    for _ in range(ROUNDS):
                        for server, at in (("ours", url), ("llama.cpp", llama_url)):
                            rounds[server].append(asyncio.run(throughput(at, server, streams, args.tokens)))
                    for server, measured in rounds.items():
                        got["speeds"][threads, server, streams] = sorted(measured)[ROUNDS // 2]
                    # the last one read: llama-server's own choice, at its defaults
                    got["default threads"] = re.search(r"n_threads = (\d+)", log_file.read_text()).group(1)
            if threads is None:
                continue
            with llama(threads, most) as llama_url:
                for server, at in (("ours", url), ("llama.cpp", llama_url)):
                    gaps = prefill_gaps(at, server, long_prompt, most - 1, context - 32)
                    got["gaps"][threads, server] = asyncio.run(gaps)
                    if threads == args.threads[0]:
                        got["texts"][server] = asyncio.run(same_text(at, server, args.tokens, most - 2))
    # The weight bytes a token reads, but the embedding's (one row): int8 with a float scale per output; q8_0.
    got["int8 bytes"] = sum(m.weight.numel() + 4 * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    got["q8_0 bytes"] = sum(int(t.n_bytes) for t in gguf.GGUFReader(gguf_file).tensors if t.name != "token_embd.weight")
    return got, context


def report(args, got, context, others):
    most = max(args.streams)

    def speed_table(settings):
        rows = [
            "| threads | streams | ours (tokens/s) | llama.cpp (tokens/s) | ours / llama.cpp |",
            "|---|" + "---:|" * 4,
        ]
        for (threads, label), streams in itertools.product(settings, args.streams):
            ours, theirs = (got["speeds"][threads, server, streams][0] for server in SERVERS)
            rows.append(f"| {label} | {streams} | {ours:.0f} | {theirs:.0f} | {ours / theirs:.2f} |")
        return rows

    lines = [
        f"Command: `{COMMAND} {' '.join(sys.argv[1:])}`. {machine_line()} {others} llama.cpp: the llama-server of "
        f"llama-cpp-python {LLAMA_CPP_PYTHON}'s vendored llama.cpp, built for this CPU.",
        "",
        "The ryangpt shape (random weights), ours int8 against llama.cpp q8_0. Each client sends "
        f"non-streamed requests one after the other ({REQUESTS} in all, 2 per client at least), each exactly "
        f"{args.tokens} new tokens, "
        "seeded, temperature 0.8 over the whole vocabulary (llama.cpp's top-k, top-p and min-p off: ours has none by "
        f"default); llama-server has a slot per client, each with the whole context ({context} tokens). "
        f"Tokens/s of all clients together, the median of {ROUNDS} rounds in which the servers take turns; "
        "ours / llama.cpp above 1: ours is faster.",
        "",
        *speed_table([(threads, threads) for threads in args.threads]),
        "",
        f"At both servers' defaults: ours without `--threads` ({DEFAULT_THREADS} here), llama-server without "
        f"`-t`/`-tb` (it chose {got['default threads']} here).",
        "",
        *speed_table([(None, f"ours {DEFAULT_THREADS}, llama.cpp {got['default threads']}")]),
        "",
        f"Same text? A seeded (temperature 0.8) and a greedy request, each sent alone, alone again, and both at once "
        f"beside {most - 2} other requests (threads {args.threads[0]}, {most} slots):",
        "",
        "| server | seeded: again | seeded: beside others | greedy: again | greedy: beside others |",
        "|---|---|---|---|---|",
    ]
    for server in SERVERS:
        cells = ["same" if same else "**changed**" for pair in got["texts"][server].values() for same in pair]
        lines.append(f"| {server} | " + " | ".join(cells) + " |")
    weights = {"ours": got["int8 bytes"], "llama.cpp": got["q8_0 bytes"]}
    lines += [
        "",
        "Where a token's time goes at one stream, in ms per token (total: the 1-stream row above; our engine alone: "
        "the median of 3 requests in process; HTTP and the rest: the difference of the two, measured a minute "
        "apart, so within this machine's drift of zero where it is small). The bound: the weight bytes a token "
        "reads (ours int8 "
        f"with its scales, {weights['ours'] / 1e6:.1f} MB; llama.cpp's q8_0, {weights['llama.cpp'] / 1e6:.1f} MB; "
        "the embedding left out) at the memory bandwidth measured here: "
        + ", ".join(f"{got['bandwidth'][threads]:.1f} GB/s with {threads} thread(s)" for threads in args.threads)
        + ".",
        "",
        "| threads | server | decode | sampling | engine's Python | HTTP and the rest | total | bandwidth bound | "
        "bound / total |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for threads in args.threads:
        for server in SERVERS:
            speed, decode = got["speeds"][threads, server, 1]
            total, bound = 1000 / speed, weights[server] / got["bandwidth"][threads] / 1e6
            if server == "ours":
                part = got["profile"][threads]
                python = part["engine"] - part["kernel"] - part["sampling"]
                cells = f"{part['kernel']:.2f} | {part['sampling']:.2f} | {python:.2f} | {total - part['engine']:.2f}"
            else:
                cells = f"{decode:.2f} | (in decode) | | {total - decode:.2f}"
            lines.append(f"| {threads} | {server} | {cells} | {total:.2f} | {bound:.2f} | {bound / total:.0%} |")
    lines += [
        "",
        f"A prompt that fills the context arrives beside {most - 1} streamed requests:",
        "",
        "| threads | server | its prompt (tokens) | median gap before (s) | p99 gap during its prefill (s) | "
        "its reply time (s) |",
        "|---:|---|---:|---:|---:|---:|",
        *[
            f"| {threads} | {server} | {prompt} | {before:.3f} | {during:.3f} | {reply:.2f} |"
            for (threads, server), (before, during, reply, prompt) in got["gaps"].items()
        ],
    ]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per request")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16], help="clients at once")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="ours' --threads, llama.cpp's -t/-tb")
    parser.add_argument("--quick", action="store_true", help="a check: --tokens 16 --streams 1 2 --threads 1")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.streams, args.threads = 16, [1, 2], [1]
    if 1 not in args.streams or not 2 <= max(args.streams) <= 16:
        parser.error("--streams: 1 (the profile's), and 2 to 16 at most (ours' default --max-batch)")
    llama_server.build(native=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder, tokenizer = build_export(Path(tmp))
        gguf_file = Path(tmp) / "base-q8_0.gguf"
        convert(folder, gguf_file, "q8_0")
        start_wall, (start_machine, start_own) = time.perf_counter(), busy_cpu_seconds()
        got, context = measure(args, folder, tokenizer, gguf_file, Path(tmp) / "llama-server.log")
        (end_machine, end_own), wall = busy_cpu_seconds(), time.perf_counter() - start_wall
    others_s = max(0.0, (end_machine - start_machine) - (end_own - start_own))  # own: the servers too, once ended
    others = (
        f"Other processes used {others_s:.0f} CPU-seconds during the {wall:.0f} s of measurements "
        f"({others_s / (wall * os.cpu_count()):.0%} of the machine)."
    )
    text = report(args, got, context, others)
    print(text)
    write_section("## Serving against llama.cpp", text)


if __name__ == "__main__":
    main()
