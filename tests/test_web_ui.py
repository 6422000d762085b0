"""The web UI in a real headless browser (Debian's chromium + chromedriver; skipped where absent)."""

import io

import pytest
from PIL import Image

from tests.browser import CHROMEDRIVER, CHROMIUM, headless_chromium
from tests.server import RunningServer

pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver")


@pytest.fixture(scope="module")
def page(tmp_path_factory, tiny_exports):
    with RunningServer(tiny_exports()) as server:
        browser = headless_chromium(tmp_path_factory.mktemp("ui") / "profile")
        try:
            browser.get(server.url + "/")
            WebDriverWait(browser, 20).until(lambda b: len(Select(b.find_element(By.ID, "model")).options) == 2)
            yield browser
        finally:
            browser.quit()


def send(browser, text):
    box = browser.find_element(By.ID, "input")
    box.clear()
    box.send_keys(text)
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 30).until(
        lambda b: b.find_element(By.ID, "send").is_enabled() and b.find_elements(By.CSS_SELECTOR, ".output")
    )


def test_page_lists_the_models_and_shows_the_reference_controls(page):
    names = [option.get_attribute("value") for option in Select(page.find_element(By.ID, "model")).options]
    assert names == ["base", "chat"]
    for control in ("temperature", "min-tokens", "max-tokens", "top-p"):
        assert page.find_element(By.ID, control).is_displayed()
    assert "parameters" in page.find_element(By.ID, "model-info").text


def test_base_model_completes_a_prompt(page):
    Select(page.find_element(By.ID, "model")).select_by_value("base")
    page.find_element(By.ID, "min-tokens").clear()
    page.find_element(By.ID, "min-tokens").send_keys("5")
    send(page, "The capital of France is")
    turn = page.find_elements(By.CSS_SELECTOR, ".turn.completion")[-1]
    assert turn.find_element(By.CSS_SELECTOR, ".prompt").text == "The capital of France is"
    assert turn.find_element(By.CSS_SELECTOR, ".output").text.strip()
    assert page.find_element(By.ID, "error").text == ""


def test_chat_model_keeps_a_multi_turn_conversation(page):
    Select(page.find_element(By.ID, "model")).select_by_value("chat")
    for control, value in (("min-tokens", "3"), ("max-tokens", "20")):
        page.find_element(By.ID, control).clear()
        page.find_element(By.ID, control).send_keys(value)
    send(page, "Hello")
    send(page, "What is your name?")
    users = [turn.text for turn in page.find_elements(By.CSS_SELECTOR, ".turn.user")]
    assert users == ["Hello", "What is your name?"]
    replies = page.find_elements(By.CSS_SELECTOR, ".turn.assistant")
    assert len(replies) == 2 and all(reply.text.strip() for reply in replies)
    assert page.find_element(By.ID, "error").text == ""


def test_a_rejected_request_shows_the_error(page):
    Select(page.find_element(By.ID, "model")).select_by_value("base")
    page.find_element(By.ID, "max-tokens").clear()
    page.find_element(By.ID, "max-tokens").send_keys("100000")
    box = page.find_element(By.ID, "input")
    box.send_keys("Hello")
    page.find_element(By.ID, "send").click()
    WebDriverWait(page, 20).until(lambda b: b.find_element(By.ID, "error").text)
    assert "max_tokens" in page.find_element(By.ID, "error").text


def test_a_ten_turn_chat_keeps_going_past_the_context(page, tmp_path):
    """The tiny chat model has a context of 128 tokens: by the third turn the conversation no longer fits, and
    the page leaves out the oldest turns (and says so) instead of failing every turn from then on."""
    Select(page.find_element(By.ID, "model")).select_by_value("chat")
    page.find_element(By.ID, "clear").click()
    for control, value in (("min-tokens", "3"), ("max-tokens", "40")):
        page.find_element(By.ID, control).clear()
        page.find_element(By.ID, control).send_keys(value)
    questions = [f"Question number {i}: what do you think about the river and the old stone bridge?" for i in range(10)]
    for question in questions:
        send(page, question)
        assert page.find_element(By.ID, "error").text == ""
    assert [turn.text for turn in page.find_elements(By.CSS_SELECTOR, ".turn.user")] == questions
    assert len(page.find_elements(By.CSS_SELECTOR, ".turn.assistant")) == 10
    notes = [note.text for note in page.find_elements(By.CSS_SELECTOR, ".note")]
    assert notes and "no longer fit the model's context of 128 tokens" in notes[-1]
    # What the user sees: both kinds of bubble drawn, and the newest reply scrolled into view.
    last = page.find_elements(By.CSS_SELECTOR, ".turn.assistant")[-1]
    assert page.execute_script(
        "const r = arguments[0].getBoundingClientRect(); return r.bottom <= window.innerHeight && r.top >= 0;", last
    )
    screenshot = Image.open(io.BytesIO(page.get_screenshot_as_png())).convert("RGB")
    colors = {color for _, color in screenshot.getcolors(maxcolors=1 << 20)}
    assert (0xE4, 0xEC, 0xFF) in colors and (0xF1, 0xF1, 0xF1) in colors  # user and assistant bubbles


def test_a_failed_message_goes_back_into_the_box_and_greedy_is_offered(page):
    Select(page.find_element(By.ID, "model")).select_by_value("chat")
    page.find_element(By.ID, "clear").click()
    slider = page.find_element(By.ID, "temperature")
    page.execute_script("arguments[0].value = 0; arguments[0].dispatchEvent(new Event('input'));", slider)
    assert page.find_element(By.ID, "temperature-value").text == "0 (greedy)"
    assert slider.get_attribute("max") == "2"
    page.find_element(By.ID, "max-tokens").clear()
    page.find_element(By.ID, "max-tokens").send_keys("100000")  # refused whatever the history
    box = page.find_element(By.ID, "input")
    box.send_keys("Please keep this text")
    page.find_element(By.ID, "send").click()
    WebDriverWait(page, 20).until(lambda b: b.find_element(By.ID, "error").text)
    assert page.find_element(By.ID, "input").get_attribute("value") == "Please keep this text"
    assert page.find_elements(By.CSS_SELECTOR, ".turn.user.unsent")


CONTEXT = 128  # tests/tiny.py's make_exports: the sample profile's chat model has the same context
A_NEW_USERS_CHAT = [  # short to medium messages, one of them 34 words long (52 tokens of chat prompt alone)
    "Hello! How are you today?",
    "Can you tell me something about the river?",
    "I walked along the old stone bridge this morning and watched the brown water run under it while the town was "
    "still quiet; how long do you think a bridge like that can stand?",
    "What do you think about that?",
    "Tell me a short story about the town and its market.",
    "Thank you, goodbye!",
]


def reload(browser):
    """The page as a new user opens it: every setting at its default."""
    browser.refresh()
    WebDriverWait(browser, 20).until(lambda b: len(Select(b.find_element(By.ID, "model")).options) == 2)


def test_a_new_users_chat_on_the_default_settings_is_never_refused(page):
    """The issue's conversation on the page's defaults: a 128-token context takes every message (with fewer new
    tokens where the conversation leaves less room, and the oldest turns left out only when not one fits), the
    note about those turns shows once, and Max tokens is bounded by the context, not the server's 4096."""
    reload(page)
    Select(page.find_element(By.ID, "model")).select_by_value("chat")
    max_tokens = page.find_element(By.ID, "max-tokens")
    assert max_tokens.get_attribute("max") == str(CONTEXT)
    default = int(max_tokens.get_attribute("value"))
    assert 1 <= default <= CONTEXT // 2  # room left for the prompt
    assert page.find_element(By.ID, "temperature").get_attribute("value") == "0.8"  # the export's sampling
    for message in A_NEW_USERS_CHAT:
        send(page, message)
        assert page.find_element(By.ID, "error").text == ""
        assert not page.find_elements(By.CSS_SELECTOR, ".unsent")
    assert [turn.text for turn in page.find_elements(By.CSS_SELECTOR, ".turn.user")] == A_NEW_USERS_CHAT
    assert len(page.find_elements(By.CSS_SELECTOR, ".turn.assistant")) == len(A_NEW_USERS_CHAT)
    notes = [note.text for note in page.find_elements(By.CSS_SELECTOR, ".note")]
    assert len([note for note in notes if "no longer fit" in note]) <= 1
    for note in page.find_elements(By.CSS_SELECTOR, ".limit"):
        assert note.text.startswith(f"Max tokens lowered from {default} to ")
    # Over the bound: the page says what the bound is instead of sending a request the schema refuses.
    max_tokens.clear()
    max_tokens.send_keys("100000")
    page.find_element(By.ID, "input").send_keys("One more thing")
    page.find_element(By.ID, "send").click()
    WebDriverWait(page, 20).until(lambda b: b.find_element(By.ID, "error").text)
    error = page.find_element(By.ID, "error").text
    assert str(CONTEXT) in error and "4096" not in error
    assert page.find_element(By.ID, "input").get_attribute("value") == "One more thing"


def test_max_tokens_over_the_room_left_is_lowered_and_said_so(page):
    """Max tokens at the whole context leaves no room for any prompt: the page asks for what fits, for a chat
    and for a completion, and says so under the reply; choosing a model restores its defaults."""
    reload(page)
    for name, text in (("chat", "Hello there"), ("base", "The capital of France is")):
        Select(page.find_element(By.ID, "model")).select_by_value(name)
        page.find_element(By.ID, "max-tokens").clear()
        page.find_element(By.ID, "max-tokens").send_keys(str(CONTEXT))
        send(page, text)
        assert page.find_element(By.ID, "error").text == ""
        assert page.find_elements(By.CSS_SELECTOR, ".turn.assistant, .turn.completion")
        note = page.find_element(By.CSS_SELECTOR, ".limit").text
        assert note.startswith(f"Max tokens lowered from {CONTEXT} to ")
        lowered = int(note.split(" to ")[1].split()[0])
        prompt = int(note.split("the prompt takes ")[1].split()[0])
        assert lowered == CONTEXT - prompt and 0 < lowered < CONTEXT
    Select(page.find_element(By.ID, "model")).select_by_value("chat")
    assert int(page.find_element(By.ID, "max-tokens").get_attribute("value")) < CONTEXT
