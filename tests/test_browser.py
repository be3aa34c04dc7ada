"""The chat page in headless Chromium against the real processes (gunicorn, the sidecar, the
OpenAI-compatible test server), logged in through the real login form.

Two small proxies live in this module, each on its own asyncio loop in a thread:

* ``ChoppingProxy`` sits between the browser and the sidecar (the page's STREAM_API_URL). It
  forwards requests unchanged; when ``chop`` is on it writes the sidecar's response bytes to the
  browser 1-3 bytes at a time with small pauses, so network chunks split inside multi-byte UTF-8
  characters, inside SSE events and inside the HTTP chunked framing; ``cut()`` aborts every open
  connection at once (a network failure, to exercise the page's automatic re-attach).
* ``UpstreamProxy`` sits between the product and the model server (OPENAI_BASE_URL). It passes
  requests through, and can answer the next chat completion with an HTTP 500 (an upstream that
  fails once, which the test server alone cannot do) or replace the last user message with a
  ``#fake`` scenario (so a screenshot shows a natural question instead of a directive).

Run: ``pytest -m browser tests/test_browser.py`` (add ``DATABASE_URL=postgres://...`` for PostgreSQL).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import secrets
import struct
import threading
import time
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from tests.fake_openai import scenario
from tests.stack import ROOT, Stack

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
# Many sends per module: lift the per-user limits so the tests never trip them.
STACK_ENV = {"RATE_LIMIT_MESSAGES_PER_MINUTE": "1000", "MAX_CONCURRENT_REPLIES_PER_USER": "20"}
TIMEOUT_MS = 20_000

ASSISTANT = '[data-testid="message"][data-role="assistant"]'
USER = '[data-testid="message"][data-role="user"]'
CONTENT = '[data-testid="message-content"]'
CONVERSATION_URL = re.compile(r"/ai/chat/c/(\d+)/$")


# --- Proxies ----------------------------------------------------------------------------------------


class _LoopThread:
    """An asyncio server on its own event loop in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port: int | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    def start(self):
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self.loop).result(10)
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._track, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _track(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            await self.handle(reader, writer)
        except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)

    def stop(self) -> None:
        if not self.thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, write) -> None:
    try:
        while data := await reader.read(65536):
            await write(writer, data)
    except (ConnectionError, OSError):
        pass


async def _plain_write(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()


async def _bidirectional(c_reader, c_writer, u_reader, u_writer, down_write=_plain_write) -> None:
    """Pipe both ways until either side closes, then close both (HTTP clients never half-close)."""
    up = asyncio.ensure_future(_pipe(c_reader, u_writer, _plain_write))
    down = asyncio.ensure_future(_pipe(u_reader, c_writer, down_write))
    try:
        await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
        u_writer.close()


class ChoppingProxy(_LoopThread):
    """Browser -> sidecar. Requests pass unchanged; with `chop` on, responses trickle out in 1-3 byte writes."""

    def __init__(self) -> None:
        super().__init__()
        self.target_port: int | None = None
        self.chop = False
        self.chopped_writes = 0
        self._rng = random.Random(1234)
        self._open: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()

    def cut(self) -> int:
        """Abort every open connection (both sides) at once, as a network failure would; returns how many."""

        async def abort_all() -> int:
            pairs = list(self._open)
            for client, upstream in pairs:
                client.transport.abort()
                upstream.transport.abort()
            return len(pairs)

        return asyncio.run_coroutine_threadsafe(abort_all(), self.loop).result(5)

    async def _chopped_write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        if not self.chop:
            await _plain_write(writer, data)
            return
        i = 0
        while i < len(data):
            n = self._rng.randint(1, 3)
            writer.write(data[i:i + n])
            await writer.drain()
            self.chopped_writes += 1
            i += n
            await asyncio.sleep(self._rng.uniform(0.0005, 0.002))

    async def handle(self, reader, writer) -> None:
        u_reader, u_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        pair = (writer, u_writer)
        self._open.add(pair)
        try:
            await _bidirectional(reader, writer, u_reader, u_writer, down_write=self._chopped_write)
        finally:
            self._open.discard(pair)


class UpstreamProxy(_LoopThread):
    """Product -> model server, HTTP-aware. Every forwarded request goes out on its own upstream
    connection with `Connection: close` (so the client never reuses it and each request is seen here).

    fail_next(n): the next n chat completions are answered here with HTTP 500 (OpenAI's error format).
    rewrite_next(text): the next chat completion's last user message is replaced by `text`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.target_port: int | None = None
        self._failures = 0
        self._rewrites: list[str] = []
        self.failed = 0
        self.completions = 0
        self._lock = threading.Lock()

    def fail_next(self, n: int = 1) -> None:
        with self._lock:
            self._failures += n

    def rewrite_next(self, text: str) -> None:
        with self._lock:
            self._rewrites.append(text)

    async def handle(self, reader, writer) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            lines = head[:-4].decode("latin-1").split("\r\n")
            method, target, version = lines[0].split(" ", 2)
            headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:] if ":" in line]
            names = {name.lower(): value for name, value in headers}
            assert "chunked" not in names.get("transfer-encoding", "").lower(), "chunked request bodies unsupported"
            body = await reader.readexactly(int(names.get("content-length", "0") or 0))
            is_completion = method == "POST" and target.rstrip("/").endswith("/chat/completions")
            fail = rewrite = None
            if is_completion:
                with self._lock:
                    self.completions += 1
                    if self._failures > 0:
                        self._failures -= 1
                        self.failed += 1
                        fail = True
                    elif self._rewrites:
                        rewrite = self._rewrites.pop(0)
            if fail:
                payload = json.dumps({"error": {"message": "Injected upstream failure (test proxy).",
                                                "type": "server_error", "param": None, "code": None}}).encode()
                writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\nConnection: keep-alive\r\n\r\n%s" % (len(payload), payload))
                await writer.drain()
                continue
            if rewrite is not None:
                data = json.loads(body)
                last_user = max(i for i, m in enumerate(data["messages"]) if m.get("role") == "user")
                data["messages"][last_user]["content"] = rewrite
                body = json.dumps(data).encode()
            keep = [(n, v) for n, v in headers if n.lower() not in ("connection", "content-length", "keep-alive")]
            out = [f"{method} {target} {version}"] + [f"{n}: {v}" for n, v in keep]
            out += [f"Content-Length: {len(body)}", "Connection: close"]
            u_reader, u_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            u_writer.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + body)
            await u_writer.drain()
            # The answer says `Connection: close`: pipe it (and watch the client) until one side ends.
            await _bidirectional(reader, writer, u_reader, u_writer)
            return


# --- Fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        message = f"{CHROMIUM} is not installed (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def chopper() -> Iterator[ChoppingProxy]:
    proxy = ChoppingProxy().start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamProxy]:
    proxy = UpstreamProxy().start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def stack(browser, chopper, upstream) -> Iterator[Stack]:
    """The main stack: the page streams from the sidecar through the chopping proxy, and the
    product reaches the model server through the upstream proxy."""
    running = Stack(extra_env=dict(STACK_ENV))
    chopper.target_port = running.sidecar_ports[0]
    running.extra_env["STREAM_API_URL"] = f"http://127.0.0.1:{chopper.port}"
    running.extra_env["OPENAI_BASE_URL"] = f"http://127.0.0.1:{upstream.port}/v1"
    with running:
        upstream.target_port = running.model_port
        yield running


@pytest.fixture(scope="module")
def fallback_stack(browser) -> Iterator[Stack]:
    with Stack(stream_api=False, extra_env=dict(STACK_ENV)) as running:
        yield running


@pytest.fixture(scope="module")
def demo_stack(browser) -> Iterator[Stack]:
    with Stack(extra_env={**STACK_ENV, "OPENAI_API_KEY": "", "DEMO_MODEL_DELAY_MS": "2"}) as running:
        yield running


def new_context(browser, **options):
    """A fresh context whose pages' uncaught script errors are collected in `ctx.page_errors`."""
    ctx = browser.new_context(**options)
    ctx.set_default_timeout(TIMEOUT_MS)
    ctx.page_errors = []
    ctx.on("page", lambda page: page.on("pageerror", lambda error: ctx.page_errors.append(f"{page.url}: {error}")))
    return ctx


@pytest.fixture
def context(browser):
    ctx = new_context(browser, viewport={"width": 1280, "height": 800}, color_scheme="light")
    yield ctx
    errors = list(ctx.page_errors)
    ctx.close()
    assert errors == [], f"uncaught errors in the page: {errors}"


# --- Helpers ----------------------------------------------------------------------------------------


def login(context, stack: Stack, username: str | None = None, password: str | None = None):
    """A real login through the form; returns the page, on the chat page and booted."""
    page = context.new_page()
    page.goto(f"{stack.django_url}/accounts/login/")
    page.fill("#id_username", username or stack.username)
    page.fill("#id_password", password or stack.password)
    page.click('form button[type="submit"]')
    page.wait_for_url(re.compile(r"/ai/chat/$"))
    # Booted: the module script ran and loaded the conversation list.
    expect(page.locator("#conversation-list-status")).not_to_have_text("Loading…")
    return page


def send(page, text: str) -> None:
    page.get_by_test_id("composer-input").fill(text)
    expect(page.get_by_test_id("send-button")).to_be_enabled()
    page.get_by_test_id("send-button").click()


def last_assistant(page):
    return page.locator(ASSISTANT).last


def wait_status(message, status: str, timeout: float = TIMEOUT_MS) -> None:
    expect(message).to_have_attribute("data-status", status, timeout=timeout)


def conversation_id(page) -> int:
    page.wait_for_url(CONVERSATION_URL)
    return int(CONVERSATION_URL.search(page.url).group(1))


def stored_messages(page, stack: Stack, conv_id: int) -> list[dict]:
    """The history API, through the page's own session."""
    answer = page.request.get(f"{stack.django_url}/api/ai/conversations/{conv_id}/messages/")
    assert answer.status == 200, answer.text()
    return answer.json()["messages"]


def stored_message(page, stack: Stack, conv_id: int, message_id) -> dict:
    found = [m for m in stored_messages(page, stack, conv_id) if str(m["id"]) == str(message_id)]
    assert found, f"message {message_id} is not in the history of conversation {conv_id}"
    return found[0]


def wait_text_longer_than(message, n: int, timeout: float = TIMEOUT_MS) -> None:
    message.page.wait_for_function(
        "([el, n]) => el.querySelector('[data-testid=\"message-content\"]').innerText.length > n",
        arg=[message.element_handle(), n], timeout=timeout,
    )


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


# --- 1. Split delivery ------------------------------------------------------------------------------

SPLIT_CHUNKS = [
    "こんにちは、世界！", "日本語の", "テキスト。",
    "\n\n안녕하세요, ", "세계! ", "Привет, ", "мир! Ёжик. ",
    "Emoji: 👋🏽 ", "👩", "\u200d💻 ", "👨\u200d👩\u200d👧\u200d👦 🇯🇵 ✓ é",
    "\n\n```python\n", 'print("héllo, 世界 🌍")\n', "x = 'Ж' + '한'\n", "```\n",
]
SPLIT_PARAGRAPHS = [
    "こんにちは、世界！日本語のテキスト。",
    "안녕하세요, 세계! Привет, мир! Ёжик. Emoji: 👋🏽 👩\u200d💻 👨\u200d👩\u200d👧\u200d👦 🇯🇵 ✓ é",
]
SPLIT_CODE = "print(\"héllo, 世界 🌍\")\nx = 'Ж' + '한'"

# Records what the page's fetch body readers really received: how many chunks, and how many
# began in the middle of a UTF-8 character (a continuation byte 0x80-0xBF first).
COUNT_BODY_CHUNKS = """
(() => {
  const read = ReadableStreamDefaultReader.prototype.read;
  window.__bodyChunks = { count: 0, midChar: 0 };
  ReadableStreamDefaultReader.prototype.read = function (...args) {
    return read.apply(this, args).then((result) => {
      const v = result && result.value;
      if (v instanceof Uint8Array && v.length) {
        window.__bodyChunks.count++;
        if (v[0] >= 0x80 && v[0] < 0xC0) window.__bodyChunks.midChar++;
      }
      return result;
    });
  };
})();
"""


def test_split_delivery_renders_multibyte_text_exactly(context, stack, chopper):
    context.add_init_script(COUNT_BODY_CHUNKS)
    page = login(context, stack)
    writes_before = chopper.chopped_writes
    chopper.chop = True
    try:
        send(page, scenario(chunks=SPLIT_CHUNKS, delay_ms=10))
        reply = last_assistant(page)
        wait_status(reply, "completed", timeout=60_000)
    finally:
        chopper.chop = False

    assert chopper.chopped_writes - writes_before > 500, "the proxy did not chop the response"
    chunks = page.evaluate("window.__bodyChunks")
    assert chunks["midChar"] > 0, f"no network chunk split a UTF-8 character: {chunks}"

    content = reply.get_by_test_id("message-content")
    shown = content.inner_text()
    assert "\ufffd" not in shown
    assert shown.strip() == "\n\n".join([*SPLIT_PARAGRAPHS, SPLIT_CODE])
    assert content.locator("p").all_inner_texts() == SPLIT_PARAGRAPHS
    assert content.locator("pre code").text_content() == SPLIT_CODE

    conv = conversation_id(page)
    stored = stored_message(page, stack, conv, reply.get_attribute("data-message-id"))
    assert stored["status"] == "completed"
    assert stored["content"] == "".join(SPLIT_CHUNKS)


# --- 2. Untrusted markdown --------------------------------------------------------------------------

TRACKER = "http://127.0.0.1:9/tracker.png"
XSS_REPLY = (
    'Image tag: <img src=x onerror="window.__pwned=1"> end.\n\n'
    "<script>window.__pwned=2</script>\n\n"
    "A [click](javascript:window.__pwned=3) link, a [mixed](JaVaScRiPt:window.__pwned=5) one, "
    'and <a href="javascript:window.__pwned=4">raw anchor</a> here.\n\n'
    f"![x]({TRACKER})\n\n"
    '<svg onload="window.__pwned=6"></svg> <iframe src="javascript:window.__pwned=7"></iframe>\n\n'
    "A [safe link](https://example.com/) stays."
)

INSPECT_CONTENT = """
(el) => {
  const bad = [];
  for (const node of el.querySelectorAll('*')) {
    for (const attr of node.attributes) {
      const value = attr.value.replace(/[\\s\\u0000-\\u001f]+/g, '').toLowerCase();
      if (attr.name.toLowerCase().startsWith('on')) bad.push(`${node.tagName} ${attr.name}`);
      if (/^(javascript|vbscript|data):/.test(value)) bad.push(`${node.tagName} ${attr.name}=${attr.value}`);
    }
    if (node.tagName === 'A' && node.href && /^(javascript|vbscript|data):/i.test(node.protocol)) {
      bad.push(`A href ${node.href}`);
    }
    if (['IMG', 'SCRIPT', 'SVG', 'IFRAME', 'OBJECT', 'EMBED', 'FORM', 'STYLE'].includes(node.tagName.toUpperCase())) {
      bad.push(`element ${node.tagName}`);
    }
  }
  return bad;
}
"""


def test_untrusted_markdown_runs_nothing_and_loads_nothing(context, stack):
    dialogs: list[str] = []
    requests: list[str] = []
    context.on("request", lambda request: requests.append(request.url))
    page = login(context, stack)
    page.on("dialog", lambda dialog: (dialogs.append(f"{dialog.type}: {dialog.message}"), dialog.dismiss()))

    send(page, scenario(reply=XSS_REPLY, chunk_chars=7, delay_ms=3))
    reply = last_assistant(page)
    wait_status(reply, "completed")
    content = reply.get_by_test_id("message-content")

    # Clicking the would-be script links does nothing either.
    content.get_by_text("click", exact=True).click()
    content.get_by_text("raw anchor").click()
    page.wait_for_timeout(500)

    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert dialogs == []
    assert content.evaluate(INSPECT_CONTENT) == []
    assert not [url for url in requests if url.startswith("http://127.0.0.1:9/")], requests
    shown = content.inner_text()
    assert "<script>window.__pwned=2</script>" in shown
    assert '<img src=x onerror="window.__pwned=1">' in shown
    assert '<a href="javascript:window.__pwned=4">raw anchor</a>' in shown
    assert content.locator('a[href="https://example.com/"]').get_attribute("rel") == "noopener noreferrer nofollow"
    assert len(page.context.pages) == 1  # no window was opened


# --- 3. Stop ----------------------------------------------------------------------------------------


def test_stop_mid_reply_keeps_exactly_the_text_shown(context, stack):
    page = login(context, stack)
    chunks = [f"w{i:03d} " for i in range(200)]
    send(page, scenario(chunks=chunks, delay_ms=30))
    reply = last_assistant(page)
    wait_text_longer_than(reply, 40)
    expect(page.get_by_test_id("stop-button")).to_be_visible()
    page.get_by_test_id("stop-button").click()

    wait_status(reply, "cancelled")
    content = reply.get_by_test_id("message-content")
    shown = content.inner_text()
    page.wait_for_timeout(800)
    assert content.inner_text() == shown, "the text kept growing after Stop"
    assert page.evaluate("document.body.dataset.streaming") == "0"
    expect(page.get_by_test_id("stop-button")).to_be_hidden()

    stored = stored_message(page, stack, conversation_id(page), reply.get_attribute("data-message-id"))
    assert stored["status"] == "cancelled"
    assert stored["content"].strip() == shown.strip()
    full = "".join(chunks)
    assert full.startswith(stored["content"]) and len(stored["content"]) < len(full) - 100


# --- 4. Reload and a second tab ---------------------------------------------------------------------


def test_reload_and_second_tab_follow_the_live_reply(context, stack):
    page = login(context, stack)
    chunks = [f"r{i:03d} " for i in range(100)]
    full = "".join(chunks)
    send(page, scenario(chunks=chunks, delay_ms=50))
    conv = conversation_id(page)
    wait_text_longer_than(last_assistant(page), 20)

    page.reload()
    reply = last_assistant(page)
    # Re-attached: still streaming after the reload, and growing.
    wait_status(reply, "streaming")
    shown_after_reload = len(reply.get_by_test_id("message-content").inner_text())
    wait_text_longer_than(reply, shown_after_reload + 10)

    other = context.new_page()
    other.goto(f"{stack.django_url}/ai/chat/c/{conv}/")
    other_reply = last_assistant(other)
    wait_status(other_reply, "streaming")
    expect(other.get_by_test_id("stop-button")).to_be_visible()

    wait_status(reply, "completed")
    wait_status(other_reply, "completed")
    stored = stored_message(page, stack, conv, reply.get_attribute("data-message-id"))
    assert stored["status"] == "completed"
    assert stored["content"] == full
    for p in (page, other):
        assert last_assistant(p).get_by_test_id("message-content").inner_text() == full.strip()
        assert p.locator(ASSISTANT).count() == 1 and p.locator(USER).count() == 1


def test_broken_connection_reattaches_and_completes(context, stack, chopper):
    attaches: list[str | None] = []
    context.on("request", lambda r: attaches.append(r.headers.get("last-event-id"))
               if r.method == "GET" and re.search(r"/api/ai/chat/stream/\d+/$", r.url) else None)
    page = login(context, stack)
    chunks = [f"k{i:03d} " for i in range(60)]
    full = "".join(chunks)
    send(page, scenario(chunks=chunks, delay_ms=40))
    reply = last_assistant(page)
    wait_text_longer_than(reply, 40)

    assert chopper.cut() >= 1
    wait_status(reply, "completed")
    # It resumed after the last event it had seen (no replay from the start), and shows no duplicates.
    assert attaches and all(value and value.isdigit() for value in attaches), attaches
    assert reply.get_by_test_id("message-content").inner_text() == full.strip()
    expect(reply.locator(".message-note")).to_be_hidden()
    stored = stored_message(page, stack, conversation_id(page), reply.get_attribute("data-message-id"))
    assert stored["content"] == full and stored["status"] == "completed"


# --- 5. Conversations -------------------------------------------------------------------------------


def test_conversations_switch_history_rename_delete(context, stack):
    page = login(context, stack)
    send(page, "First conversation: apples")
    wait_status(last_assistant(page), "completed")
    first = conversation_id(page)

    page.get_by_test_id("new-chat").click()
    expect(page).to_have_url(re.compile(r"/ai/chat/$"))
    expect(page.locator(USER)).to_have_count(0)
    send(page, "Second conversation: bananas")
    wait_status(last_assistant(page), "completed")
    second = conversation_id(page)
    assert second != first

    def item(conv):
        return page.locator(f'[data-testid="conversation-item"][data-conversation-id="{conv}"]')

    def shows(conv, word):
        expect(page).to_have_url(re.compile(rf"/ai/chat/c/{conv}/$"))
        expect(page.locator(USER)).to_have_count(1)
        expect(page.locator(USER).get_by_test_id("message-content")).to_contain_text(word)
        expect(last_assistant(page).get_by_test_id("message-content")).to_contain_text(word)

    item(first).locator("a").click()
    shows(first, "apples")
    page.go_back()
    shows(second, "bananas")
    page.go_back()
    expect(page).to_have_url(re.compile(r"/ai/chat/$"))
    expect(page.locator('[data-testid="message"]')).to_have_count(0)
    page.go_forward()
    shows(second, "bananas")
    page.go_forward()
    shows(first, "apples")

    # Rename inline.
    item(first).get_by_test_id("conversation-rename").click()
    title_input = item(first).locator("input")
    title_input.fill("Fruit talk ✓")
    # The page shows the new title at once (optimistically); the server has it once the PATCH answers.
    with page.expect_response(
        lambda r: r.request.method == "PATCH" and r.url.endswith(f"/api/ai/conversations/{first}/")
    ) as renamed:
        title_input.press("Enter")
    assert renamed.value.status == HTTPStatus.OK
    expect(item(first).locator(".conversation-title")).to_have_text("Fruit talk ✓")
    expect(page.locator("#conversation-title")).to_have_text("Fruit talk ✓")
    listing = page.request.get(f"{stack.django_url}/api/ai/conversations/").json()["results"]
    assert {c["id"]: c["title"] for c in listing}[first] == "Fruit talk ✓"

    # Delete: dismissing the confirmation keeps it; accepting removes it.
    dialogs: list[str] = []

    def answer(accept: bool):
        def handler(dialog):
            dialogs.append(dialog.type)
            dialog.accept() if accept else dialog.dismiss()
        return handler

    page.once("dialog", answer(False))
    item(second).get_by_test_id("conversation-delete").click()
    page.wait_for_timeout(300)
    expect(item(second)).to_have_count(1)
    assert page.request.get(f"{stack.django_url}/api/ai/conversations/{second}/messages/").status == 200

    page.once("dialog", answer(True))
    item(second).get_by_test_id("conversation-delete").click()
    expect(item(second)).to_have_count(0)
    assert dialogs == ["confirm", "confirm"]
    assert page.request.get(f"{stack.django_url}/api/ai/conversations/{second}/messages/").status == 404
    listing = page.request.get(f"{stack.django_url}/api/ai/conversations/").json()["results"]
    assert second not in [c["id"] for c in listing] and first in [c["id"] for c in listing]
    expect(page).to_have_url(re.compile(rf"/ai/chat/c/{first}/$"))  # the open one was not deleted


# --- 6. Upstream errors and Retry -------------------------------------------------------------------


def test_upstream_500_shows_error_and_retry_succeeds(context, stack, upstream):
    page = login(context, stack)

    # A scenario that always fails: an error with Retry; Retry re-sends the same text.
    failing = scenario(status=500)
    send(page, failing)
    reply = last_assistant(page)
    wait_status(reply, "error")
    note = reply.locator(".message-note")
    expect(note).to_be_visible()
    assert "Traceback" not in note.inner_text() and "Fake error" not in note.inner_text()
    expect(reply.get_by_test_id("retry-button")).to_be_visible()
    conv = conversation_id(page)
    assert stored_message(page, stack, conv, reply.get_attribute("data-message-id"))["status"] == "error"
    reply.get_by_test_id("retry-button").click()
    expect(page.locator(USER)).to_have_count(2)
    assert page.locator(USER).last.get_by_test_id("message-content").text_content() == failing
    wait_status(last_assistant(page), "error")
    expect(page.get_by_test_id("retry-button")).to_have_count(1)  # only the latest failure offers Retry

    # An upstream that fails once (the test proxy answers 500): Retry produces a completed reply.
    page.get_by_test_id("new-chat").click()
    failed_before = upstream.failed
    upstream.fail_next(1)
    send(page, scenario(chunks=["Recovered ", "after ", "one ", "retry."], delay_ms=10))
    reply = last_assistant(page)
    wait_status(reply, "error")
    assert upstream.failed == failed_before + 1
    reply.get_by_test_id("retry-button").click()
    retried = last_assistant(page)
    wait_status(retried, "completed")
    expect(retried.get_by_test_id("message-content")).to_have_text("Recovered after one retry.")
    expect(page.get_by_test_id("retry-button")).to_have_count(0)
    stored = stored_messages(page, stack, conversation_id(page))
    assert [(m["role"], m["status"]) for m in stored if m["role"] == "assistant"] == [
        ("assistant", "error"), ("assistant", "completed")]
    assert stored[-1]["content"] == "Recovered after one retry."


def test_broken_upstream_keeps_partial_text_marked(context, stack):
    page = login(context, stack)
    send(page, scenario(chunks=["Partial ", "answer ", "that ", "breaks."], drop_after=2, delay_ms=20))
    reply = last_assistant(page)
    expect(reply).not_to_have_attribute("data-status", "streaming")
    status = reply.get_attribute("data-status")
    assert status in ("error", "interrupted")
    expect(reply.get_by_test_id("message-content")).to_have_text("Partial answer")
    expect(reply.locator(".message-note")).to_be_visible()
    expect(reply.get_by_test_id("retry-button")).to_be_visible()
    stored = stored_message(page, stack, conversation_id(page), reply.get_attribute("data-message-id"))
    assert stored["content"] == "Partial answer "
    assert stored["status"] == status

    # Reopened from history, the partial text is still there, still marked, still retryable.
    page.reload()
    reply = last_assistant(page)
    expect(reply).to_have_attribute("data-status", status)
    expect(reply.get_by_test_id("message-content")).to_have_text("Partial answer")
    expect(reply.locator(".message-note")).to_be_visible()
    expect(reply.get_by_test_id("retry-button")).to_be_visible()


# --- 7. Composer ------------------------------------------------------------------------------------


def test_composer_keys_disabled_send_and_counter(context, stack):
    page = login(context, stack)
    box = page.get_by_test_id("composer-input")
    send_button = page.get_by_test_id("send-button")
    counter = page.get_by_test_id("char-counter")
    limit = page.evaluate("JSON.parse(document.getElementById('c3-config').textContent).maxMessageChars")
    assert limit > 10

    expect(send_button).to_be_disabled()
    box.fill("   \n\t  ")
    expect(send_button).to_be_disabled()
    box.press("Enter")
    expect(page.locator('[data-testid="message"]')).to_have_count(0)

    box.fill("")
    box.press_sequentially("line one")
    box.press("Shift+Enter")
    box.press_sequentially("line two")
    assert box.input_value() == "line one\nline two"
    expect(page.locator('[data-testid="message"]')).to_have_count(0)
    expect(send_button).to_be_enabled()
    expect(counter).to_be_hidden()

    box.press("Enter")
    expect(page.locator(USER)).to_have_count(1)
    assert page.locator(USER).get_by_test_id("message-content").text_content() == "line one\nline two"
    expect(box).to_have_value("")
    expect(send_button).to_be_disabled()
    reply = last_assistant(page)
    wait_status(reply, "completed")
    stored = stored_message(page, stack, conversation_id(page), reply.get_attribute("data-message-id"))
    assert stored["content"] == "You said: line one\nline two"

    threshold = int(limit * 0.8)
    box.fill("a" * (threshold - 1))
    expect(counter).to_be_hidden()
    box.fill("a" * threshold)
    expect(counter).to_be_visible()
    expect(counter).to_contain_text(f"{limit:,}")
    expect(send_button).to_be_enabled()
    box.fill("a" * (limit + 1))
    expect(counter).to_have_class(re.compile(r"\bover\b"))
    expect(counter).to_contain_text("over the limit")
    expect(send_button).to_be_disabled()
    box.press("Enter")
    page.wait_for_timeout(300)
    expect(page.locator(USER)).to_have_count(1)


# --- 8. Fallback endpoint ---------------------------------------------------------------------------


def test_fallback_mode_streams_through_django(context, fallback_stack):
    stack = fallback_stack
    streams: list[str] = []
    context.on("request", lambda r: streams.append(f"{r.method} {r.url}") if "/chat/stream/" in r.url else None)
    page = login(context, stack)
    chunks = [f"f{i:03d} " for i in range(30)]
    send(page, scenario(chunks=chunks, delay_ms=60))
    reply = last_assistant(page)
    # It streams (visible while incomplete), not delivered in one piece at the end.
    page.wait_for_function(
        "(el) => el.dataset.status === 'streaming' && el.innerText.includes('f005')",
        arg=reply.element_handle(),
    )
    wait_status(reply, "completed")
    assert streams == [f"POST {stack.django_url}/api/ai/chat/stream/"]
    stored = stored_message(page, stack, conversation_id(page), reply.get_attribute("data-message-id"))
    assert stored["content"] == "".join(chunks)
    assert reply.get_by_test_id("message-content").inner_text() == stored["content"].strip()


# --- 9. Demo model ----------------------------------------------------------------------------------


def test_demo_banner_and_demo_reply(context, demo_stack):
    stack = demo_stack
    page = login(context, stack)
    expect(page.get_by_test_id("demo-banner")).to_be_visible()
    expect(page.get_by_test_id("demo-banner")).to_contain_text("demo")
    send(page, "Hello, demo")
    reply = last_assistant(page)
    wait_status(reply, "completed")
    content = reply.get_by_test_id("message-content")
    expect(content).to_contain_text("offline demo model")
    expect(content.locator("h3")).to_have_text("What you are seeing")
    expect(content.locator("pre code")).to_contain_text("def greet")
    stored = stored_message(page, stack, conversation_id(page), reply.get_attribute("data-message-id"))
    assert stored["status"] == "completed"
    assert "“Hello, demo”" in stored["content"]
    assert stored["metadata"]["model"] == "c3-demo-offline"


# --- 10. Screenshots --------------------------------------------------------------------------------

SCREENSHOT_REPLY = """## Streaming in c3 chat

Replies arrive as **server-sent events** and are rendered as Markdown while they stream:

- The reply is stored as it streams, so a reload picks up where it was
- **Stop** ends generation on the server and keeps the text so far
- Model output is sanitised: no scripts, no remote images

| Service | Role | Port |
|---|---|---|
| Django | pages, login, history API | 8000 |
| FastAPI | streaming sidecar | 8001 |

```python
def greet(name: str) -> str:
    return f"Hello, {name}!"
```
"""


def _check_rendering(page) -> None:
    content = last_assistant(page).get_by_test_id("message-content")
    expect(content.locator("h2")).to_have_text("Streaming in c3 chat")
    expect(content.locator("ul > li")).to_have_count(3)
    expect(content.locator("table tbody tr")).to_have_count(2)
    expect(content.locator("pre code")).to_have_text('def greet(name: str) -> str:\n    return f"Hello, {name}!"')
    assert content.locator("pre code span").count() > 0  # highlighted


def _background_luminance(page) -> float:
    rgb = page.evaluate("getComputedStyle(document.querySelector('.main')).backgroundColor")
    r, g, b = (int(x) for x in re.findall(r"\d+", rgb)[:3])
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255


def test_screenshots(browser, context, stack, upstream, tmp_path):
    # Runs always (the layout checks below), but only rewrites the README's pictures when asked:
    # C3_UPDATE_SCREENSHOTS=1 scripts/test.sh -k screenshots
    docs = ROOT / "docs" if os.environ.get("C3_UPDATE_SCREENSHOTS") == "1" else tmp_path
    docs.mkdir(exist_ok=True)
    # A user of its own, so the sidebar holds just this conversation (not the other tests' ones).
    username, password = "maria", "shot-" + secrets.token_hex(8)
    stack.manage("shell", "-c", "from django.contrib.auth import get_user_model; "
                 f"get_user_model().objects.create_user({username!r}, password={password!r})")
    page = login(context, stack, username, password)
    # A natural question in the bubble; the upstream proxy asks the model server for the markdown.
    upstream.rewrite_next(scenario(reply=SCREENSHOT_REPLY, chunk_chars=12, delay_ms=2))
    send(page, "How does c3 chat stream replies?")
    wait_status(last_assistant(page), "completed")
    conv = conversation_id(page)
    _check_rendering(page)
    expect(last_assistant(page).get_by_test_id("message-meta")).to_contain_text("tokens")
    page.wait_for_timeout(400)  # let the stored metadata (TTFT, duration) replace the client's
    page.mouse.move(0, 0)
    assert _background_luminance(page) > 0.8
    desktop = docs / "screenshot.png"
    page.screenshot(path=str(desktop))
    assert png_size(desktop) == (1280, 800)

    mobile_context = new_context(
        browser, viewport={"width": 390, "height": 844}, device_scale_factor=1, is_mobile=True, has_touch=True,
        color_scheme="dark",
    )
    try:
        mobile = login(mobile_context, stack, username, password)
        mobile.goto(f"{stack.django_url}/ai/chat/c/{conv}/")
        wait_status(last_assistant(mobile), "completed")
        _check_rendering(mobile)
        expect(mobile.locator("#sidebar")).not_to_be_in_viewport()
        # The metadata is wider than a phone: it wraps, and the copy button stays on its right.
        reply = last_assistant(mobile)
        meta = reply.get_by_test_id("message-meta").bounding_box()
        copy = reply.get_by_role("button", name="Copy reply").bounding_box()
        assert copy["x"] >= meta["x"] + meta["width"] and copy["y"] < meta["y"] + meta["height"], (meta, copy)
        assert _background_luminance(mobile) < 0.2
        mobile.wait_for_timeout(300)
        phone = docs / "screenshot-mobile.png"
        mobile.screenshot(path=str(phone))
        assert png_size(phone) == (390, 844)
        assert time.time() - phone.stat().st_mtime < 60
        assert mobile_context.page_errors == []
    finally:
        mobile_context.close()
