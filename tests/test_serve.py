"""The server speaks the OpenAI API: driven with the official `openai` client and raw HTTP."""

import json

import httpx
import pytest

from serve.app import create_app
from tests.server import RunningServer
from tests.tiny import make_exports, make_tokenizer

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    tokenizer_path, tokenizer = make_tokenizer(folder)
    make_exports(folder / "models", tokenizer_path, tokenizer.vocab_size)
    (folder / "models" / "broken").mkdir()
    (folder / "models" / "broken" / "config.json").write_text("{not json")
    with RunningServer(folder / "models") as running:
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


def test_health(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "models": ["base", "chat"]}


def test_completion_returns_text_usage_and_finish_reason(client):
    reply = client.completions.create(model="base", prompt="The capital of France is", max_tokens=12,
                                      temperature=0, extra_body={"min_tokens": 12})
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and choice.text
    assert reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12


def test_temperature_zero_is_greedy_and_repeatable(client):
    texts = {client.completions.create(model="base", prompt="Hello", max_tokens=10, temperature=0).choices[0].text
             for _ in range(3)}
    assert len(texts) == 1


def test_same_seed_same_output_and_different_seeds_differ(client):
    def sample(seed):
        return client.completions.create(model="base", prompt="Once", max_tokens=24, temperature=1.0, seed=seed,
                                         extra_body={"min_tokens": 24}).choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in range(4)}) > 1


def test_n_and_prompt_list_give_one_choice_each(client):
    reply = client.completions.create(model="base", prompt=["One", "Two"], n=2, max_tokens=4, seed=1)
    assert sorted(choice.index for choice in reply.choices) == [0, 1, 2, 3]


def test_stop_string_ends_the_text_before_it(client):
    free = client.completions.create(model="base", prompt="Hello", max_tokens=30, temperature=0,
                                     extra_body={"min_tokens": 30}).choices[0].text
    stop = free[5:8]
    reply = client.completions.create(model="base", prompt="Hello", max_tokens=30, temperature=0, stop=[stop],
                                      extra_body={"min_tokens": 30})
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].text == free[: free.index(stop)]


def test_streamed_completion_equals_the_whole_reply(client):
    whole = client.completions.create(model="base", prompt="Rivers", max_tokens=20, temperature=0).choices[0].text
    chunks = list(client.completions.create(model="base", prompt="Rivers", max_tokens=20, temperature=0, stream=True))
    assert len(chunks) > 1
    assert "".join(chunk.choices[0].text for chunk in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_chat_multi_turn_and_streaming(client):
    messages = [{"role": "user", "content": "Hi, how are you?"}, {"role": "assistant", "content": "Fine, thanks."},
                {"role": "user", "content": "What is your name?"}]
    reply = client.chat.completions.create(model="chat", messages=messages, max_tokens=20, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert "\n" not in reply.choices[0].message.content
    stream = client.chat.completions.create(model="chat", messages=messages, max_tokens=20, temperature=0,
                                            stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert text == reply.choices[0].message.content


def test_chat_on_a_base_model_is_refused(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": "Hi"}])
    assert error.value.body["param"] == "model"


@pytest.mark.parametrize("body, param", [
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
])
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
