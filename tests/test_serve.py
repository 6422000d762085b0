"""The server speaks the OpenAI API: driven with the official `openai` client and raw HTTP."""

import asyncio
import json
import re
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from model.generate import Sampling
from model.special_tokens import END_OF_TEXT_ID
from serve.app import create_app
from serve.engine import DEFAULT_THREADS, PIPELINE_FROM
from tests.server import RunningServer, slowed

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tiny_exports):
    folder = tmp_path_factory.mktemp("models")
    shutil.copytree(tiny_exports(), folder / "models")
    (folder / "models" / "broken").mkdir()
    (folder / "models" / "broken" / "config.json").write_text("{not json")
    return folder / "models"


@pytest.fixture(scope="module")
def server(models_dir):
    # One kernel thread, so that on 2 cores or more the batch steps in halves (tested below).
    with RunningServer(models_dir, threads=1) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def post(server, path, body):
    return httpx.post(server.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=30)


def test_models_are_listed_with_their_metadata_and_broken_folders_skipped(client):
    models = {model.id: model for model in client.models.list().data}
    assert sorted(models) == ["base", "chat"]
    chat = models["chat"].model_dump()
    assert chat["chat"] is True and chat["parameters"] > 0 and len(chat["revision"]) == 12
    assert chat["metrics"] == {"val/dialog/loss": 3.0}


def test_models_are_listed_with_their_sampling_defaults_and_the_time_their_weights_were_written(server, models_dir):
    for card in httpx.get(server.url + "/v1/models").json()["data"]:
        assert card["created"] == int((models_dir / card["id"] / "model.safetensors").stat().st_mtime) > 0
        assert card["sampling"] == {"temperature": 0.8, "top_p": 1.0, "top_k": 50}  # tests/tiny.py's export


def test_requests_that_leave_sampling_out_get_the_exports_defaults(tokenizer_model_file, tokenizer, tmp_path):
    """The export's generation_config.json (params.yaml's evaluate section, through the export stage) is the one
    source of sampling defaults: the server's replies, /v1/models (where the web UI starts from) and the GGUF's
    Ollama Modelfile all follow it when it changes."""
    from model.export import export_model
    from model.llamacpp import modelfile
    from tests.tiny import servable_model

    model = servable_model(tokenizer.vocab_size)
    body = {"model": "base", "prompt": "Once", "max_tokens": 20, "min_tokens": 20, "seed": 3}
    for generation in ({"temperature": 0.0, "top_k": 5}, {"temperature": 1.5, "top_k": 3}):
        folder = tmp_path / str(generation["temperature"]) / "base"
        export_model(model, tokenizer_model_file, folder, "base", False, {}, generation)
        with RunningServer(folder.parent) as server:

            def text(request):
                reply = httpx.post(server.url + "/v1/completions", json=request, timeout=30)
                return reply.json()["choices"][0]["text"]

            card = httpx.get(server.url + "/v1/models").json()["data"][0]
            assert card["sampling"] == {**generation, "top_p": 1.0}
            assert text(body) == text({**body, **generation})
            assert text(body) != text({**body, "temperature": 0.7, "top_k": 40})
        assert {f"PARAMETER {name} {value}" for name, value in generation.items()} <= set(
            modelfile(folder, "base-q8_0.gguf").splitlines()
        )


def test_the_readmes_openai_example_runs_as_written(server):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    snippet = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.DOTALL) if "from openai" in block)
    assert "http://127.0.0.1:8080/v1" in snippet
    exec(snippet.replace("http://127.0.0.1:8080/v1", server.url + "/v1"), {})


def test_health(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "models": ["base", "chat"]}


def test_completion_returns_text_usage_and_finish_reason(client):
    reply = client.completions.create(
        model="base", prompt="The capital of France is", max_tokens=12, temperature=0, extra_body={"min_tokens": 12}
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and choice.text
    assert reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12


def test_int8_serving_keeps_the_kv_cache_in_16_bit_floats_and_fp32_in_32(models_dir):
    """The README's claim: int8 halves the cache's memory, fp32 rounds nothing."""
    for precision, dtype in (("int8", torch.float16), ("fp32", torch.float32)):
        with TestClient(create_app(models_dir, precision=precision)) as client:  # the app's lifespan
            engine = client.app.state.models["base"].engine
            assert engine.cache.keys.dtype == engine.cache.values.dtype == dtype


def test_apps_started_and_stopped_again_and_again_leave_no_thread_behind(models_dir):
    """Each model's engine has a decoding thread and a kernel thread: they end with the server (the app's
    lifespan), and a generation still queued then ends with an error reply rather than never."""
    before = set(threading.enumerate())
    for _ in range(3):
        with RunningServer(models_dir, max_batch=1) as server:
            assert (
                httpx.post(
                    server.url + "/v1/completions", json={"model": "base", "prompt": "Hi", "max_tokens": 3}, timeout=30
                ).status_code
                == 200
            )
            assert {thread.name for thread in set(threading.enumerate()) - before} >= {"base-engine", "chat-engine"}
    assert [thread.name for thread in set(threading.enumerate()) - before if thread.is_alive()] == []


def test_closing_an_engine_ends_what_it_still_holds(models_dir):
    async def submit_and_stop():
        with TestClient(create_app(models_dir, max_batch=1)) as client:
            engine = client.app.state.models["base"].engine
            sampling = Sampling(max_tokens=100, min_tokens=100)
            return [engine.submit([1, 5, 6], sampling) for _ in range(3)]  # one decoding, two queued

    generations = asyncio.run(submit_and_stop())  # the engine has closed: every generation has ended
    assert [generation.finish_reason for generation in generations][1:] == ["error", "error"]
    assert generations[0].finish_reason in ("error", "length")


def test_temperature_zero_is_greedy_and_repeatable(client):
    texts = {
        client.completions.create(model="base", prompt="Hello", max_tokens=10, temperature=0).choices[0].text
        for _ in range(3)
    }
    assert len(texts) == 1


def test_same_seed_same_output_and_different_seeds_differ(client):
    def sample(seed):
        return (
            client.completions.create(
                model="base", prompt="Once", max_tokens=24, temperature=1.0, seed=seed, extra_body={"min_tokens": 24}
            )
            .choices[0]
            .text
        )

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in range(4)}) > 1


@pytest.mark.parametrize("precision, threads", [("int8", 1), ("fp32", 1), ("int8", DEFAULT_THREADS)])
def test_a_request_gives_the_same_text_alone_and_batched_with_others(models_dir, precision, threads):
    """The README's promise, as a user meets it: a seeded sampled request and a greedy one, sent alone,
    then again while longer generations (other prompts, lengths and settings) decode beside them, enough
    that the batch steps in two halves (PIPELINE_FROM) with one kernel thread, and with the default threads."""
    targets = [
        {
            "model": "base",
            "prompt": "Once upon a time",
            "max_tokens": 40,
            "min_tokens": 40,
            "temperature": 1.0,
            "top_p": 0.9,
            "seed": 2**40 + 3,
        },
        {"model": "base", "prompt": "The river", "max_tokens": 40, "min_tokens": 40, "temperature": 0},
    ]
    others = [
        {
            "model": "base",
            "prompt": "word " * (2 + i),
            "max_tokens": 90,
            "min_tokens": 90,
            "temperature": 0.5 + i / 8,
            "seed": i,
        }
        for i in range(PIPELINE_FROM + 2)
    ]

    async def texts(client, bodies):
        replies = await asyncio.gather(*(client.post("/v1/completions", json=body) for body in bodies))
        assert [reply.status_code for reply in replies] == [200] * len(bodies)
        return [reply.json()["choices"][0]["text"] for reply in replies]

    async def run(server):
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            alone = [await texts(client, [body]) for body in targets]
            engine = server.app.state.models["base"].engine
            engine.decoder = slowed(engine.decoder, 0.002)  # the others must outlast the targets
            background = asyncio.ensure_future(texts(client, others))
            while engine.in_flight() < len(others):
                assert not background.done(), background.result()
                await asyncio.sleep(0.01)
            batched = await texts(client, targets)
            assert engine.in_flight() >= len(others), "the other generations should still be decoding"
            await background
            return [text for [text] in alone], batched

    with RunningServer(models_dir, precision=precision, threads=threads) as server:
        alone, batched = asyncio.run(run(server))
    assert alone == batched
    assert all(alone)


def test_n_and_prompt_list_give_one_choice_each(client):
    reply = client.completions.create(model="base", prompt=["One", "Two"], n=2, max_tokens=4, seed=1)
    assert sorted(choice.index for choice in reply.choices) == [0, 1, 2, 3]


def test_stop_string_ends_the_text_before_it(client):
    free = (
        client.completions.create(
            model="base", prompt="Hello", max_tokens=30, temperature=0, extra_body={"min_tokens": 30}
        )
        .choices[0]
        .text
    )
    stop = free[5:8]
    reply = client.completions.create(
        model="base", prompt="Hello", max_tokens=30, temperature=0, stop=[stop], extra_body={"min_tokens": 30}
    )
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].text == free[: free.index(stop)]


def test_streamed_completion_equals_the_whole_reply(client):
    whole = client.completions.create(model="base", prompt="Rivers", max_tokens=20, temperature=0).choices[0].text
    chunks = list(client.completions.create(model="base", prompt="Rivers", max_tokens=20, temperature=0, stream=True))
    assert len(chunks) > 1
    assert "".join(chunk.choices[0].text for chunk in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_a_generation_not_streamed_sends_its_text_once_at_the_end(server):
    """Nobody reads a whole reply's text before it ends, so the engine makes and sends it once (with or without
    stop strings, which it still checks token by token); the text is the streamed one's."""
    engine = server.app.state.models["base"].engine

    async def events(streamed, stop):
        sampling = Sampling(max_tokens=24, temperature=0.9)
        generation = engine.submit([1, 30, 40], sampling, seed=5, stop=stop, streamed=streamed)
        received = [await generation.transport.receive()]
        while received[-1].finish_reason is None:
            received.append(await generation.transport.receive())
        return received

    for stop in ((), ("zzzz",)):
        streamed, whole = asyncio.run(events(True, stop)), asyncio.run(events(False, stop))
        assert len(streamed) > 1 and len(whole) == 1
        assert whole[0].text == "".join(event.text for event in streamed)
        assert whole[0].completion_tokens == streamed[-1].completion_tokens == 24


def byte_piece(tokenizer, value):
    return tokenizer.sp.piece_to_id(f"<0x{value:02X}>")


@pytest.mark.parametrize(
    "script, text",
    [
        (lambda t: [byte_piece(t, 0xE6)], ""),  # a character begun at the end: not in the reply
        (lambda t: t.encode("a") + [byte_piece(t, 0xF0), byte_piece(t, 0x9F)], "a"),
        (lambda t: [byte_piece(t, 0xE6), *t.encode("a")], "\ufffda"),  # a byte no character can hold
        (lambda t: [byte_piece(t, 0xE6), byte_piece(t, 0x9D), byte_piece(t, 0xB1)], "東"),  # finished by later tokens
    ],
    ids=["lead-byte-at-the-end", "two-of-four-bytes-at-the-end", "invalid-inside", "whole-character"],
)
def test_a_reply_holds_only_whole_characters_and_u_fffd_for_invalid_bytes(
    server, base_model, monkeypatch, script, text
):
    """Sampled byte pieces: a reply (and every stream chunk) has only the characters its bytes finish; a byte
    that cannot be part of one is U+FFFD, as in any UTF-8 decoder."""
    import serve.engine

    _, tokenizer = base_model
    tokens = script(tokenizer)
    drawn = []

    def scripted(logits, generations):  # the generation's next scripted token, whatever the model says
        drawn.append(tokens[len(drawn)])
        return drawn[-1:]

    monkeypatch.setattr(serve.engine, "next_tokens", scripted)
    body = {"model": "base", "prompt": "Hi", "max_tokens": len(tokens)}
    reply = post(server, "/v1/completions", json.dumps(body)).json()
    assert reply["choices"][0]["text"] == text
    drawn.clear()
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=30) as stream:
        chunks = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: {")]
    deltas = [chunk["choices"][0]["text"] for chunk in chunks]
    assert "".join(deltas) == text  # so no chunk showed a U+FFFD that a later token took back


def test_chat_multi_turn_and_streaming(client):
    messages = [
        {"role": "user", "content": "Hi, how are you?"},
        {"role": "assistant", "content": "Fine, thanks."},
        {"role": "user", "content": "What is your name?"},
    ]
    reply = client.chat.completions.create(model="chat", messages=messages, max_tokens=20, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert "\n" not in reply.choices[0].message.content
    stream = client.chat.completions.create(model="chat", messages=messages, max_tokens=20, temperature=0, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert text == reply.choices[0].message.content


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "Hi"}]}),
        (
            "/v1/chat/completions",
            {
                "model": "chat",
                "messages": [{"role": "user", "content": "Hi"}],
                "logprobs": True,
                "stream_options": {"include_usage": True},
            },
        ),
        ("/v1/completions", {"model": "base", "prompt": "Rivers", "logprobs": 1}),
    ],
)
def test_every_streamed_chunk_matches_the_schema_the_api_publishes(server, path, body):
    """Each chunk against the chunk class that /openapi.json derives its schema from (finish_reason is required:
    null until the last chunk)."""
    from serve.schema import ChatCompletionChunk, CompletionChunk

    chunk_class = ChatCompletionChunk if "chat" in path else CompletionChunk
    with httpx.stream("POST", server.url + path, json={**body, "max_tokens": 12, "stream": True}, timeout=60) as reply:
        lines = [line[len("data: ") :] for line in reply.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]" and len(lines) > 2
    for line in lines[:-1]:
        chunk = json.loads(line)
        chunk_class.model_validate(chunk)
        assert all("finish_reason" in choice for choice in chunk["choices"]), line


def test_chat_on_a_base_model_is_refused(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": "Hi"}])
    assert error.value.body["param"] == "model"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": "base", "prompt": "x", "temperature": 2.5}, "temperature"),
        ({"model": "base", "prompt": "x", "temperature": "hot"}, "temperature"),
        ({"model": "base", "prompt": "x", "top_p": 0}, "top_p"),
        ({"model": "base", "prompt": "x", "top_k": 0}, "top_k"),
        ({"model": "base", "prompt": "x", "n": 0}, "n"),
        ({"model": "base", "prompt": "x", "n": 100}, "n"),
        ({"model": "base", "prompt": "x", "max_tokens": 100000}, "max_tokens"),
        ({"model": "base", "prompt": "x", "max_tokens": 4, "min_tokens": 5}, "min_tokens"),
        ({"model": "base", "prompt": 42}, "prompt"),
        ({"model": "base", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "chat", "messages": [{"role": "assistant", "content": "x"}]}, "messages"),
        ({"model": "chat", "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ],
)
def test_bad_fields_get_a_400_naming_the_field(server, body, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    response = post(server, path, json.dumps(body))
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_unknown_model_is_404_and_never_a_path(server):
    for name in ("missing", "../chat", "/etc/passwd", "chat/../base"):
        response = post(server, "/v1/completions", json.dumps({"model": name, "prompt": "x"}))
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("raw", [b'{"model": "base", "prompt": ', b"\xff\xfe{}", b"[1, 2]", b""])
def test_malformed_bodies_get_a_400_in_openai_shape(server, raw):
    response = post(server, "/v1/completions", raw)
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text and "/work" not in response.text


def test_oversized_body_is_refused_with_413(server):
    response = post(server, "/v1/completions", b'{"model": "base", "prompt": "' + b"a" * 2_000_000 + b'"}')
    assert response.status_code == 413
    assert response.json()["error"]["message"]


def test_no_loadable_model_is_a_clear_failure(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no loadable model"):
        create_app(tmp_path / "empty")


def test_a_failing_generation_step_ends_its_request_and_the_model_keeps_serving(server, monkeypatch):
    engine = server.app.state.models["base"].engine
    forward = engine.model.forward

    def fail_once(*args, **kwargs):
        monkeypatch.setattr(engine.model, "forward", forward)
        raise RuntimeError("injected failure")

    monkeypatch.setattr(engine.model, "forward", fail_once)
    failed = post(server, "/v1/completions", json.dumps({"model": "base", "prompt": "Hi", "max_tokens": 4}))
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "generation_failed"
    assert "injected" not in failed.text
    served = post(server, "/v1/completions", json.dumps({"model": "base", "prompt": "Hi", "max_tokens": 4}))
    assert served.status_code == 200 and served.json()["usage"]["completion_tokens"] == 4


def test_a_kernel_failure_while_the_batch_steps_in_halves_is_retried_row_by_row_and_every_request_completes(
    server, monkeypatch
):
    """From PIPELINE_FROM requests on, the decode kernel runs on a thread of its own. A batched step that fails
    there is stepped again one request at a time (which rewrites the same cache entries), so a failure that is
    no request's own ends none of them, and each text is the one it would have been."""
    engine = server.app.state.models["base"].engine
    if not engine._steps_in_halves:
        pytest.skip("one core here: a kernel thread takes it, so the batch never steps in halves")
    body = {"model": "base", "prompt": "Hi", "max_tokens": 30, "min_tokens": 30, "temperature": 0.7}

    async def batch():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            replies = await asyncio.gather(
                *(client.post("/v1/completions", json={**body, "seed": i}) for i in range(PIPELINE_FROM + 2))
            )
        assert [reply.status_code for reply in replies] == [200] * (PIPELINE_FROM + 2)
        return [reply.json()["choices"][0]["text"] for reply in replies]

    undisturbed = asyncio.run(batch())
    decoder, failed_on = engine.decoder, []

    def fail_once_on_the_kernels_thread(*step):
        if not failed_on and "decode-kernel" in threading.current_thread().name:
            failed_on.append(len(step[0]))
            raise RuntimeError("injected failure")
        return decoder(*step)

    monkeypatch.setattr(engine, "decoder", fail_once_on_the_kernels_thread)
    assert asyncio.run(batch()) == undisturbed
    assert failed_on and failed_on[0] >= PIPELINE_FROM // 2


# --- the fields evaluation tools rely on ---------------------------------------------------------


@pytest.fixture(scope="module")
def base_model(models_dir):
    from model.export import load_export
    from model.tokenizer import Tokenizer

    model, _ = load_export(models_dir / "base")
    return model, Tokenizer(models_dir / "base" / "tokenizer.model")


def model_logprobs(model, ids):
    """log p(ids[i] | ids[:i]) for i >= 1, and the log-probabilities at each position, straight from the model."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    logprobs = torch.log_softmax(logits[0].float(), dim=-1)
    return [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))], logprobs


def test_completion_logprobs_are_the_models_own(server, base_model):
    model, tokenizer = base_model
    body = {"model": "base", "prompt": "The river", "max_tokens": 6, "min_tokens": 6, "temperature": 0, "logprobs": 3}
    reply = post(server, "/v1/completions", json.dumps(body)).json()["choices"][0]
    logprobs = reply["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 6
    assert "".join(logprobs["tokens"]) == reply["text"]
    assert logprobs["text_offset"][0] == 0
    prompt_ids = tokenizer.document_prompt("The river")
    generated = tokenizer.encode_text(reply["text"])
    expected, _ = model_logprobs(model, prompt_ids + generated)
    # int8 weights (the default) move log-probabilities a little; greedy picks each position's top token.
    assert logprobs["token_logprobs"] == pytest.approx(expected[len(prompt_ids) - 1 :], abs=0.05)
    for token, chosen, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]):
        assert len(top) == 3 and max(top, key=top.get) == token and top[token] == chosen


def test_tokenize_gives_the_ids_a_completion_prompt_is_scored_on_and_detokenize_reverses_it(server, base_model):
    """vLLM's /tokenize and /detokenize, which lm-evaluation-harness's remote tokenizer calls (with no model:
    both models share one tokenizer). A literal <|endoftext|> is the token, as lm-eval's prefix token needs."""
    _, tokenizer = base_model
    text = "The river<|endoftext|>Rivers flow"
    tokenized = httpx.post(server.url + "/tokenize", json={"prompt": text}).json()
    scored = post(
        server,
        "/v1/completions",
        json.dumps({"model": "base", "prompt": text, "max_tokens": 0, "echo": True, "logprobs": 0}),
    ).json()
    assert tokenized["count"] == len(tokenized["tokens"]) == scored["usage"]["prompt_tokens"]
    assert tokenized["tokens"] == tokenizer.document_prompt(text) and tokenized["tokens"].count(END_OF_TEXT_ID) == 2
    assert tokenized["max_model_len"] == 128
    plain = httpx.post(server.url + "/tokenize", json={"model": "chat", "prompt": text, "add_special_tokens": False})
    assert plain.json()["tokens"] == tokenized["tokens"][1:]
    assert httpx.post(server.url + "/tokenize", json={"prompt": "<|endoftext|>", "add_special_tokens": False}).json()[
        "tokens"
    ] == [END_OF_TEXT_ID]
    ids = tokenizer.encode_text("Rivers flow, 東京 🙂")
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids}).json() == {"prompt": "Rivers flow, 東京 🙂"}


def test_tokenizer_info_is_the_exports_tokenizer_config(server, models_dir):
    for name in ("base", "chat"):
        config = json.loads((models_dir / name / "tokenizer_config.json").read_text())
        info = httpx.get(server.url + "/tokenizer_info", params={"model": name}).json()
        assert info["eos_token"] == config["eos_token"] == "<|endoftext|>"
        assert info["model_max_length"] == config["model_max_length"] == 128
        assert info["chat_template"] == config.get("chat_template") and (info["chat_template"] is None) == (
            name == "base"
        )


def test_tokenizer_routes_refuse_what_they_cannot_answer_by_name(server, monkeypatch):
    reply = httpx.post(server.url + "/detokenize", json={"tokens": [5, 10**6]})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "tokens"
    reply = httpx.post(server.url + "/tokenize", json={"model": "nope", "prompt": "x"})
    assert reply.status_code == 404 and reply.json()["error"]["param"] == "model"
    monkeypatch.setattr(server.app.state.models["chat"], "tokenizer_digest", "another tokenizer")
    reply = httpx.get(server.url + "/tokenizer_info")
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "model" and "base, chat" in reply.text


def test_the_harness_loglikelihood_request_scores_continuations_like_the_model(server, base_model):
    """lm-evaluation-harness's `local-completions` scores (context, continuation) pairs with one request:
    token-id prompts, echo, max_tokens 1, logprobs 1, temperature 0; it reads token_logprobs and top_logprobs
    from the context's end (dropping the generated token). Here on a tiny task: which continuation is likelier."""
    model, tokenizer = base_model
    task = [
        ("The capital of France is", " Paris"),
        ("The capital of France is", " a river"),
        ("Once upon a time", " there was"),
    ]
    pairs = [
        (tokenizer.document_prompt(context), tokenizer.encode_text(continuation)) for context, continuation in task
    ]
    body = {
        "model": "base",
        "prompt": [context + continuation for context, continuation in pairs],
        "max_tokens": 1,
        "temperature": 0,
        "logprobs": 1,
        "echo": True,
        "seed": 1234,
    }
    reply = post(server, "/v1/completions", json.dumps(body))
    assert reply.status_code == 200, reply.text
    choices = sorted(reply.json()["choices"], key=lambda choice: choice["index"])
    for (context, continuation), choice in zip(pairs, choices):
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(context) + len(continuation) + 1  # the prompt, then one new token
        assert logprobs["token_logprobs"][0] is None
        scored = logprobs["token_logprobs"][len(context) : -1]
        tops = logprobs["top_logprobs"][len(context) : -1]
        expected, position_logprobs = model_logprobs(model, context + continuation)
        assert sum(scored) == pytest.approx(sum(expected[len(context) - 1 :]), abs=0.1)
        model_greedy = all(
            int(position_logprobs[len(context) - 1 + i].argmax()) == token for i, token in enumerate(continuation)
        )
        reply_greedy = all(
            max(top, key=top.get) == token for top, token in zip(tops, logprobs["tokens"][len(context) : -1])
        )
        assert reply_greedy == model_greedy


def test_echo_with_max_tokens_0_scores_the_prompt_only(server):
    body = {"model": "base", "prompt": "A quiet river", "max_tokens": 0, "echo": True, "logprobs": 0}
    reply = post(server, "/v1/completions", json.dumps(body)).json()
    choice = reply["choices"][0]
    assert choice["text"] == "A quiet river" and reply["usage"]["completion_tokens"] == 0
    assert choice["logprobs"]["token_logprobs"][0] is None
    assert all(value < 0 for value in choice["logprobs"]["token_logprobs"][1:])
    refused = post(server, "/v1/completions", json.dumps({**body, "echo": False}))
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"


def test_chat_logprobs_come_in_the_chat_format(client):
    reply = client.chat.completions.create(
        model="chat",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = reply.choices[0].logprobs.content
    assert "".join(entry.token for entry in content) == reply.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob == entry.logprob
        assert bytes(entry.bytes).decode("utf-8", "replace")


def test_stream_options_include_usage_ends_with_a_usage_chunk(client):
    chunks = list(
        client.completions.create(
            model="base",
            prompt="Rivers",
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"min_tokens": 5},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(chunk.usage is None for chunk in chunks[:-1])


@pytest.mark.parametrize(
    "field, value",
    [
        ("best_of", 3),
        ("suffix", "end"),
        ("logit_bias", {"5": 10}),
        ("frequency_penalty", 0.5),
        ("presence_penalty", -1),
        ("response_format", {"type": "json_object"}),
    ],
)
def test_fields_we_do_not_implement_are_refused_by_name(server, field, value):
    response = post(server, "/v1/completions", json.dumps({"model": "base", "prompt": "x", field: value}))
    assert response.status_code == 400
    assert response.json()["error"]["param"] == field and field in response.json()["error"]["message"]


def test_neutral_values_of_unimplemented_fields_are_accepted(server):
    body = {
        "model": "base",
        "prompt": "x",
        "max_tokens": 2,
        "best_of": 1,
        "logit_bias": {},
        "frequency_penalty": 0,
        "presence_penalty": 0.0,
        "suffix": None,
        "user": "someone",
    }
    assert post(server, "/v1/completions", json.dumps(body)).status_code == 200
    chat = {
        "model": "chat",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2,
        "tools": [],
        "response_format": {"type": "text"},
        "parallel_tool_calls": False,
    }
    assert post(server, "/v1/chat/completions", json.dumps(chat)).status_code == 200


def test_a_system_message_is_refused_not_dropped(server):
    body = {
        "model": "chat",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    }
    response = post(server, "/v1/chat/completions", json.dumps(body))
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages.0.role"


@pytest.mark.parametrize("streams", [1, PIPELINE_FROM + 2])
def test_a_long_prompt_is_prefilled_a_chunk_between_two_decode_steps(server, monkeypatch, streams):
    """The README's promise: a long prompt delays the others' next token by one chunk at most, whether the
    batch steps whole or (PIPELINE_FROM requests and more) in halves. The model's passes are recorded (prefill
    chunks go through the model, decode steps through the decode kernel, with the cache rows they step) while
    generations decode and a long prompt arrives."""
    from serve.engine import PREFILL_CHUNK

    engine = server.app.state.models["base"].engine
    # Decoding slowed so that it outlasts the long prompt's arrival however fast this machine decodes.
    passes, forward, decoder = [], engine.model.forward, slowed(engine.decoder, 0.005)
    monkeypatch.setattr(
        engine.model,
        "forward",
        lambda tokens, **kwargs: passes.append(("chunk", tokens.shape[1])) or forward(tokens, **kwargs),
    )
    monkeypatch.setattr(engine, "decoder", lambda *step: passes.append(("step", tuple(step[1]))) or decoder(*step))
    decoding = {"model": "base", "prompt": "Rivers", "max_tokens": 120, "min_tokens": 120, "temperature": 0}
    long_prompt = {"model": "base", "prompt": list(range(10, 120)), "max_tokens": 1}  # 110 token ids: 4 chunks

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            background = asyncio.gather(*(client.post("/v1/completions", json=decoding) for _ in range(streams)))
            deadline = time.monotonic() + 30
            while engine.in_flight() < streams or engine._prefilling:
                assert time.monotonic() < deadline, "the decoding requests never were all in the batch at once"
                await asyncio.sleep(0.01)
            scored = await client.post("/v1/completions", json=long_prompt)
            assert [reply.status_code for reply in await background] == [200] * streams
            return scored

    scored = asyncio.run(run())
    assert scored.status_code == 200 and scored.json()["usage"]["prompt_tokens"] > 3 * PREFILL_CHUNK
    assert sum(kind == "chunk" and width > 1 for kind, width in passes) >= 4
    assert all(width <= PREFILL_CHUNK for kind, width in passes if kind == "chunk")
    chunks_since = {}  # cache row: chunks since its last decode step
    for kind, what in passes:
        if kind == "chunk":
            chunks_since = {row: count + 1 for row, count in chunks_since.items()}
        else:
            assert all(chunks_since.get(row, 0) <= 1 for row in what), "two chunks between two tokens of a request"
            chunks_since.update({row: 0 for row in what})
