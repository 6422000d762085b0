"""The server under hostile and careless clients: however a generation ends, its batch row comes back; a client
that leaves, or one request that fails, ends that request only; bodies cost what their size does, and neither a
trickled body nor a reader that stops holds a socket. Real server (uvicorn, loopback sockets)."""

import asyncio
import inspect
import json
import logging
import os
import random
import socket
import time

import httpx
import pytest
import torch

import serve.kernel
from serve.__main__ import main, parse_args
from serve.app import create_app
from serve.engine import PIPELINE_FROM, PREFILL_CHUNK
from serve.kernel import KernelBuildError
from serve.schema import CompletionRequest
from tests.server import RunningServer, wait_until

ROWS = 4  # batch rows of the small server: fewer than the generations the tests send at once
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def models_dir(tiny_exports):
    return tiny_exports(256)


@pytest.fixture(scope="module")
def small_server(models_dir):
    with RunningServer(models_dir, max_batch=ROWS) as server:
        yield server


@pytest.fixture(scope="module")
def server(models_dir):
    # One kernel thread, so that on 2 cores or more the batch steps in halves (tested below).
    with RunningServer(models_dir, threads=1) as server:
        yield server


def all_rows_free(server, model):
    engine = server.app.state.models[model].engine
    return wait_until(lambda: engine.in_flight() == 0 and len(engine._free_rows) == engine.cache.keys.shape[1])


def raw_socket(server):
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def read_until_closed(connection, seconds=10.0):
    """What the server sent, and whether it closed the connection within `seconds`."""
    connection.settimeout(seconds)
    received = b""
    try:
        while chunk := connection.recv(65536):
            received += chunk
    except socket.timeout:
        return received, False
    except ConnectionResetError:
        pass
    return received, True


# --- rows ----------------------------------------------------------------------------------------


def test_scoring_only_requests_free_their_rows_and_the_model_answers_next(small_server):
    """The issue's one request that hung a model: 2 prompts x n 8, scored only, is 16 generations on 4 rows."""
    body = {"model": "chat", "prompt": ["Hi", "Hi"], "n": 8, "max_tokens": 0, "echo": True, "logprobs": 0}
    for _ in range(2):
        scored = httpx.post(small_server.url + "/v1/completions", json=body, timeout=30)
        assert scored.status_code == 200 and len(scored.json()["choices"]) == 16
    assert httpx.post(small_server.url + "/v1/chat/completions", json=CHAT, timeout=30).status_code == 200
    all_rows_free(small_server, "chat")


@pytest.mark.parametrize(
    "body",
    [
        {"max_tokens": 1},  # ends at its first token
        {"max_tokens": 40, "stop": [" ", "e", "a", "o"]},  # a stop string, most likely in the first tokens
    ],
    ids=["first-token", "stop-string"],
)
def test_generations_that_end_early_free_their_rows(small_server, body):
    replies = [
        httpx.post(
            small_server.url + "/v1/completions",
            timeout=30,
            json={"model": "base", "prompt": ["Hi", "Ho"], "n": 4, "seed": 1, **body},
        )
        for _ in range(2)
    ]
    assert [reply.status_code for reply in replies] == [200, 200]
    all_rows_free(small_server, "base")


def test_generations_that_fail_or_are_left_in_prefill_free_their_rows(small_server, monkeypatch):
    engine = small_server.app.state.models["base"].engine
    forward = engine.model.forward
    monkeypatch.setattr(engine.model, "forward", lambda *args, **kwargs: 1 / 0)
    failed = httpx.post(
        small_server.url + "/v1/completions", timeout=30, json={"model": "base", "prompt": ["Hi", "Ho"], "n": 4}
    )
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "generation_failed"
    all_rows_free(small_server, "base")

    def slow_forward(*args, **kwargs):
        time.sleep(0.05)
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", slow_forward)
    long_prompt = {"model": "base", "prompt": [list(range(5, 5 + 4 * PREFILL_CHUNK))] * 2, "n": 4, "max_tokens": 2}
    with pytest.raises(httpx.ReadTimeout):  # the client leaves while the prompts are prefilled
        httpx.post(small_server.url + "/v1/completions", json=long_prompt, timeout=0.3)
    monkeypatch.setattr(engine.model, "forward", forward)
    all_rows_free(small_server, "base")
    assert (
        httpx.post(
            small_server.url + "/v1/completions", timeout=30, json={"model": "base", "prompt": "Hi", "max_tokens": 3}
        ).status_code
        == 200
    )


# --- one request's end is its own ----------------------------------------------------------------


def decoding_beside(server, streams, tokens=60):
    """`streams` streamed completions of `tokens` tokens each, as an awaitable of their texts (None: failed)."""
    body = {"model": "base", "prompt": "Rivers", "max_tokens": tokens, "min_tokens": tokens, "stream": True}

    async def one(client, seed):
        text = ""
        async with client.stream("POST", "/v1/completions", json={**body, "seed": seed}) as reply:
            async for line in reply.aiter_lines():
                if line == "data: [DONE]":
                    return text
                if line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return None
                    text += chunk["choices"][0]["text"]
        return None

    async def all_of_them(client):
        return await asyncio.gather(*(one(client, seed) for seed in range(streams)))

    return all_of_them


def test_a_request_cancelled_in_its_last_prefill_chunk_ends_alone_beside_requests_stepping_in_halves(
    server, monkeypatch
):
    """The issue's IndexError: a request that joins the batch cancelled has no token to step from; the next
    half step took it and failed all in flight. Cancelled here exactly during its last chunk, every round."""
    engine = server.app.state.models["base"].engine
    if not engine._steps_in_halves:
        pytest.skip("one core here: a kernel thread takes it, so the batch never steps in halves")
    victim_ids = list(range(7, 7 + PREFILL_CHUNK + 5))  # two chunks
    forward = engine.model.forward

    def cancel_in_last_chunk(tokens, **kwargs):
        generation = engine._prefilling[0]
        if generation.prompt_ids == victim_ids and generation.prefilled + tokens.shape[1] == len(victim_ids):
            generation.cancelled = True
        return forward(tokens, **kwargs)

    monkeypatch.setattr(engine.model, "forward", cancel_in_last_chunk)

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            background = asyncio.ensure_future(decoding_beside(server, PIPELINE_FROM + 2, tokens=60)(client))
            await asyncio.to_thread(wait_until, lambda: len(engine._decoding) >= PIPELINE_FROM)
            victims = [
                asyncio.ensure_future(
                    client.post("/v1/completions", json={"model": "base", "prompt": victim_ids, "max_tokens": 3})
                )
                for _ in range(3)
            ]
            texts = await background
            for victim in victims:  # nobody answers a cancelled request: its client is gone
                victim.cancel()
            return texts

    texts = asyncio.run(run())
    assert all(text is not None for text in texts), "a cancelled request failed the others"
    all_rows_free(server, "base")


def test_clients_that_leave_during_prefill_never_fail_the_others(server):
    """The issue's race, as a client makes it: 10 streams decode while a client sends 16 prompts x n 8 and
    closes its socket at some moment of their prefill; every other stream must complete, round after round."""
    leaving = {"model": "base", "prompt": ["Hi " * (i + 20) for i in range(16)], "n": 8, "max_tokens": 3}
    rng = random.Random(0)

    async def round_(client):
        background = asyncio.ensure_future(decoding_beside(server, 10, tokens=40)(client))
        await asyncio.sleep(0.05)
        async with httpx.AsyncClient(base_url=server.url) as leaver:
            try:
                await leaver.post("/v1/completions", json=leaving, timeout=rng.uniform(0.02, 0.3))
            except httpx.TimeoutException:
                pass  # it left (most rounds: the 128 prompts take longer to prefill)
        return await background

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return [await round_(client) for _ in range(6)]

    for texts in asyncio.run(run()):
        assert all(text is not None for text in texts), "a client that left failed the others"
    all_rows_free(server, "base")


def test_a_decode_step_that_fails_for_one_request_ends_that_request_only(server, monkeypatch):
    """The kernel fails whenever one request's row is in the step (on the kernel's own thread when the batch
    steps in halves): that request gets the error, every request beside it its whole text."""
    engine = server.app.state.models["base"].engine
    poison = [5, 6, 7, 8, 9]
    decoder = engine.decoder

    def fail_on_the_poisoned_row(tokens, rows, positions):
        poisoned = {generation.row for generation in list(engine._decoding) if generation.prompt_ids == poison}
        if poisoned & set(rows):
            raise RuntimeError("injected failure")
        return decoder(tokens, rows, positions)

    monkeypatch.setattr(engine, "decoder", fail_on_the_poisoned_row)

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            background = asyncio.ensure_future(decoding_beside(server, PIPELINE_FROM + 2, tokens=60)(client))
            await asyncio.to_thread(wait_until, lambda: len(engine._decoding) >= PIPELINE_FROM)
            poisoned = await client.post("/v1/completions", json={"model": "base", "prompt": poison, "max_tokens": 20})
            return await background, poisoned

    texts, poisoned = asyncio.run(run())
    assert poisoned.status_code == 500 and poisoned.json()["error"]["code"] == "generation_failed"
    assert all(text is not None for text in texts)
    all_rows_free(server, "base")


# --- bodies --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt",
    [[-1] * 240_000, [1] + ["a"] * 240_000, ["a"] * 240_000, [[-1]] * 240_000],
    ids=["negative-ids", "strings-among-ids", "texts", "id-lists"],
)
def test_a_long_invalid_prompt_is_one_error_not_one_per_item(prompt):
    """Pydantic built an error per item and union member (5 s of event loop for 720 KB): one error now."""
    with pytest.raises(ValueError) as error:
        CompletionRequest.model_validate(json.loads(json.dumps({"model": "base", "prompt": prompt})))
    assert len(error.value.errors()) == 1


def test_a_long_invalid_prompt_gets_a_400_naming_the_prompt(server):
    reply = httpx.post(server.url + "/v1/completions", json={"model": "base", "prompt": [3, 4, -1] * 1000}, timeout=30)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "prompt"
    assert "item 2 is -1" in reply.json()["error"]["message"]


def test_a_trickled_body_gets_408_when_its_whole_time_is_spent(models_dir):
    with RunningServer(models_dir, body_seconds=1.0) as server:
        with raw_socket(server) as connection:
            connection.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                b"\r\nContent-Length: 100\r\n\r\n"
            )
            started = time.monotonic()
            connection.settimeout(0.25)
            received = b""
            while time.monotonic() - started < 5 and not received:  # a byte every 0.25 s: each read is quick
                connection.sendall(b" ")
                try:
                    received = connection.recv(65536)
                except socket.timeout:
                    pass
            assert received.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 2
            _, closed = read_until_closed(connection, 3)
            assert closed


def test_a_refused_body_closes_the_connection_though_the_client_goes_on_sending(small_server):
    with raw_socket(small_server) as connection:
        connection.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"x" * 100_000
        try:
            for _ in range(15):  # 1.5 MB, over the 1 MB limit
                connection.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except (BrokenPipeError, ConnectionResetError):
            pass
        received, closed = read_until_closed(connection, 5)
        assert received.startswith(b"HTTP/1.1 413") and closed


def test_a_body_framed_both_ways_is_refused(small_server):
    with raw_socket(small_server) as connection:
        body = b'{"model": "base", "prompt": "Hi", "max_tokens": 1}'
        connection.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
            % (len(body), len(body), body)
        )
        received, closed = read_until_closed(connection, 5)
        assert received.startswith(b"HTTP/1.1 400") and b"invalid_http" in received and closed


def test_a_client_that_stops_reading_its_stream_is_closed_and_its_generations_stop(models_dir):
    with RunningServer(models_dir, limits={"write_seconds": 0.5}) as server:
        engine = server.app.state.models["base"].engine
        connection = socket.socket()
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        host, port = server.url.removeprefix("http://").split(":")
        connection.connect((host, int(port)))
        with connection:
            body = json.dumps(
                {
                    "model": "base",
                    "prompt": ["Once"] * 16,
                    "n": 8,
                    "max_tokens": 200,
                    "min_tokens": 200,
                    "stream": True,
                    "logprobs": 5,
                }
            ).encode()
            connection.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            wait_until(lambda: engine.in_flight() > 0)
            started = time.monotonic()
            wait_until(lambda: engine.in_flight() == 0 and engine.pending() == 0, seconds=20)
            # 128 generations of 200 tokens take far longer than this: they were stopped, not finished.
            assert time.monotonic() - started < 10
            _, closed = read_until_closed(connection, 5)
            assert closed


# --- the rest ------------------------------------------------------------------------------------


def test_text_offsets_index_the_reply_text_with_echo_byte_pieces_and_streams(server):
    prompt = "Café au lait, naïve 日本 — done"
    body = {"model": "base", "prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 8, "temperature": 0}
    choice = httpx.post(server.url + "/v1/completions", json=body, timeout=30).json()["choices"][0]
    text, tokens, offsets = choice["text"], choice["logprobs"]["tokens"], choice["logprobs"]["text_offset"]
    assert text.startswith(prompt) and tokens[0] == "<|endoftext|>" and offsets[:2] == [0, 0]
    assert any(token.startswith("bytes:") for token in tokens), "the prompt should need byte pieces"
    assert offsets == sorted(offsets) and offsets[-1] < len(text)
    for token, offset in zip(tokens[1:], offsets[1:]):
        if not token.startswith("bytes:"):
            assert text[offset : offset + len(token)] == token
    streamed = []
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=30) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                streamed += json.loads(line[6:])["choices"][0]["logprobs"]["text_offset"]
    assert streamed == offsets


def test_usage_counts_each_prompt_once_whatever_n_is(server):
    usage = [
        httpx.post(
            server.url + "/v1/completions",
            timeout=30,
            json={"model": "base", "prompt": "The river", "n": n, "max_tokens": 2},
        ).json()["usage"]
        for n in (1, 3)
    ]
    assert usage[0]["prompt_tokens"] == usage[1]["prompt_tokens"] > 0
    assert usage[1]["completion_tokens"] == 3 * usage[0]["completion_tokens"]


def test_echo_on_chat_is_refused_by_name(server):
    reply = httpx.post(server.url + "/v1/chat/completions", json={**CHAT, "echo": True}, timeout=30)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "echo"
    assert httpx.post(server.url + "/v1/chat/completions", json={**CHAT, "echo": False}, timeout=30).status_code == 200


def test_dangling_and_looping_model_links_are_reported(models_dir, tmp_path, caplog):
    import shutil

    shutil.copytree(models_dir / "base", tmp_path / "base")
    (tmp_path / "gone").symlink_to(tmp_path / "missing")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with caplog.at_level(logging.ERROR, logger="serve"):
        app = create_app(tmp_path)
    assert list(app.state.models) == ["base"]
    for name in ("gone", "loop"):
        assert any(name in record.getMessage() and "link" in record.getMessage() for record in caplog.records)
    for hosted in app.state.models.values():
        hosted.engine.close()


NOT_BUILT = "the server's kernel is not built, and building it needs a C++ compiler: install g++, then run `make setup`"


def kernel_not_built():
    raise KernelBuildError(NOT_BUILT)


def test_a_kernel_that_is_not_built_is_one_error_with_its_cause(models_dir, monkeypatch, caplog):
    """Every model decodes with the kernel: without it the app says why, before trying any model folder,
    rather than skipping each folder for the same reason and then finding no loadable model."""
    monkeypatch.setattr(serve.kernel, "library", kernel_not_built)
    with caplog.at_level(logging.ERROR, logger="serve"), pytest.raises(KernelBuildError) as raised:
        create_app(models_dir)
    assert str(raised.value) == NOT_BUILT and caplog.records == []


def test_the_server_command_prints_a_kernel_that_is_not_built_as_one_line(models_dir, monkeypatch, capsys):
    monkeypatch.setattr(serve.kernel, "library", kernel_not_built)
    with pytest.raises(SystemExit) as ended:
        main(["--models-dir", str(models_dir), "--threads", str(torch.get_num_threads())])
    assert ended.value.code == 1
    assert capsys.readouterr().err == f"error: {NOT_BUILT}\n"


def test_the_server_decodes_on_every_core_it_may_use_unless_told_otherwise():
    """README: `--threads` defaults to every core the server may use, as llama-server's; so does an app built
    without it."""
    cores = len(os.sched_getaffinity(0))
    assert parse_args([]).threads == cores and parse_args(["--threads", "1"]).threads == 1
    assert inspect.signature(create_app).parameters["threads"].default == cores


@pytest.mark.parametrize(
    "argv",
    [
        ["--body-seconds", "inf"],
        ["--max-generation-seconds", "inf"],
        ["--header-seconds", "nan"],
        ["--write-seconds", "inf"],
        ["--port", "99999"],
    ],
)
def test_flags_that_would_switch_a_limit_off_or_cannot_be_bound_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as ended:
        parse_args(argv)
    assert ended.value.code == 2 and argv[0] in capsys.readouterr().err
