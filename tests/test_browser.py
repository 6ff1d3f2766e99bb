"""The chat page at /, in a real headless Chromium (Debian's /usr/bin/chromium) driven by Playwright.

Against the session's API and worker with the embedded model, and against extra APIs for a full
queue and for API keys. Every wait has a deadline; nothing sleeps for a fixed time. Chromium is
installed by `make test` (apt); a missing one is a failure, never a skip. `playwright install`
(Playwright's own browser download) is never used.
"""

import json
import os
import re
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from playwright.sync_api import Browser, Locator, Page, Route, expect, sync_playwright

from app.limits import QUEUE_FULL_RETRY_AFTER_S
from core.protocol import GenerationResult, MemoryStats, TaskStatus, Timings, Usage
from core.store import TaskStore
from tests.conftest import ROOT
from tests.extra_api import extra_api
from tests.helpers import submit

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
DESKTOP = {"width": 1000, "height": 700}
PHONE = {"width": 375, "height": 740}
# The tracked screenshot is rewritten only when asked (UPDATE_SCREENSHOT=1), so a test run leaves
# the work tree clean; otherwise it goes to the test's own folder and is checked there.
SCREENSHOT = ROOT / "docs" / "screenshot.png"
# Generous: another test run may share the two cores.
UI_TIMEOUT_MS = 30_000
ANSWER_TIMEOUT_MS = 240_000
KEY = "page-key-" + uuid.uuid4().hex

LAST_ANSWER = "() => [...document.querySelectorAll('article.assistant')].pop()"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One Chromium for the module; each test gets a fresh context (its own empty localStorage)."""
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium)"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A page at desktop size; a script error, or anything its Content-Security-Policy refused, fails the test."""
    context = browser.new_context(viewport=DESKTOP)
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: "Content Security Policy" in message.text and errors.append(message.text))
    yield page
    context.close()
    assert not errors, f"errors on the page: {errors}"


def open_page(page: Page, url: str) -> None:
    page.goto(url)
    expect(page.locator("#server-state")).not_to_be_empty()


def configure(page: Page, temperature: str, max_tokens: str, system_prompt: str | None = None) -> None:
    if page.locator("#settings").get_attribute("open") is None:
        page.click("#settings summary")
    page.fill("#temperature", temperature)
    page.fill("#max-tokens", max_tokens)
    if system_prompt is not None:
        page.fill("#system-prompt", system_prompt)


def ask(page: Page, text: str) -> None:
    page.fill("#message", text)
    page.click("#send")


def last_answer(page: Page) -> Locator:
    return page.locator("article.assistant").last


def answer_text(page: Page) -> str:
    return last_answer(page).locator(".text").text_content() or ""


def text_while_running(page: Page, longer_than: str = "") -> str:
    """The last answer's text, read while it is still being written, once it is longer than `longer_than`."""
    handle = page.wait_for_function(
        f"""(before) => {{
            const answer = ({LAST_ANSWER})();
            if (!answer || answer.dataset.status !== 'running') return false;
            const text = answer.querySelector('.text').textContent;
            return text.length > before.length ? text : false;
        }}""",
        arg=longer_than,
        timeout=ANSWER_TIMEOUT_MS,
        polling="raf",
    )
    return handle.json_value()


def wait_finished(page: Page, status: str = "succeeded") -> Locator:
    answer = last_answer(page)
    expect(answer).to_have_attribute("data-status", status, timeout=ANSWER_TIMEOUT_MS)
    return answer


def server_view(client: httpx.Client, answer: Locator) -> dict:
    task_id = answer.get_attribute("data-task-id")
    assert task_id, "the answer names its task"
    response = client.get(f"/task/{task_id}")
    assert response.status_code == 200, response.text
    return response.json()


def test_an_answer_streams_in_then_shows_its_stats(page: Page, client: httpx.Client, api_url: str) -> None:
    open_page(page, api_url)
    expect(page.locator("#server-state")).to_have_text("Ready")
    expect(page.locator("#key-panel")).to_be_hidden()  # an open server asks for no key
    # Long enough to be seen twice while it runs, even when a loaded API hands the page several chunks at once.
    configure(page, temperature="0", max_tokens="200")
    ask(page, "Write a long story about the sea.")

    first = text_while_running(page)
    second = text_while_running(page, longer_than=first)
    assert second.startswith(first) and len(second) > len(first), (first, second)

    answer = wait_finished(page)
    view = server_view(client, answer)
    assert answer.locator(".text").text_content() == view["text"]
    assert view["text"].startswith(second)
    stats = answer.locator(".stats")
    expect(stats.locator("[data-stat=tokens]")).to_have_text(f"{view['usage']['completion_tokens']} tokens")
    expect(stats.locator("[data-stat=speed]")).to_have_text(re.compile(r"^\d+\.\d tok/s$"))
    expect(stats.locator("[data-stat=first-token]")).to_have_text(re.compile(r"^\d+\.\d+ s to first token$"))
    expect(stats.locator("[data-stat=queued]")).to_have_text(re.compile(r"^\d+\.\d+ s queued$"))
    peak_mb = f"{round(view['memory']['peak_bytes'] / 1e6):,} MB peak"
    expect(stats.locator("[data-stat=memory]")).to_contain_text(peak_mb)
    expect(stats.locator("[data-stat=worker]")).to_have_text(f"answered by {view['worker']}")
    expect(page.locator("#stop")).to_be_hidden()
    expect(page.locator("#send")).to_be_enabled()


def test_stop_cancels_a_long_answer_and_keeps_its_text(page: Page, client: httpx.Client, api_url: str) -> None:
    open_page(page, api_url)
    configure(page, temperature="0", max_tokens="400")
    ask(page, "Write a long story about a dragon who learns to bake bread. Describe every day of its life.")
    text_while_running(page, longer_than="x" * 20)
    expect(page.locator("#stop")).to_be_visible()
    page.click("#stop")

    answer = wait_finished(page, "cancelled")
    expect(answer.locator(".state")).to_have_text("Stopped.")
    view = server_view(client, answer)
    assert view["status"] == TaskStatus.cancelled and view["finish_reason"] == "cancelled"
    assert view["usage"]["completion_tokens"] < 400
    assert answer.locator(".text").text_content() == view["text"]
    expect(page.locator("#stop")).to_be_hidden()


def test_a_reload_mid_answer_goes_on_with_the_same_answer(page: Page, client: httpx.Client, api_url: str) -> None:
    open_page(page, api_url)
    configure(page, temperature="0", max_tokens="150")
    question = "Write a long story about a lighthouse keeper and a storm."
    ask(page, question)
    before = text_while_running(page, longer_than="x" * 30)
    task_id = last_answer(page).get_attribute("data-task-id")

    page.reload()
    expect(last_answer(page)).to_have_attribute("data-task-id", task_id or "")
    continuing = text_while_running(page, longer_than=before)  # still being written, after the reload
    answer = wait_finished(page)
    after = answer.locator(".text").text_content() or ""

    assert continuing.startswith(before) and after.startswith(continuing)
    assert after == server_view(client, answer)["text"]
    expect(page.locator("article.user")).to_have_text([re.compile(re.escape(question))])


def finished_task(store: TaskStore, chunks: list[str]) -> str:
    """A task written straight into the store, as a worker would: its text is ours to choose."""
    task_id = str(uuid.uuid4())
    store.create(task_id)
    started = store.start(task_id, worker="celery@page-test", request="{}")
    assert started.attempt == 1
    for number, chunk in enumerate(chunks):
        assert store.append_chunk(task_id, started.attempt, number, chunk, []) is None  # None: appended, go on
    result = GenerationResult(
        text="".join(chunks),
        finish_reason="eos",
        usage=Usage(prompt_tokens=10, completion_tokens=12),
        timings=Timings(queued_s=0.1, time_to_first_token_s=0.2, generation_s=1.0, tokens_per_second=12.0, total_s=1.2),
        memory=MemoryStats(device="cpu", model_weight_bytes=166_000_000, peak_bytes=1_201_000_000),
        model="test-model",
        worker="celery@page-test",
    )
    assert store.finish(task_id, started.attempt, result)
    return task_id


@pytest.fixture
def store(api_url: str, stack_env: dict[str, str]) -> Iterator[TaskStore]:
    client = redis.Redis.from_url(stack_env["REDIS_URL"])
    yield TaskStore(client, ttl_s=600)
    client.close()


def reattach(page: Page, url: str, task_id: str, question: str) -> None:
    """Open the page as a reload would find it: a conversation and a running task in localStorage."""
    open_page(page, url)
    page.evaluate(
        """([taskId, question]) => {
            localStorage.setItem('chat.conversation', JSON.stringify([{role: 'user', content: question}]));
            localStorage.setItem('chat.running', JSON.stringify({task_id: taskId, cursor: '0-0'}));
        }""",
        [task_id, question],
    )
    page.reload()


def test_model_output_holding_html_is_shown_as_text(page: Page, store: TaskStore, api_url: str) -> None:
    """Rendered through the reattach path, on a task whose text we wrote; and at phone width."""
    html = '<b>bold</b> <script>window.pwned=1</script> <img src=x onerror="window.pwned=2"> & '
    long_word = "y" * 300  # must wrap, not widen the page
    task_id = finished_task(store, [f"Here: {html}", long_word])
    reattach(page, api_url, task_id, "Show me <i>HTML</i>")

    answer = wait_finished(page)
    text = answer.locator(".text")
    expect(text).to_have_text(f"Here: {html}{long_word}")
    expect(text).to_contain_text("<script>window.pwned=1</script>")
    assert text.locator("b, script, img").count() == 0
    expect(page.locator("article.user .text")).to_have_text("Show me <i>HTML</i>")
    assert page.evaluate("typeof window.pwned") == "undefined"
    expect(answer.locator("[data-stat=memory]")).to_contain_text("1,201 MB peak, weights 166 MB")

    page.set_viewport_size(PHONE)
    expect(page.locator("#send")).to_be_in_viewport()
    widths = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert widths[0] <= widths[1], f"horizontal scroll at phone width: {widths}"


def test_a_failed_task_says_why(page: Page, store: TaskStore, api_url: str) -> None:
    task_id = str(uuid.uuid4())
    store.create(task_id)
    store.fail(task_id, "the worker ran out of memory")
    reattach(page, api_url, task_id, "Hello")
    answer = wait_finished(page, "failed")
    expect(answer.locator(".state")).to_have_text("The answer failed: the worker ran out of memory")
    expect(page.locator("#send")).to_be_enabled()


def test_a_dropped_stream_resumes_from_its_last_cursor(page: Page, store: TaskStore, api_url: str) -> None:
    """The first event stream breaks off after one chunk (and a ping); the page asks again from that
    chunk's cursor and gets the rest once: no text lost, none twice."""
    chunks = ["The first part, ", "then the second part, ", "and the end."]
    task_id = finished_task(store, chunks)
    cursors = [chunk.cursor for chunk in store.view(task_id).chunks]
    running = {"task_id": task_id, "status": "running", "attempt": 1, "text": "", "chunks": [], "cursor": "0-0"}
    page.route(re.compile(rf"/task/{task_id}$"), lambda route: route.fulfill(json=running))
    streams: list[str] = []

    def events(route: Route) -> None:
        streams.append(route.request.url)
        if len(streams) > 1:
            route.continue_()
            return
        first = json.dumps({"text": chunks[0], "attempt": 1})
        cut_short = f"event: chunk\r\nid: {cursors[0]}\r\ndata: {first}\r\n\r\n: ping\r\n\r\n"
        route.fulfill(status=200, headers={"content-type": "text/event-stream"}, body=cut_short)

    page.route(re.compile(rf"/task/{task_id}/events"), events)
    reattach(page, api_url, task_id, "Tell me in three parts.")
    answer = wait_finished(page)
    expect(answer.locator(".text")).to_have_text("".join(chunks))
    assert [url.split("?", 1)[1] for url in streams] == ["after=0-0", f"after={cursors[0]}"]


def test_refusals_are_said_in_words(page: Page, api_url: str) -> None:
    """A prompt that does not fit, a value over the server's limit (422s naming the field), and a
    server out of reach: each is a sentence, and the message goes back into the box."""
    open_page(page, api_url)
    configure(page, temperature="0", max_tokens="16")
    too_long = "hello " * 9000  # about 9,000 tokens: beyond the model's context window
    ask(page, too_long)
    expect(page.locator("#notice")).to_have_text(re.compile(r"^The conversation: the prompt needs \d+ tokens"))
    expect(page.locator("#message")).to_have_value(too_long)

    configure(page, temperature="0", max_tokens="100000")
    ask(page, "Hi")
    expect(page.locator("#notice")).to_have_text(re.compile(r"^Max tokens: must be at most \d+ on this server$"))

    configure(page, temperature="0", max_tokens="16")
    page.route("**/generate", lambda route: route.abort("connectionrefused"))
    ask(page, "Hi")
    expect(page.locator("#notice")).to_have_text("Cannot reach the server. Check that it is running and try again.")
    expect(page.locator("#message")).to_have_value("Hi")
    expect(page.locator("article")).to_have_count(0)


@pytest.fixture(scope="module")
def unserved_api(
    redis_server: str, stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """An API on Redis database 15, where no worker consumes: one queued task fills its queue."""
    overrides = {"REDIS_URL": redis_server.rsplit("/", 1)[0] + "/15", "MAX_QUEUED_TASKS": "1"}
    with extra_api(stack_env, tmp_path_factory.mktemp("page_unserved"), overrides) as url:
        yield url


def test_a_full_queue_says_the_server_is_busy_and_a_queued_task_can_be_stopped(page: Page, unserved_api: str) -> None:
    with httpx.Client(base_url=unserved_api, timeout=30) as api:
        waiting = submit(api, prompt="Hi", max_new_tokens=1)
        open_page(page, unserved_api)
        configure(page, temperature="0", max_tokens="16")
        ask(page, "Hello there")
        expect(page.locator("#notice")).to_have_text(
            f"The server is busy: 1 task is waiting. Try again in {QUEUE_FULL_RETRY_AFTER_S} seconds."
        )
        expect(page.locator("#message")).to_have_value("Hello there")  # given back, to send again
        expect(page.locator("article")).to_have_count(0)

        # The task that fills the queue, followed from the page: it waits, then Stop cancels it.
        reattach(page, unserved_api, waiting, "Hi")
        answer = last_answer(page)
        expect(answer).to_have_attribute("data-status", "queued")
        expect(answer.locator(".state")).to_have_text(re.compile(r"^(Waiting in the queue…|Next in line.*)$"))
        page.click("#stop")
        expect(answer).to_have_attribute("data-status", "cancelled")
        expect(answer.locator(".state")).to_have_text("Stopped before it started.")
        assert api.get(f"/task/{waiting}").json()["status"] == TaskStatus.cancelled


@pytest.fixture(scope="module")
def keyed_api(api_url: str, stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Needs a key; on the session's Redis, so the session's worker answers."""
    with extra_api(stack_env, tmp_path_factory.mktemp("page_keyed"), {"API_KEYS": KEY}) as url:
        yield url


def test_a_server_with_keys_asks_for_one_and_the_page_keeps_it(page: Page, keyed_api: str) -> None:
    open_page(page, keyed_api)  # the page itself needs no key
    expect(page.locator("#key-panel")).to_be_visible()
    expect(page.locator("#key-state")).to_have_text("This server needs an API key.")
    configure(page, temperature="0", max_tokens="8")
    ask(page, "Say hello.")
    expect(page.locator("#notice")).to_have_text("This server needs an API key. Enter it above, then send again.")

    page.fill("#api-key", "not-the-key")
    page.click("#save-key")
    expect(page.locator("#key-state")).to_have_text("The server did not accept this key.")
    page.fill("#api-key", KEY)
    page.click("#save-key")
    expect(page.locator("#key-state")).to_have_text(re.compile("^Key accepted"))
    expect(page.locator("#notice")).to_be_hidden()

    with page.expect_request(lambda r: r.url.endswith("/generate") and r.method == "POST") as sent:
        page.click("#send")
    assert sent.value.headers["authorization"] == f"Bearer {KEY}"
    answer = wait_finished(page)
    expect(answer.locator("[data-stat=tokens]")).to_be_visible()
    said = answer_text(page)

    page.reload()
    expect(page.locator("#api-key")).to_have_value(KEY)
    expect(page.locator("#key-state")).to_have_text(re.compile("^Key accepted"))
    expect(page.locator("article.assistant .text")).to_have_text(said)


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def test_a_conversation_sends_its_history_and_makes_the_screenshot(
    page: Page, client: httpx.Client, api_url: str, tmp_path: Path
) -> None:
    """Two turns; the second request carries the first question and answer. Takes the screenshot."""
    open_page(page, api_url)
    system = "You are a helpful assistant. Answer in one short sentence."
    configure(page, temperature="0", max_tokens="32", system_prompt=system)
    page.click("#settings summary")  # folded away again for the picture
    ask(page, "What is the capital of France?")
    first = wait_finished(page).locator(".text").text_content()

    page.fill("#message", "And the capital of Italy?")
    with page.expect_request(lambda r: r.url.endswith("/generate") and r.method == "POST") as sent:
        page.click("#send")
    assert sent.value.post_data_json == {
        "messages": [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "And the capital of Italy?"},
        ],
        "system_prompt": system,
        "temperature": 0,
        "max_new_tokens": 32,
    }
    answer = wait_finished(page)
    expect(page.locator("article.assistant")).to_have_count(2)
    expect(answer.locator("[data-stat=worker]")).to_have_text(f"answered by {server_view(client, answer)['worker']}")

    page.locator("#message").blur()
    page.mouse.move(0, 0)
    shot = SCREENSHOT if os.environ.get("UPDATE_SCREENSHOT") == "1" else tmp_path / "screenshot.png"
    page.screenshot(path=shot, animations="disabled", caret="hide")
    assert png_size(shot) == (DESKTOP["width"], DESKTOP["height"])
    assert shot.stat().st_size < 300_000
