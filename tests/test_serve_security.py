"""The server facing the internet: API key, CORS, bounded requests and queues, clients that leave
mid-generation, and model names that never become paths. Real server (uvicorn, loopback sockets)."""

import hmac
import json
import shutil
import socket
import threading
import time

import httpx
import pytest

from serve.__main__ import parse_args
from tests.browser import headless_chromium
from tests.server import RunningServer, slowed, wait_until

KEY = "s3cret-key"
AUTHORIZED = {"Authorization": f"Bearer {KEY}"}
LONG = 2000  # tokens: long enough to be seen cut short
COMPLETION = {"model": "base", "prompt": "Hello", "max_tokens": 4}
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def models_dir(tiny_exports):
    return tiny_exports(LONG + 48)


@pytest.fixture(scope="module")
def open_server(models_dir):
    with RunningServer(models_dir) as server:
        yield server


@pytest.fixture(scope="module")
def keyed_server(models_dir):
    with RunningServer(models_dir, api_key=KEY) as server:
        yield server


@pytest.fixture(scope="module")
def limited_server(models_dir):
    with RunningServer(models_dir, max_prompt_tokens=16, max_generation_seconds=0.3) as server:
        yield server


def assert_error(response, status, param=None, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code)
    return error


def data_lines(response):
    return (line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: "))


# API key


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {KEY}x"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": KEY},
    ],
)
def test_every_v1_endpoint_needs_the_api_key(keyed_server, headers):
    url = keyed_server.url
    for response in (
        httpx.get(url + "/v1/models", headers=headers),
        httpx.post(url + "/v1/completions", json=COMPLETION, headers=headers),
        httpx.post(url + "/v1/chat/completions", json=CHAT, headers=headers),
    ):
        assert_error(response, 401, code="invalid_api_key")


def test_the_right_key_opens_v1_while_health_and_the_page_stay_open(keyed_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=KEY, max_retries=0)
    assert sorted(model.id for model in client.models.list().data) == ["base", "chat"]
    assert client.completions.create(model="base", prompt="Hello", max_tokens=3).choices[0].finish_reason
    assert httpx.get(keyed_server.url + "/health").status_code == 200
    page = httpx.get(keyed_server.url + "/")
    assert page.status_code == 200 and 'id="api-key"' in page.text


def test_the_key_is_compared_in_constant_time(keyed_server, monkeypatch):
    compared = []
    constant_time = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda given, key: compared.append(key) or constant_time(given, key))
    assert httpx.get(keyed_server.url + "/v1/models", headers=AUTHORIZED).status_code == 200
    assert compared == [KEY.encode()]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.org"])
def test_a_public_address_needs_an_api_key(host, monkeypatch, capsys):
    monkeypatch.delenv("GPT_SERVE_API_KEY", raising=False)
    with pytest.raises(SystemExit) as refused:
        parse_args(["--host", host])
    assert refused.value.code == 2
    assert f"--host {host} is reachable from other machines: give an API key" in capsys.readouterr().err
    assert parse_args(["--host", host, "--api-key", KEY]).api_key == KEY
    monkeypatch.setenv("GPT_SERVE_API_KEY", KEY)
    assert parse_args(["--host", host]).api_key == KEY


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_needs_no_key(host, monkeypatch):
    monkeypatch.delenv("GPT_SERVE_API_KEY", raising=False)
    assert parse_args(["--host", host]).api_key is None


# CORS


def test_cors_is_closed_by_default(open_server):
    origin = {"Origin": "https://elsewhere.example"}
    reply = httpx.post(open_server.url + "/v1/completions", json=COMPLETION, headers=origin)
    assert reply.status_code == 200 and "access-control-allow-origin" not in reply.headers
    preflight = httpx.options(
        open_server.url + "/v1/completions", headers={**origin, "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in preflight.headers


def test_a_cross_site_form_post_cannot_drive_the_api(open_server):
    # Any page may send a text/plain POST anywhere without a preflight; the API reads JSON bodies only.
    response = httpx.post(
        open_server.url + "/v1/completions",
        content=json.dumps(COMPLETION),
        headers={"Content-Type": "text/plain", "Origin": "https://elsewhere.example"},
    )
    assert_error(response, 400)


def test_a_cors_origin_lets_that_origin_in_and_no_other(models_dir):
    origin = "https://ui.example"
    with RunningServer(models_dir, api_key=KEY, cors_origins=[origin]) as server:
        preflight = httpx.options(
            server.url + "/v1/chat/completions",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == origin
        reply = httpx.get(server.url + "/v1/models", headers={**AUTHORIZED, "Origin": origin})
        assert reply.status_code == 200 and reply.headers["access-control-allow-origin"] == origin
        # A refusal carries the header too, so the page can show the error.
        refused = httpx.get(server.url + "/v1/models", headers={"Origin": origin})
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == origin
        other = httpx.get(server.url + "/v1/models", headers={**AUTHORIZED, "Origin": "https://elsewhere.example"})
        assert "access-control-allow-origin" not in other.headers


# Limits


def test_a_prompt_over_max_prompt_tokens_is_refused_naming_the_field(limited_server):
    url, long_text = limited_server.url, "many words " * 20
    assert httpx.post(url + "/v1/completions", json={**COMPLETION, "prompt": "Hello there"}).status_code == 200
    error = assert_error(
        httpx.post(url + "/v1/completions", json={**COMPLETION, "prompt": long_text}),
        400,
        "prompt",
        "context_length_exceeded",
    )
    assert "at most 16" in error["message"]
    assert_error(
        httpx.post(url + "/v1/completions", json={**COMPLETION, "prompt": ["Hi", long_text]}),
        400,
        "prompt.1",
        "context_length_exceeded",
    )
    messages = [{"role": "user", "content": long_text}]
    assert_error(
        httpx.post(url + "/v1/chat/completions", json={**CHAT, "messages": messages}),
        400,
        "messages",
        "context_length_exceeded",
    )


def test_a_text_far_over_the_limit_is_refused_before_it_is_tokenized(limited_server, monkeypatch):
    tokenizer = limited_server.app.state.models["base"].tokenizer
    tokenized = []
    monkeypatch.setattr(tokenizer, "document_prompt", lambda text: tokenized.append(text) or [0])
    response = httpx.post(limited_server.url + "/v1/completions", json={**COMPLETION, "prompt": "a" * 900_000})
    assert_error(response, 400, "prompt", "context_length_exceeded")
    assert tokenized == []


@pytest.mark.parametrize(
    "body, param",
    [
        ({**COMPLETION, "max_tokens": 4097}, "max_tokens"),
        ({**COMPLETION, "min_tokens": 5000}, "min_tokens"),
        ({**COMPLETION, "prompt": ["x"] * 17}, "prompt"),
        ({**COMPLETION, "stop": "x" * 65}, "stop"),
        ({**COMPLETION, "stop": ["ok", ""]}, "stop.1"),
        ({**COMPLETION, "seed": 2**64}, "seed"),
        ({**COMPLETION, "model": "m" * 257}, "model"),
        ({**COMPLETION, "prompt": "\ud800"}, "prompt"),
        ({**CHAT, "messages": [{"role": "user", "content": "\udfff"}]}, "messages.0.content"),
    ],
)
def test_bounds_of_the_schema_are_400s_naming_the_field(open_server, body, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    # json.dumps writes a lone surrogate as the escape "\ud800", which JSON allows and Python reads back.
    response = httpx.post(
        open_server.url + path, content=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    assert_error(response, 400, param)


def test_a_tiny_temperature_decodes_greedily_instead_of_overflowing(open_server):
    greedy = httpx.post(open_server.url + "/v1/completions", json={**COMPLETION, "temperature": 0}).json()
    tiny = httpx.post(open_server.url + "/v1/completions", json={**COMPLETION, "temperature": 1e-300}).json()
    assert tiny["choices"][0]["text"] == greedy["choices"][0]["text"]
    assert httpx.post(open_server.url + "/v1/completions", json=COMPLETION).status_code == 200  # engine still up


def test_a_generation_over_the_time_limit_ends_with_length(limited_server):
    body = {**COMPLETION, "max_tokens": LONG, "min_tokens": LONG}
    reply = httpx.post(limited_server.url + "/v1/completions", json=body, timeout=30).json()
    assert reply["choices"][0]["finish_reason"] == "length"
    assert 0 < reply["usage"]["completion_tokens"] < LONG


def test_a_stream_over_the_time_limit_ends_with_length_and_done(limited_server):
    body = {**CHAT, "max_tokens": LONG, "min_tokens": LONG, "stream": True}
    with httpx.stream("POST", limited_server.url + "/v1/chat/completions", json=body, timeout=30) as response:
        events = list(data_lines(response))
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert len(events) < LONG


def test_a_full_queue_gets_429_and_frees_up_when_its_requests_go(models_dir):
    with RunningServer(models_dir, max_batch=1, max_queue=8) as server:
        engine = server.app.state.models["base"].engine
        body = {**COMPLETION, "max_tokens": LONG, "min_tokens": LONG, "n": 8, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as response:
            events = data_lines(response)  # (dropping this iterator would close the connection)
            next(events)
            assert engine.pending() == 7  # one generation decodes (max_batch 1), seven wait
            assert_error(
                httpx.post(server.url + "/v1/completions", json={**COMPLETION, "n": 2}), 429, code="queue_full"
            )
        # The stream closed: its generations are cancelled, and no longer count against the queue.
        wait_until(lambda: engine.pending() == 0 and not engine.in_flight())
        assert httpx.post(server.url + "/v1/completions", json={**COMPLETION, "n": 2}).status_code == 200


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_model_whose_decoding_thread_died_answers_503_and_fails_health(models_dir):
    with RunningServer(models_dir) as server:
        engine = server.app.state.models["chat"].engine
        # A failing step is survived (test_serve.py); what the step handler cannot catch ends the thread.
        engine._admit = lambda: (_ for _ in ()).throw(SystemExit("injected: the decoding thread ends"))
        with pytest.raises(httpx.ReadTimeout):  # nobody is left to answer it
            httpx.post(server.url + "/v1/chat/completions", json=CHAT, timeout=httpx.Timeout(10, read=0.5))
        wait_until(lambda: not engine.alive)
        health = httpx.get(server.url + "/health")
        assert health.status_code == 503 and health.json() == {"status": "error", "models": ["base"]}
        assert_error(httpx.post(server.url + "/v1/chat/completions", json=CHAT), 503, code="model_down")
        assert httpx.post(server.url + "/v1/completions", json=COMPLETION).status_code == 200


# Clients that leave


def recorded_submissions(engine, monkeypatch):
    """The engine's Generations, as they are submitted."""
    submitted, submit = [], engine.submit
    monkeypatch.setattr(
        engine, "submit", lambda *args, **kwargs: submitted.append(submit(*args, **kwargs)) or submitted[-1]
    )
    return submitted


def test_a_client_that_leaves_mid_stream_stops_its_generation(open_server, monkeypatch):
    engine = open_server.app.state.models["base"].engine
    submitted = recorded_submissions(engine, monkeypatch)
    body = {**COMPLETION, "max_tokens": LONG, "min_tokens": LONG, "stream": True}
    with httpx.stream("POST", open_server.url + "/v1/completions", json=body, timeout=30) as response:
        events = data_lines(response)
        next(events), next(events)
        generation = submitted[0]
    # Leaving the block closed the connection after two chunks.
    wait_until(lambda: not engine.in_flight(), 2)
    assert generation.finish_reason == "cancelled" and len(generation.new_ids) < LONG


def test_a_client_that_leaves_before_the_reply_stops_its_generation(open_server, monkeypatch):
    engine = open_server.app.state.models["base"].engine
    submitted = recorded_submissions(engine, monkeypatch)
    monkeypatch.setattr(engine, "decoder", slowed(engine.decoder, 0.001))  # LONG tokens: over 2 s
    body = {**COMPLETION, "max_tokens": LONG, "min_tokens": LONG}
    outcome = []

    def impatient_client():
        try:
            httpx.post(open_server.url + "/v1/completions", json=body, timeout=httpx.Timeout(10, read=0.5))
        except httpx.ReadTimeout as gave_up:
            outcome.append(gave_up)

    client = threading.Thread(target=impatient_client)
    client.start()
    generation = wait_until(lambda: submitted and submitted[0])
    client.join()
    assert outcome, "the client should have timed out"
    wait_until(lambda: not engine.in_flight(), 2)
    assert generation.finish_reason == "cancelled" and len(generation.new_ids) < LONG


# Model names are not paths


@pytest.fixture(scope="module")
def linked_server(models_dir, tmp_path_factory):
    """Models dir (itself reached through a symlink) with `base`, `alias -> base` (inside: served) and
    `escape -> ../outside/chat` (outside: skipped)."""
    root = tmp_path_factory.mktemp("linked")
    shutil.copytree(models_dir / "base", root / "models" / "base")
    shutil.copytree(models_dir / "chat", root / "outside" / "chat")
    (root / "models" / "alias").symlink_to("base")
    (root / "models" / "escape").symlink_to(root / "outside" / "chat")
    (root / "models-link").symlink_to(root / "models")
    with RunningServer(root / "models-link") as server:
        server.root = root
        yield server


def test_a_model_folder_linking_outside_the_models_dir_is_not_loaded(linked_server):
    assert httpx.get(linked_server.url + "/health").json()["models"] == ["alias", "base"]


@pytest.mark.parametrize(
    "name",
    [
        "escape",
        "outside",
        "../outside/chat",
        "models/../outside/chat",
        "..",
        ".",
        "",
        "base/",
        "./base",
        "base/.",
        "BASE",
        "base\x00",
        "%2e%2e%2foutside%2fchat",
        "..%2Foutside%2Fchat",
        "base%2F..%2F..%2Foutside%2Fchat",
        "/etc/passwd",
    ],
)
def test_model_names_never_reach_a_path(linked_server, name):
    response = httpx.post(linked_server.url + "/v1/completions", json={**COMPLETION, "model": name})
    error = assert_error(response, 404, "model", "model_not_found")
    assert str(linked_server.root) not in error["message"]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/..%2F..%2Fetc%2Fpasswd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/static/..%2Fapp.py",
        "/index.html/..%2F..%2Fapp.py",
        "/v1/..%2Fhealth",
    ],
)
def test_url_paths_reach_no_file(linked_server, path):
    response = httpx.get(linked_server.url + path)
    assert_error(response, 404)


# The web UI with a key


def test_the_web_ui_sends_the_api_key_it_keeps(keyed_server, tmp_path):
    browser = headless_chromium(tmp_path / "profile")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    try:
        wait = WebDriverWait(browser, 20)
        browser.get(keyed_server.url + "/")
        wait.until(lambda b: "API key" in b.find_element(By.ID, "error").text)  # the listing was refused
        browser.find_element(By.ID, "api-key").send_keys(KEY)
        browser.find_element(By.ID, "input").click()  # leaving the field commits the key
        wait.until(lambda b: len(Select(b.find_element(By.ID, "model")).options) == 2)
        Select(browser.find_element(By.ID, "model")).select_by_value("base")
        browser.find_element(By.ID, "input").send_keys("The capital of France is")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda b: b.find_element(By.ID, "send").is_enabled() and b.find_elements(By.CSS_SELECTOR, ".output"))
        assert browser.find_element(By.ID, "error").text == ""
        browser.refresh()  # the key was kept in localStorage
        wait.until(lambda b: len(Select(b.find_element(By.ID, "model")).options) == 2)
        assert browser.find_element(By.ID, "api-key").get_attribute("value") == KEY
    finally:
        browser.quit()


# Hostile and careless clients


def raw_exchange(server, data, wait=2.0):
    """Sends raw bytes on a fresh connection; returns what the server sent back within `wait` seconds and
    whether it closed the connection."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as connection:
        connection.sendall(data)
        received = b""
        try:
            while chunk := connection.recv(65536):
                received += chunk
        except socket.timeout:
            return received, False
        return received, True


def test_a_connection_that_sends_no_request_head_is_closed(models_dir):
    with RunningServer(models_dir, limits={"header_seconds": 0.5}) as server:
        for data in (b"", b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"):  # nothing; half a head
            started = time.monotonic()
            received, closed = raw_exchange(server, data, wait=3)
            assert closed and received == b"" and time.monotonic() - started < 2.5


def test_a_body_that_does_not_arrive_in_time_gets_408(models_dir):
    with RunningServer(models_dir, body_seconds=0.5) as server:
        head = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        received, _ = raw_exchange(server, head + b'Content-Length: 100\r\n\r\n{"model":', wait=3)
        assert received.startswith(b"HTTP/1.1 408") and b'"error"' in received


def test_a_body_declared_over_the_limit_gets_413_before_it_is_sent(open_server):
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Expect: 100-continue\r\nContent-Length: 5000000\r\n\r\n"
    )
    received, _ = raw_exchange(open_server, head, wait=2)
    assert received.startswith(b"HTTP/1.1 413") and b"100 Continue" not in received
    assert json.loads(received.split(b"\r\n\r\n", 1)[1])["error"]["message"]


def test_connections_over_the_limit_are_refused(models_dir):
    """--max-connections N serves N connections at once, and refuses the next."""
    with RunningServer(models_dir, limits={"max_connections": 3}) as server:
        host, port = server.url.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port))) for _ in range(2)]
        try:
            time.sleep(0.2)
            assert httpx.get(server.url + "/health").status_code == 200  # the third
            idle.append(socket.create_connection((host, int(port))))
            time.sleep(0.2)
            assert httpx.get(server.url + "/health").status_code == 503
        finally:
            for connection in idle:
                connection.close()
        wait_until(lambda: httpx.get(server.url + "/health").status_code == 200)


def test_a_malformed_request_gets_a_json_error(open_server):
    received, closed = raw_exchange(open_server, b"NOT HTTP AT ALL\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 400") and closed
    assert json.loads(received.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "invalid_http"


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "127.0.0.1.evil.example", "[::2]:8080"])
def test_a_loopback_server_answers_only_to_loopback_host_names(open_server, host):
    response = httpx.get(open_server.url + "/v1/models", headers={"Host": host})
    assert_error(response, 400, code="invalid_host")
    redirect = httpx.get(open_server.url + "/v1/models/", headers={"Host": host})
    assert "evil" not in redirect.headers.get("location", "")


@pytest.mark.parametrize("host", ["localhost", "localhost:8080", "127.0.0.1:1234", "[::1]:8080"])
def test_loopback_host_names_are_answered(open_server, host):
    assert httpx.get(open_server.url + "/v1/models", headers={"Host": host}).status_code == 200


def test_allowed_hosts_come_from_the_command_line():
    from serve.__main__ import allowed_hosts

    assert allowed_hosts(parse_args([])) == ["localhost", "127.0.0.1", "::1"]
    assert "api.example.org" in allowed_hosts(parse_args(["--allowed-host", "api.example.org"]))
    assert allowed_hosts(parse_args(["--host", "0.0.0.0", "--api-key", KEY])) is None


@pytest.mark.parametrize("path", ["/openapi.json", "/docs", "/redoc"])
def test_the_api_docs_need_the_key_when_there_is_one(keyed_server, open_server, path):
    assert_error(httpx.get(keyed_server.url + path), 401, code="invalid_api_key")
    assert httpx.get(keyed_server.url + path, headers=AUTHORIZED).status_code == 200
    assert httpx.get(open_server.url + path).status_code == 200


def test_a_refused_cors_preflight_is_a_json_error(models_dir):
    with RunningServer(models_dir, api_key=KEY, cors_origins=["https://good.example"]) as server:
        response = httpx.options(
            server.url + "/v1/models",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
        )
        assert_error(response, 400, code="cors_refused")


def test_thousands_of_messages_are_refused_before_any_tokenizing(open_server, monkeypatch):
    hosted = open_server.app.state.models["chat"]
    monkeypatch.setattr(hosted.tokenizer, "chat_prompt", lambda turns: pytest.fail("tokenized"))
    body = {"model": "chat", "messages": [{"role": "user", "content": ""}] * 28001}
    assert_error(httpx.post(open_server.url + "/v1/chat/completions", json=body), 400, "messages")


def test_prompts_are_tokenized_off_the_event_loop(open_server, monkeypatch):
    hosted = open_server.app.state.models["chat"]
    encode, threads = hosted.tokenizer.chat_prompt, []
    monkeypatch.setattr(
        hosted.tokenizer, "chat_prompt", lambda turns: threads.append(threading.current_thread()) or encode(turns)
    )
    assert httpx.post(open_server.url + "/v1/chat/completions", json=CHAT).status_code == 200
    assert threads and threads[0] is not threading.main_thread() and "asyncio" in threads[0].name


@pytest.mark.parametrize(
    "flag",
    [
        ["--max-batch", "0"],
        ["--max-batch", "-1"],
        ["--max-connections", "0"],
        ["--header-seconds", "nan"],
        ["--body-seconds", "-1"],
    ],
)
def test_bad_flags_are_refused_naming_them(flag, capsys):
    with pytest.raises(SystemExit):
        parse_args(flag)
    assert flag[0] in capsys.readouterr().err


def test_model_files_that_link_out_of_the_models_dir_or_nowhere_are_not_loaded(models_dir, tmp_path, caplog):
    root = tmp_path / "models"
    for name in ("base", "linked", "dangling"):
        shutil.copytree(models_dir / "base", root / name)
    outside = tmp_path / "outside.safetensors"
    shutil.move(root / "linked" / "model.safetensors", outside)
    (root / "linked" / "model.safetensors").symlink_to(outside)
    (root / "dangling" / "extra.json").symlink_to(tmp_path / "missing.json")
    with RunningServer(root) as server:
        assert httpx.get(server.url + "/health").json()["models"] == ["base"]
    assert "linked" in caplog.text and "outside" in caplog.text and "dangling" in caplog.text


def test_requests_whose_client_left_stop_counting_against_the_queue_at_once(models_dir):
    """One long generation holds the only batch slot; seven streamed ones wait. Their client leaves: the queue
    frees at once, while the slot is still busy, so a new request is taken instead of getting a 429."""
    with RunningServer(models_dir, max_batch=1, max_queue=8) as server:
        engine = server.app.state.models["base"].engine
        long_body = {**COMPLETION, "max_tokens": LONG, "min_tokens": LONG}
        holder = threading.Thread(
            target=httpx.post, args=(server.url + "/v1/completions",), kwargs={"json": long_body, "timeout": 60}
        )
        holder.start()
        wait_until(lambda: engine.in_flight() == 1)
        with httpx.stream(
            "POST", server.url + "/v1/completions", json={**COMPLETION, "n": 7, "stream": True}, timeout=30
        ) as response:
            assert response.status_code == 200
            wait_until(lambda: engine.pending() == 7)
        wait_until(lambda: engine.pending() == 0)
        assert engine.in_flight() == 1  # the long generation still holds the slot
        waiting = threading.Thread(
            target=httpx.post,
            args=(server.url + "/v1/completions",),
            kwargs={"json": {**COMPLETION, "n": 8}, "timeout": 60},
        )
        accepted = []
        submit = engine.submit
        engine.submit = lambda *args, **kwargs: accepted.append(1) or submit(*args, **kwargs)
        waiting.start()
        wait_until(lambda: len(accepted) == 8)
        holder.join()
        waiting.join()
