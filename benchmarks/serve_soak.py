"""Soak test: the HTTP server under many concurrent clients for minutes, where no error is allowed.

usage (from the repository root):
    .venv/bin/python -m benchmarks.serve_soak [--duration 180] [--clients 64] [--hostile 4] [--models-dir DIR ...]

For each models folder (default serve/models, what `dvc repro` exports), starts `python -m serve`
on a free loopback port. Then --clients asyncio
clients (httpx) send requests for --duration seconds: completions and chat completions, streamed
or not, small max_tokens, some with n = 2 or stop strings; a few invalid ones (a 400 is expected)
and a few streams dropped after their first chunk (the server must stop those generations). Beside
them, --hostile clients each loop over what once hung or stalled the server (RELIABILITY.md): scoring-only
requests holding more generations than batch rows, requests abandoned during their prefill, 720 KB lists
of invalid token ids, and a body trickled a byte at a time. Each
client stops at the deadline or after MAX_REQUESTS_PER_CLIENT requests, and each request times out
after REQUEST_TIMEOUT s, so the run ends by itself. Any other outcome than the expected one counts
as an error. Prints a markdown table and writes it as the section "## Soak" of BENCHMARKS.md.
"""

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]

from benchmarks.report import machine_line, percentile, running_server, write_section  # noqa: E402

MAX_REQUESTS_PER_CLIENT = 100_000
REQUEST_TIMEOUT = 60.0
# Below the server's keep-alive timeout (uvicorn: 5 s): a client must not send a request on a connection the
# server is closing as idle, or it meets a reset. Clients in front of the server (proxies) need the same.
KEEPALIVE_EXPIRY = 2.0
MAX_BATCH = 16
BODY_SECONDS = 30.0  # the server's default --body-seconds, which a trickled body must not outlast
INVALID_IDS = [-1] * 240_000  # 720 KB of JSON: once 5 s of event loop per request
PROMPTS = [
    "The history of the city began when",
    "Rivers flow",
    "Once upon a time",
    "In 1990, the",
    "The best way to learn a language is",
]
QUESTIONS = ["Hello, how are you?", "What is your name?", "Where do you live?", "Do you like music?"]


@dataclass
class Tally:
    """Outcomes of one soak run."""

    latencies: list = field(default_factory=list)  # seconds, requests answered in full
    first_chunks: list = field(default_factory=list)  # seconds to the first chunk of a stream
    completion_tokens: int = 0
    streams: int = 0
    refused: int = 0  # invalid requests answered 400, as expected
    dropped: int = 0  # streams the client closed after the first chunk
    scored: int = 0  # hostile: scoring-only requests (echo, max_tokens 0) answered
    left_in_prefill: int = 0  # hostile: requests abandoned 0.1-0.5 s after they were sent
    invalid_lists: list = field(default_factory=list)  # hostile: seconds to refuse a 720 KB invalid token list
    trickles_closed: list = field(default_factory=list)  # hostile: seconds until the server closed a trickled body
    errors: list = field(default_factory=list)  # what went wrong, client side and in the server log
    wall: float = 0.0  # seconds under load
    rss_start: float = 0.0  # MB, once the server is up
    rss_end: float = 0.0
    rss_peak: float = 0.0


def rss_mb(pid):
    """(current, peak) resident memory of process `pid` in MB, from /proc/PID/status."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return tuple(int(fields[name].split()[0]) / 1024 for name in ("VmRSS", "VmHWM"))


def pick_request(rng, models, chat_models):
    """(body, expected outcome) of a random request; the outcome is "reply", "refused" or "drop"."""
    chat = bool(chat_models) and rng.random() < 0.5
    body = {
        "model": rng.choice(chat_models if chat else models),
        "max_tokens": rng.choice([4, 8, 16, 32]),
        "temperature": rng.choice([0, 0.7, 1.0]),
        "seed": rng.randrange(1000),
    }
    if chat:
        body["messages"] = [{"role": "user", "content": rng.choice(QUESTIONS)}]
    else:
        body["prompt"] = rng.choice(PROMPTS)
    roll = rng.random()
    if roll < 0.05:
        return {**body, "temperature": 5}, "refused"
    if roll < 0.10:
        return {**body, "stream": True, "max_tokens": 32, "min_tokens": 32}, "drop"
    if roll < 0.55:  # a stream of exactly max_tokens tokens, so that its tokens are counted
        return {**body, "stream": True, "min_tokens": body["max_tokens"]}, "reply"
    extras = rng.choice([{}, {"n": 2}, {"stop": ["."]}, {"min_tokens": body["max_tokens"]}])
    return {**body, **extras}, "reply"


async def one_request(client, url, path, body, expected, tally):
    start = time.perf_counter()
    if not body.get("stream"):
        response = await client.post(url + path, json=body)
        if expected == "refused":
            if response.status_code != 400:
                raise AssertionError(f"expected 400, got {response.status_code}: {response.text[:200]}")
            tally.refused += 1
            return
        response.raise_for_status()
        tally.completion_tokens += response.json()["usage"]["completion_tokens"]
        tally.latencies.append(time.perf_counter() - start)
        return
    async with client.stream("POST", url + path, json=body) as response:
        response.raise_for_status()
        events = []
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if not events:
                tally.first_chunks.append(time.perf_counter() - start)
            events.append(line[len("data: ") :])
            if expected == "drop":  # leave mid-stream: closing the response closes the connection
                tally.dropped += 1
                return
    if events[-1] != "[DONE]" or json.loads(events[-2])["choices"][0]["finish_reason"] != "length":
        raise AssertionError(f"a stream ended without [DONE] after a last chunk: {events[-2:]}")
    tally.streams += 1
    tally.completion_tokens += body["max_tokens"]
    tally.latencies.append(time.perf_counter() - start)


async def hostile_request(client, url, kind, rng, models, tally):
    """One of the hostile kinds; raises when the server does not answer it as it must."""
    model = rng.choice(models)
    if kind == "score":  # 16 generations that only score their prompt: more than the batch's rows
        body = {"model": model, "prompt": ["Hi", "Hi"], "n": 8, "max_tokens": 0, "echo": True, "logprobs": 0}
        response = await client.post(url + "/v1/completions", json=body)
        response.raise_for_status()
        tally.scored += 1
    elif kind == "leave":  # 128 generations, abandoned while they are being prefilled
        body = {"model": model, "prompt": [rng.choice(PROMPTS)] * 16, "n": 8, "max_tokens": 3}
        try:
            await asyncio.wait_for(client.post(url + "/v1/completions", json=body), rng.uniform(0.1, 0.5))
        except asyncio.TimeoutError:
            pass
        tally.left_in_prefill += 1
    else:  # a long list of invalid token ids
        start = time.perf_counter()
        response = await client.post(url + "/v1/completions", json={"model": model, "prompt": INVALID_IDS})
        if response.status_code != 400:
            raise AssertionError(f"expected 400, got {response.status_code}: {response.text[:200]}")
        tally.invalid_lists.append(time.perf_counter() - start)


def trickle_body(url):
    """Seconds until the server closes a connection whose body comes a byte every 2 s (blocking)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: 1000\r\n\r\n".encode()
        )
        connection.settimeout(2)
        start = time.monotonic()
        while time.monotonic() - start < 2 * BODY_SECONDS:
            try:
                if not connection.recv(65536):
                    return time.monotonic() - start
            except socket.timeout:
                pass
            except ConnectionError:
                return time.monotonic() - start
            try:
                connection.sendall(b" ")
            except OSError:
                return time.monotonic() - start
    raise AssertionError(f"a trickled body kept its connection open for {2 * BODY_SECONDS:g} s")


async def soak(url, clients, duration, hostile=0):
    limits = httpx.Limits(max_connections=clients, keepalive_expiry=KEEPALIVE_EXPIRY)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT, limits=limits) as client:
        listing = (await client.get(url + "/v1/models")).json()["data"]
        models = [card["id"] for card in listing]
        chat_models = [card["id"] for card in listing if card.get("chat")]
        tally = Tally()
        deadline = time.monotonic() + duration

        async def client_loop(index):
            rng = random.Random(index)
            for _ in range(MAX_REQUESTS_PER_CLIENT):
                if time.monotonic() >= deadline:
                    return
                body, expected = pick_request(rng, models, chat_models)
                path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
                try:
                    await one_request(client, url, path, body, expected, tally)
                except Exception as error:  # counted, and the client goes on
                    request = f"{path} {'stream' if body.get('stream') else 'json'} ({expected})"
                    when = f"at {duration - (deadline - time.monotonic()):.1f} s"
                    tally.errors.append(f"{when}, {request}: {type(error).__name__}: {error!r}"[:300])

        async def hostile_loop(index):
            rng = random.Random(-1 - index)
            kinds = ["trickle", "score", "leave", "invalid"] if index == 0 else ["score", "leave", "invalid"]
            for turn in range(MAX_REQUESTS_PER_CLIENT):
                if time.monotonic() >= deadline:
                    return
                kind = kinds[turn % len(kinds)]
                try:
                    if kind == "trickle":
                        tally.trickles_closed.append(await asyncio.to_thread(trickle_body, url))
                    else:
                        await hostile_request(client, url, kind, rng, models, tally)
                except Exception as error:
                    tally.errors.append(f"hostile {kind}: {type(error).__name__}: {error!r}"[:300])

        start = time.perf_counter()
        await asyncio.gather(
            *(client_loop(index) for index in range(clients)), *(hostile_loop(index) for index in range(hostile))
        )
        tally.wall = time.perf_counter() - start
        health = await client.get(url + "/health")
        if health.status_code != 200:
            tally.errors.append(f"/health after the soak: {health.status_code} {health.text[:200]}")
    return tally


def run_server_and_soak(models_dir, clients, duration, hostile):
    log = tempfile.TemporaryFile("w+")  # the server's stderr: read for errors afterwards
    with running_server(models_dir, "--max-batch", str(MAX_BATCH), stderr=log) as (url, server):
        rss_start, _ = rss_mb(server.pid)
        tally = asyncio.run(soak(url, clients, duration, hostile))
        tally.rss_start, (tally.rss_end, tally.rss_peak) = rss_start, rss_mb(server.pid)
    log.seek(0)
    tally.errors += [
        f"server log: {line}" for line in log.read().splitlines() if line.startswith(("ERROR", "WARNING", "Traceback"))
    ]
    return tally


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=180, help="seconds of load per models folder")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--hostile", type=int, default=4, help="hostile clients beside the ordinary ones")
    parser.add_argument(
        "--models-dir", action="append", help="a folder of exported models (repeatable; default: serve/models)"
    )
    args = parser.parse_args()
    rows, hostile_rows, problems = [], [], []
    for name in args.models_dir or ["serve/models"]:
        models_dir = Path(name)
        load_before = os.getloadavg()[0]
        tally = run_server_and_soak(models_dir, args.clients, args.duration, args.hostile)
        answered = len(tally.latencies)
        rows.append(
            f"| {name} | {tally.wall:.0f} | {args.clients} | {answered + tally.refused + tally.dropped} "
            f"({answered} answered, {tally.streams} of them streamed; {tally.refused} refused as expected; "
            f"{tally.dropped} dropped mid-stream) | **{len(tally.errors)}** | "
            f"{statistics.median(tally.latencies):.2f} / {percentile(tally.latencies, 0.9):.2f} / "
            f"{percentile(tally.latencies, 0.99):.2f} | {statistics.median(tally.first_chunks):.3f} / "
            f"{percentile(tally.first_chunks, 0.99):.3f} | {tally.completion_tokens / tally.wall:.0f} | "
            f"{tally.rss_start:.0f} / {tally.rss_end:.0f} (peak {tally.rss_peak:.0f}) | {load_before:.1f} |"
        )
        invalid = tally.invalid_lists or [float("nan")]
        hostile_rows.append(
            f"| {name} | {args.hostile} | {tally.scored} | {tally.left_in_prefill} | {len(tally.invalid_lists)} "
            f"({statistics.median(invalid):.2f} / {max(invalid):.2f}) | {len(tally.trickles_closed)} "
            f"({max(tally.trickles_closed, default=float('nan')):.1f}) |"
        )
        problems += [f"{name}: {error}" for error in tally.errors[:10]]
    lines = [
        f"Command: `.venv/bin/python -m benchmarks.serve_soak --duration {args.duration:g} --clients {args.clients} "
        f"--hostile {args.hostile}"
        f"{''.join(f' --models-dir {d}' for d in args.models_dir or [])}`. "
        f"{machine_line()}",
        "",
        f"`python -m serve --max-batch {MAX_BATCH}` (default precision and limits) in its own process; "
        f"{args.clients} asyncio clients send requests back to back: half chat (on chat models), half completions; "
        f"about half streamed (exactly max_tokens tokens each), the rest with n = 2, a stop string or min_tokens; "
        f"max_tokens 4 to 32; idle connections are dropped after {KEEPALIVE_EXPIRY:g} s, under the server's 5 s "
        f"keep-alive. 5% are invalid (temperature 5: a 400 is expected) and 5% are streams the client "
        f"drops after the first chunk. An error is any other outcome: another status, a timeout "
        f"({REQUEST_TIMEOUT:g} s), a stream without `[DONE]`, a warning or error in the server log, /health failing "
        f"after the run.",
        "",
        "| models | seconds | clients | requests | errors | latency p50 / p90 / p99 (s) | first chunk p50 / p99 (s) "
        "| tokens/s | server RSS start / end (MB) | load avg before |",
        "|---|---:|---:|---|---:|---|---|---:|---|---:|",
        *rows,
        "",
        f"Hostile clients, during the same run (the ordinary traffic above shares the server with them): "
        f"scoring-only requests of 16 generations (`n` 8, 2 prompts, `max_tokens` 0, `echo`; a 200 is expected), "
        f"requests of 128 generations abandoned 0.1-0.5 s after they were sent (during their prefill), "
        f"720 KB lists of invalid token ids (a 400 is expected), and, from one client, a body trickled a byte every "
        f"2 s (the server must close it within its {BODY_SECONDS:g} s body deadline).",
        "",
        "| models | hostile clients | scoring-only answered | abandoned in prefill | invalid lists refused "
        "(p50 / max s) | trickled bodies closed (max s) |",
        "|---|---:|---:|---:|---|---|",
        *hostile_rows,
    ]
    if problems:
        lines += ["", "Errors (first ones):", "", *(f"- `{problem}`" for problem in problems)]
    report = "\n".join(lines)
    print(report)
    write_section("## Soak", report)
    if problems:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
