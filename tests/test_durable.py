"""Durable generations (shared/API.md, "Stop and resume"): a reply belongs to the process that
generates it, HTTP responses only watch it, and everything a person saw survives another process
answering, a Stop sent elsewhere, kill -9 and a graceful shutdown.

The cross-process tests run the real product as processes (`tests.stack.Stack`: gunicorn, sidecars
started by start_stream.sh, the OpenAI-compatible test server) and only look at it from outside:
SSE on the wire and the history API. The in-process tests (bounded writes, long logs) use the
`sidecar` fixture and read the database directly.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import time
from collections import Counter
from http import HTTPStatus

import httpx
import pytest
from django.db.backends.signals import connection_created

from ai_features import services
from ai_features.models import Message, ReplyChunk
from ai_features.services import MAX_PIECES_PER_CHUNK
from ai_features.streaming.runtime import GenerationRuntime, LiveReply, run_db
from ai_features.streaming.validation import parse_reply_request
from tests.conftest import StreamService, wait_until
from tests.fake_openai import scenario
from tests.sse_client import SSEParser
from tests.stack import Stack

TERMINAL = ("done", "error")


# --- Talking to a Stack from outside --------------------------------------------------------------------


class Watcher:
    """An open SSE response, read on demand. Keeps every event with its id and arrival time, and
    survives the connection being cut (a killed process): reading then just ends."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.status = response.status_code
        self.events: list[dict] = []
        self.cut: Exception | None = None
        self.ended = False
        self._parser = SSEParser()
        self._raw = response.iter_raw()

    def read(self, count: int | None = None, *, until: float | None = None) -> list[dict]:
        """Read at least `count` more events (all of them when None), or until the monotonic
        deadline `until`; never past the end of the response."""
        first = len(self.events)
        while not self.ended:
            if count is not None and len(self.events) - first >= count:
                break
            if until is not None and time.monotonic() >= until:
                break
            try:
                chunk = next(self._raw)
            except StopIteration:
                self.ended = True
                break
            except httpx.HTTPError as exc:  # the process died under us
                self.cut = exc
                self.ended = True
                break
            arrived = time.monotonic()
            for event in self._parser.feed(chunk):
                self.events.append(dict(event.json, _id=int(event.id), _at=arrived))
        return self.events[first:]

    def close(self) -> None:
        self.response.close()

    @property
    def ids(self) -> list[int]:
        return [e["_id"] for e in self.events]

    @property
    def pieces(self) -> list[tuple[int, str]]:
        return [(e["_id"], e["content"]) for e in self.events if e["type"] == "content"]

    @property
    def text(self) -> str:
        return "".join(text for _, text in self.pieces)

    @property
    def start(self) -> dict:
        assert self.events and self.events[0]["type"] == "start", self.events[:1]
        return self.events[0]

    @property
    def terminal(self) -> dict | None:
        return self.events[-1] if self.events and self.events[-1]["type"] in TERMINAL else None


class Person:
    """The logged-in person of a Stack, using the sidecars the way the page does: a bearer stream
    token minted by Django, and the history API of Django for what is stored."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.browser = stack.login()
        self.token = stack.stream_token(self.browser)

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def _client(self, index: int) -> httpx.Client:
        # A fresh client per call: a sidecar may have been killed and restarted on the same port.
        return httpx.Client(base_url=self.stack.sidecar_url(index), timeout=httpx.Timeout(30.0))

    def post_reply(self, index: int, message: str) -> Watcher:
        client = self._client(index)
        request = client.build_request("POST", "/api/ai/chat/stream/", json={"message": message}, headers=self._auth())
        response = client.send(request, stream=True)
        assert response.status_code == HTTPStatus.OK, response.read()
        return Watcher(response)

    def watch(self, index: int, reply_id: int, last_event_id: int | None = None) -> Watcher:
        headers = self._auth()
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        client = self._client(index)
        response = client.send(client.build_request("GET", f"/api/ai/chat/stream/{reply_id}/", headers=headers), stream=True)
        assert response.status_code == HTTPStatus.OK, response.read()
        return Watcher(response)

    def replay(self, index: int, reply_id: int, last_event_id: int | None = None) -> Watcher:
        watcher = self.watch(index, reply_id, last_event_id)
        watcher.read()
        watcher.close()
        return watcher

    def stop(self, index: int, reply_id: int) -> httpx.Response:
        with self._client(index) as client:
            return client.post(f"/api/ai/chat/stream/{reply_id}/stop/", json={}, headers=self._auth())

    def stored(self, conversation_id: int, reply_id: int) -> dict:
        answer = self.browser.get(f"/api/ai/conversations/{conversation_id}/messages/")
        assert answer.status_code == HTTPStatus.OK, answer.text
        [message] = [m for m in answer.json()["messages"] if m["id"] == reply_id]
        return message

    def wait_finished(self, conversation_id: int, reply_id: int, timeout: float) -> dict:
        return wait_until(
            lambda: (m := self.stored(conversation_id, reply_id))["status"] != "streaming" and m,
            timeout=timeout, interval=0.05,
        )


def assert_replay_matches(replay: Watcher, seen: list[tuple[int, str]], stored_content: str) -> None:
    """A replay is the log: contiguous ids from 0, the same pieces under the same ids as any
    watcher saw, and exactly the stored text."""
    n = len(replay.pieces)
    assert replay.ids == list(range(0, n + 2)), replay.ids
    assert replay.text == stored_content
    common = min(n, len(seen))
    assert replay.pieces[:common] == seen[:common]
    assert replay.terminal is not None and replay.terminal["_id"] == n + 1


def assert_interrupted_with_logged_prefix(person, reply_id, watcher):
    """A reply whose process died: stored `interrupted` with exactly the logged prefix of what the
    watcher saw, and a replay of those pieces that ends with the `interrupted` error."""
    stored = person.stored(watcher.start["conversation_id"], reply_id)
    assert stored["status"] == "interrupted"
    replay = person.replay(0, reply_id)
    n = len(replay.pieces)
    assert 1 <= n <= len(watcher.pieces)
    assert stored["content"] == "".join(text for _, text in watcher.pieces[:n])
    assert_replay_matches(replay, watcher.pieces, stored["content"])
    assert replay.terminal["type"] == "error" and replay.terminal["code"] == "interrupted"
    return replay


# --- Two sidecar processes sharing one database ---------------------------------------------------------


@pytest.fixture(scope="class")
def two_sidecars():
    """Two sidecar processes sharing one database; stopped when the class using it is done.
    A short lease so that the reaping tests do not wait 30 s (renewals then run every 0.67 s)."""
    with Stack(sidecars=2, extra_env={"GENERATION_LEASE_SECONDS": "2"}) as stack:
        yield stack


@pytest.mark.e2e
class TestTwoSidecarProcesses:
    """Replies generated by one process, watched, resumed, stopped and reaped through another."""

    def test_resume_on_another_process_has_no_gap_and_no_duplicate(self, two_sidecars):
        person = Person(two_sidecars)
        chunks = [f"r{i:02d} " for i in range(60)]

        first = person.post_reply(0, scenario(chunks=chunks, delay_ms=20))
        first.read(11)  # start + 10 pieces, then the tab goes away
        first.close()
        start = first.start
        reply_id, conversation_id = start["assistant_message_id"], start["conversation_id"]
        last_id = first.events[-1]["_id"]
        assert first.ids == list(range(0, last_id + 1))
        # The second half is then followed live, through the log, on the other process.
        assert person.stored(conversation_id, reply_id)["status"] == "streaming"

        second = person.watch(1, reply_id, last_event_id=last_id)
        second.read()
        second.close()

        stored = person.stored(conversation_id, reply_id)
        all_ids = first.ids + second.ids
        assert len(all_ids) == len(set(all_ids)), "an event id was sent twice"
        assert second.ids == list(range(last_id + 1, len(chunks) + 2)), "gap or duplicate at the seam"
        assert first.text + second.text == stored["content"] == "".join(chunks)
        assert second.terminal["type"] == "done" and second.terminal["status"] == "completed"
        assert stored["status"] == "completed"

    def test_stop_through_another_process_stops_the_reply_where_it_runs(self, two_sidecars):
        person = Person(two_sidecars)
        chunks = [f"s{i:03d} " for i in range(400)]  # 8 s if nobody stops it
        watcher = person.post_reply(0, scenario(chunks=chunks, delay_ms=20))
        watcher.read(6)
        reply_id, conversation_id = watcher.start["assistant_message_id"], watcher.start["conversation_id"]
        reader = threading.Thread(target=watcher.read, daemon=True)  # the page keeps reading meanwhile
        reader.start()

        sent_at = time.monotonic()
        answer = person.stop(1, reply_id)
        answered_at = time.monotonic()
        reader.join(timeout=10)
        watcher.close()

        assert not reader.is_alive(), "the watcher on the generating process never ended"
        assert answer.status_code == HTTPStatus.OK and answer.json() == {"status": "cancelled"}
        terminal = watcher.terminal
        assert terminal is not None and terminal["type"] == "done" and terminal["status"] == "cancelled"
        stored = person.stored(conversation_id, reply_id)
        assert stored["status"] == "cancelled"
        assert stored["content"] == watcher.text
        assert 5 <= len(watcher.pieces) < len(chunks)
        assert watcher.ids == list(range(0, len(watcher.pieces) + 2))
        latency = terminal["_at"] - sent_at
        print(f"\ncross-process stop: watcher's terminal event {latency * 1000:.0f} ms after the request, "
              f"stop answered in {(answered_at - sent_at) * 1000:.0f} ms, {len(watcher.pieces)} pieces kept")
        assert latency < 2.0
        assert_replay_matches(person.replay(1, reply_id), watcher.pieces, stored["content"])

    def test_stop_through_another_process_before_the_first_token(self, two_sidecars):
        person = Person(two_sidecars)
        watcher = person.post_reply(0, scenario(hang=True))  # the model never says a word
        watcher.read(1)
        reply_id, conversation_id = watcher.start["assistant_message_id"], watcher.start["conversation_id"]

        answer = person.stop(1, reply_id)
        watcher.read()
        watcher.close()

        assert answer.status_code == HTTPStatus.OK and answer.json() == {"status": "cancelled"}
        assert [(e["_id"], e["type"], e.get("status")) for e in watcher.events] == [(0, "start", None), (1, "done", "cancelled")]
        stored = person.stored(conversation_id, reply_id)
        assert stored["status"] == "cancelled" and stored["content"] == ""

    def test_a_reply_deleted_while_watched_elsewhere_ends_every_stream_with_one_terminal_event(self, two_sidecars):
        person = Person(two_sidecars)
        owner_watcher = person.post_reply(0, scenario(hang=True))  # silent: only the start is logged
        owner_watcher.read(1)
        reply_id, conversation_id = owner_watcher.start["assistant_message_id"], owner_watcher.start["conversation_id"]
        log_watcher = person.watch(1, reply_id)  # the other process follows it through the database
        log_watcher.read(1)

        deleted = person.browser.delete(f"/api/ai/conversations/{conversation_id}/",
                                        headers={"X-CSRFToken": person.browser.cookies["csrftoken"]})
        assert deleted.status_code == HTTPStatus.NO_CONTENT
        owner_watcher.read(until=time.monotonic() + 10)
        log_watcher.read(until=time.monotonic() + 10)

        for watcher in (owner_watcher, log_watcher):
            watcher.close()
            assert watcher.ended, "the stream did not end"
            assert [(e["type"], e.get("status")) for e in watcher.events] == [("start", None), ("done", "cancelled")]
            assert watcher.events[-1]["_id"] == 1

    def test_a_retry_on_another_process_watches_the_first_reply(self, two_sidecars):
        person = Person(two_sidecars)
        chunks = [f"i{i:02d} " for i in range(40)]
        body = {"message": scenario(chunks=chunks, delay_ms=20), "client_message_id": "retry-across-processes"}
        with httpx.Client(base_url=two_sidecars.sidecar_url(0), timeout=30) as client:
            response = client.send(client.build_request("POST", "/api/ai/chat/stream/", json=body, headers=person._auth()),
                                   stream=True)
            first = Watcher(response)
            first.read(4)
            first.close()  # the connection broke; the page retries with the same key elsewhere
        with httpx.Client(base_url=two_sidecars.sidecar_url(1), timeout=30) as client:
            response = client.send(client.build_request("POST", "/api/ai/chat/stream/", json=body, headers=person._auth()),
                                   stream=True)
            retry = Watcher(response)
            retry.read()
            retry.close()

        assert retry.start == {**first.start, "_at": retry.start["_at"]}
        assert retry.ids == list(range(0, len(chunks) + 2))
        assert retry.pieces[: len(first.pieces)] == first.pieces
        stored = person.stored(first.start["conversation_id"], first.start["assistant_message_id"])
        assert retry.text == stored["content"] == "".join(chunks)
        history = person.browser.get(f"/api/ai/conversations/{first.start['conversation_id']}/messages/").json()
        assert len(history["messages"]) == 2, "the retry stored something new"

    def test_an_owner_that_was_paused_past_its_lease_agrees_with_the_reaper(self, two_sidecars):
        """A process frozen longer than the lease (a VM or container pause, a stop-the-world stall, a
        database outage) is taken for dead and its reply is reaped as `interrupted`. When it wakes up,
        everyone must still agree on one reply: what its live watcher saw, the stored text, the log
        that replays it, and how it ended."""
        stack = two_sidecars
        person = Person(stack)
        chunks = [f"z{i:03d} " for i in range(500)]
        watcher = person.post_reply(1, scenario(chunks=chunks, delay_ms=20))
        watcher.read(2)
        watcher.read(until=watcher.events[-1]["_at"] + 0.6)
        reply_id, conversation_id = watcher.start["assistant_message_id"], watcher.start["conversation_id"]
        reader = threading.Thread(target=watcher.read, daemon=True)
        try:
            stack.signal_sidecar(1, signal.SIGSTOP)
            reader.start()
            reaped = person.wait_finished(conversation_id, reply_id, timeout=10)  # by sidecar 0
            assert reaped["status"] == "interrupted"
        finally:
            stack.signal_sidecar(1, signal.SIGCONT)
        reader.join(timeout=15)
        watcher.close()
        assert not reader.is_alive(), "the owner never ended its watcher after waking up"
        time.sleep(0.5)  # let the woken owner write whatever it still writes

        stored = person.stored(conversation_id, reply_id)
        replay = person.replay(0, reply_id)
        print(f"\npaused owner: stored {stored['status']} with {len(stored['content'])} chars; the live watcher saw "
              f"{len(watcher.text)} chars ending {watcher.terminal and (watcher.terminal['type'], watcher.terminal.get('status') or watcher.terminal.get('code'))}; "
              f"the replay has {len(replay.text)} chars ending {replay.terminal['type']}/{replay.terminal.get('code')}")
        assert stored["status"] == "interrupted"
        assert replay.text == stored["content"], "the log no longer matches the stored text"
        assert watcher.terminal is not None
        assert (watcher.terminal["type"], watcher.terminal.get("code")) == ("error", "interrupted"), watcher.terminal
        # As after kill -9, the watcher may have seen a few pieces that never reached the log, no more.
        assert watcher.text.startswith(stored["content"])
        assert len(watcher.pieces) - len(replay.pieces) <= 20, "the owner kept generating after it was reaped"

    def test_a_killed_process_is_reaped_by_the_other_one(self, two_sidecars):
        stack = two_sidecars
        person = Person(stack)
        chunks = [f"v{i:03d} " for i in range(500)]
        watcher = person.post_reply(1, scenario(chunks=chunks, delay_ms=20))
        watcher.read(2)
        watcher.read(until=watcher.events[-1]["_at"] + 0.8)  # several flush ticks (0.2 s) have passed
        reply_id, conversation_id = watcher.start["assistant_message_id"], watcher.start["conversation_id"]
        try:
            stack.signal_sidecar(1, signal.SIGKILL)
            killed_at = time.monotonic()
            watcher.read()
            stack.wait_exit("sidecar1", timeout=10)

            stored = person.wait_finished(conversation_id, reply_id, timeout=10)  # lease 2 s, no restart
            reaped_after = time.monotonic() - killed_at
            assert watcher.terminal is None, "a killed process cannot have sent a terminal event"
            assert stored["status"] == "interrupted"
            replay = assert_interrupted_with_logged_prefix(person, reply_id, watcher)
            n = len(replay.pieces)
            assert f"[{reply_id}]" in stack.log("sidecar0"), "sidecar 0 did not log reaping the reply"
            print(f"\nkill -9 of sidecar 1: reaped by sidecar 0 {reaped_after:.2f} s later; "
                  f"{n} of the {len(watcher.pieces)} pieces seen were logged")
        finally:
            if stack.processes["sidecar1"].poll() is not None:
                stack.start_sidecar(1)


@pytest.mark.e2e
def test_kill_9_then_restart_marks_the_reply_interrupted_with_its_logged_text():
    with Stack(sidecars=1, extra_env={"GENERATION_LEASE_SECONDS": "2"}) as stack:
        person = Person(stack)
        chunks = [f"k{i:03d} " for i in range(500)]  # 10 s
        watcher = person.post_reply(0, scenario(chunks=chunks, delay_ms=20))
        watcher.read(2)
        watcher.read(until=watcher.events[-1]["_at"] + 0.8)
        reply_id, conversation_id = watcher.start["assistant_message_id"], watcher.start["conversation_id"]

        stack.signal_sidecar(0, signal.SIGKILL)
        killed_at = time.monotonic()
        watcher.read()
        stack.wait_exit("sidecar0", timeout=10)
        assert watcher.terminal is None
        assert person.stored(conversation_id, reply_id)["status"] == "streaming"  # nobody reaped it yet
        stack.start_sidecar(0)

        stored = person.wait_finished(conversation_id, reply_id, timeout=8)
        print(f"\nkill -9 and restart: interrupted {time.monotonic() - killed_at:.2f} s after the kill")
        assert stored["status"] == "interrupted"
        assert stored["content"], "nothing of what was flushed was kept"
        replay = assert_interrupted_with_logged_prefix(person, reply_id, watcher)
        n = len(replay.pieces)
        assert replay.terminal["content"] and "Traceback" not in replay.terminal["content"]
        # Resuming in the middle of an interrupted reply gives the rest and the same ending.
        tail = person.replay(0, reply_id, last_event_id=n // 2)
        assert tail.ids == list(range(n // 2 + 1, n + 2))
        assert tail.events[-1] == {**replay.events[-1], "_at": tail.events[-1]["_at"]}


@pytest.mark.e2e
def test_sigterm_drains_finishes_short_replies_and_interrupts_long_ones():
    graceful, grace = 4, 2  # the generation grace runs from SIGTERM; uvicorn's drain is the backstop
    env = {"STREAM_GRACEFUL_SHUTDOWN_SECONDS": str(graceful), "GENERATION_SHUTDOWN_GRACE_SECONDS": str(grace)}
    with Stack(sidecars=1, extra_env=env) as stack:
        person = Person(stack)
        long_chunks = [f"L{i:03d} " for i in range(500)]  # 10 s: much longer than the grace
        short_chunks = [f"S{i:02d} " for i in range(40)]  # 1 s, watched to its end
        long_watcher = person.post_reply(0, scenario(chunks=long_chunks, delay_ms=20))
        long_watcher.read(6)
        long_watcher.close()  # nobody watches it any more: it keeps generating
        short_watcher = person.post_reply(0, scenario(chunks=short_chunks, delay_ms=25))
        short_watcher.read(2)
        reader = threading.Thread(target=short_watcher.read, daemon=True)
        reader.start()

        stack.signal_sidecar(0, signal.SIGTERM)
        signalled_at = time.monotonic()
        time.sleep(0.3)  # let uvicorn act on the signal
        draining = stack.processes["sidecar0"].poll() is None
        try:
            late = httpx.post(f"{stack.sidecar_url(0)}/api/ai/chat/stream/", json={"message": "too late"},
                              headers={"Authorization": f"Bearer {person.token}"}, timeout=5)
            refused = None
        except httpx.TransportError as exc:
            late, refused = None, exc
        reader.join(timeout=graceful + 2)
        code = stack.wait_exit("sidecar0", timeout=graceful + grace + 10)
        exited_after = time.monotonic() - signalled_at
        print(f"\nSIGTERM: exited with {code} after {exited_after:.2f} s; a new POST while draining got "
              f"{late.status_code if late is not None else type(refused).__name__}")

        assert draining, "the process was gone before the drain could be observed"
        if late is not None:
            assert late.status_code == HTTPStatus.SERVICE_UNAVAILABLE
            assert late.headers["content-type"].startswith("application/json") and late.json()["error"]
        else:
            assert isinstance(refused, (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError))
        titles = [c["title"] for c in person.browser.get("/api/ai/conversations/").json()["results"]]
        assert "too late" not in titles, "a reply was started during the drain"

        # The short reply finished within the drain and its watcher saw the end.
        assert not reader.is_alive()
        short = person.stored(short_watcher.start["conversation_id"], short_watcher.start["assistant_message_id"])
        assert short_watcher.terminal is not None and short_watcher.terminal["status"] == "completed"
        assert short["status"] == "completed" and short["content"] == short_watcher.text == "".join(short_chunks)

        # The long one was ended by the shutdown, keeping everything it had generated.
        start = long_watcher.start
        stored = person.stored(start["conversation_id"], start["assistant_message_id"])
        assert stored["status"] == "interrupted"
        full = "".join(long_chunks)
        assert stored["content"].startswith(long_watcher.text) and len(stored["content"]) > len(long_watcher.text)
        assert full.startswith(stored["content"]) and stored["content"] != full
        assert stored["content"].endswith(" "), "cut inside a piece"
        assert exited_after < graceful + grace + 5

        # Its log holds exactly that text (read through another process: Django's fallback).
        replay_client = httpx.Client(base_url=stack.django_url, cookies=person.browser.cookies, timeout=30)
        with replay_client.stream("GET", f"/api/ai/chat/stream/{start['assistant_message_id']}/") as response:
            assert response.status_code == HTTPStatus.OK
            replay = Watcher(response)
            replay.read()
        replay_client.close()
        assert_replay_matches(replay, long_watcher.pieces, stored["content"])
        assert replay.terminal["type"] == "error" and replay.terminal["code"] == "interrupted"


# --- In one process: what the runtime writes -----------------------------------------------------------


class WriteCounter:
    """Counts INSERT/UPDATE/DELETE statements on every connection opened while installed, whatever
    thread opens it (the runtime's writes run on its database threads, not the test's)."""

    # Anywhere in the statement: on PostgreSQL a new reply's rows are inserted by one statement of
    # data-modifying CTEs (WITH … INSERT … INSERT …); "FOR UPDATE" is a lock, not a write.
    TABLE = re.compile(r'(?<!FOR )\b(INSERT\s+INTO|UPDATE|DELETE\s+FROM)\s+"?(\w+)"?', re.IGNORECASE)

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        self.statements = 0
        self.active = False
        self._lock = threading.Lock()
        self._wrapped: list = []

    def __call__(self, execute, sql, params, many, context):
        if self.active:
            with self._lock:
                self.statements += 1
                for match in self.TABLE.finditer(sql):
                    self.counts[(match.group(1).split()[0].upper(), match.group(2))] += 1
        return execute(sql, params, many, context)

    def _on_connection(self, sender, connection, **kwargs) -> None:
        if self not in connection.execute_wrappers:
            connection.execute_wrappers.append(self)
            self._wrapped.append(connection)

    def __enter__(self) -> WriteCounter:
        connection_created.connect(self._on_connection, weak=False)
        return self

    def __exit__(self, *exc) -> None:
        self.active = False
        connection_created.disconnect(self._on_connection)
        for connection in self._wrapped:
            if self in connection.execute_wrappers:
                connection.execute_wrappers.remove(self)

    @property
    def writes(self) -> int:
        return sum(self.counts.values())


async def running_runtime() -> GenerationRuntime:
    runtime = GenerationRuntime()
    await runtime.start()
    return runtime


async def store_reply(runtime: GenerationRuntime, user, request):
    """What the adapters do before launching: store the reply (on a database thread)."""
    return await run_db(services.reply_start, user=user, request=request, model=runtime.provider().model)


def launch(runtime: GenerationRuntime, started) -> LiveReply:
    return runtime.launch(started.start, started.context, runtime.provider())


@pytest.mark.django_db(transaction=True)
def test_a_reply_launched_while_the_shutdown_stops_replies_has_ended_when_it_returns(user, settings):
    # A request that passed the `accepting` check just before SIGTERM launches its reply after the
    # shutdown has taken its list of running replies: it must still end (as interrupted, text kept)
    # before the process goes, not be left "streaming" for another process's reaper.
    settings.OPENAI_API_KEY = ""  # the demo model: ~60 pieces, one every 50 ms
    settings.DEMO_MODEL_DELAY_MS = 50
    request = parse_reply_request(b'{"message": "hi"}', "application/json", max_chars=100, max_bytes=1000)

    async def shut_down_with_a_late_launch() -> tuple[LiveReply, bool]:
        runtime = await running_runtime()
        first, late = await store_reply(runtime, user, request), await store_reply(runtime, user, request)
        first_reply = launch(runtime, first)
        await asyncio.sleep(0.2)
        shutdown = runtime.begin_shutdown(0.1)
        while first_reply.stop_reason is None:  # the shutdown is stopping the replies it knows
            await asyncio.sleep(0.001)
        late_reply = launch(runtime, late)  # the late request's turn
        await shutdown
        return late_reply, late_reply.task.done()  # asyncio.run would finish it on its way out

    late_reply, ended_with_the_shutdown = asyncio.run(shut_down_with_a_late_launch())
    assert ended_with_the_shutdown
    stored = Message.objects.get(pk=late_reply.id)
    assert stored.status == Message.Status.INTERRUPTED
    assert stored.content == "".join(late_reply.pieces)


@pytest.mark.django_db(transaction=True)
def test_a_reply_stopped_before_its_task_first_runs_still_stores_its_end(user, settings):
    settings.OPENAI_API_KEY = ""  # the demo model
    request = parse_reply_request(b'{"message": "hi"}', "application/json", max_chars=100, max_bytes=1000)

    async def launch_and_stop_at_once() -> LiveReply:
        runtime = await running_runtime()
        reply = launch(runtime, await store_reply(runtime, user, request))
        reply.request_stop("stopped")  # in the same step as the launch: its task has not run yet
        await reply.task
        await runtime.shutdown(0)
        return reply

    reply = asyncio.run(launch_and_stop_at_once())
    assert reply.terminal is not None and reply.terminal.payload()["status"] == "cancelled"
    assert Message.objects.get(pk=reply.id).status == Message.Status.CANCELLED


@pytest.mark.django_db(transaction=True)
def test_a_stop_after_the_model_finished_keeps_the_reply_completed(model_server, user):
    # After [DONE] the provider reads on briefly to the end of the HTTP body (to keep the connection);
    # a Stop landing then must not turn a complete reply into a "cancelled" one.
    chunks = ["all ", "of ", "it"]
    body = json.dumps({"message": scenario(chunks=chunks, end_delay_ms=2000)}).encode()
    request = parse_reply_request(body, "application/json", max_chars=10_000, max_bytes=100_000)

    async def stop_right_after_the_last_piece() -> LiveReply:
        runtime = await running_runtime()
        reply = launch(runtime, await store_reply(runtime, user, request))
        while len(reply.pieces) < len(chunks):
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.02)  # [DONE] came with the last piece; the body's end is 2 s away
        reply.request_stop("stopped")
        await reply.task
        await runtime.shutdown(0)
        return reply

    reply = asyncio.run(stop_right_after_the_last_piece())
    assert reply.terminal.payload()["status"] == "completed"
    stored = Message.objects.get(pk=reply.id)
    assert stored.status == Message.Status.COMPLETED and stored.content == "".join(chunks)


@pytest.mark.django_db(transaction=True)
def test_database_writes_are_bounded_by_duration_not_tokens(sidecar, model_server, user, settings):
    flush = settings.GENERATION_FLUSH_SECONDS
    lease = settings.GENERATION_LEASE_SECONDS
    chunks = [f"{i} " for i in range(300)]
    client = StreamService("sidecar", sidecar.url).client(user)
    with WriteCounter() as counter:
        # Settle: connections opened by earlier work are closed after each unit of work, so every
        # statement from here on runs on a connection the counter has seen opening.
        time.sleep(0.3)
        counter.active = True
        started = time.monotonic()
        result = client.send(scenario(chunks=chunks, delay_ms=5))
        duration = time.monotonic() - started
        time.sleep(2 * settings.GENERATION_POLL_SECONDS)  # anything the maintenance loop still does
        counter.active = False
    client.close()

    reply_id = result.terminal["message_id"]
    assert result.text == "".join(chunks) == Message.objects.get(pk=reply_id).content
    # The counter saw the reply's own writes (so it was installed on the runtime's connections).
    assert counter.counts[("INSERT", "ai_features_message")] == 2  # the question and the reply
    assert counter.counts[("UPDATE", "ai_features_message")] >= 1  # the reply's final row
    log_inserts = counter.counts[("INSERT", "ai_features_replychunk")]
    log_rows = ReplyChunk.objects.filter(message_id=reply_id).count()
    breakdown = ", ".join(f"{verb} {table}: {n}" for (verb, table), n in sorted(counter.counts.items()))
    print(f"\n{len(chunks)} tokens in {duration:.2f} s (flush every {flush} s): {counter.writes} writes "
          f"of {counter.statements} statements, {log_rows} log rows [{breakdown}]")

    ticks = duration / flush
    renewals = duration / (lease / 3)
    assert log_inserts == log_rows
    assert log_rows <= ticks + 2
    # Start (conversation, user message, reply, conversation touch) and end (row, last log batch)
    # are a constant; the rest grows with the flush ticks and the lease renewals, never per token.
    assert counter.writes <= ticks + renewals + 10
    assert counter.writes < len(chunks) / 10


@pytest.mark.django_db(transaction=True)
def test_resume_deep_into_a_reply_whose_last_batch_is_long(sidecar, model_server, user, settings):
    # A fast model (or a flush that fell behind) leaves more than MAX_PIECES_PER_CHUNK pieces
    # unlogged when the reply ends. A long flush interval makes that deterministic here.
    settings.GENERATION_FLUSH_SECONDS = 60
    client = StreamService("sidecar", sidecar.url).client(user)
    count = 2 * MAX_PIECES_PER_CHUNK + 88
    chunks = [f"{i} " for i in range(count)]
    live = client.send(scenario(chunks=chunks))
    assert live.text == "".join(chunks) and live.terminal["status"] == "completed"
    reply_id = live.terminal["message_id"]
    last_seen = MAX_PIECES_PER_CHUNK + 44  # the page had seen this far when it reloaded

    resumed = client.resume(reply_id, last_event_id=last_seen)
    client.close()

    assert [int(e.id) for e in resumed.events] == list(range(last_seen + 1, count + 2))
    assert "".join(chunks[:last_seen]) + resumed.text == Message.objects.get(pk=reply_id).content
