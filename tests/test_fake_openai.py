"""Tests for tests/fake_openai.py, driven only through the real ``openai`` SDK.

Run: .venv/bin/pytest tests/test_fake_openai.py -p no:django -q
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.fake_openai import FakeOpenAI, RequestRecord, scenario

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server():
    with FakeOpenAI() as srv:
        yield srv


@pytest.fixture
def srv(server):
    server.clear()
    return server


def _client(srv: FakeOpenAI, **kw) -> AsyncOpenAI:
    kw.setdefault("api_key", "test")
    return AsyncOpenAI(base_url=srv.base_url, max_retries=0, **kw)


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


async def _collect(stream) -> tuple[list, list[str]]:
    chunks, deltas = [], []
    async for chunk in stream:
        chunks.append(chunk)
        if chunk.choices and chunk.choices[0].delta.content:
            deltas.append(chunk.choices[0].delta.content)
    return chunks, deltas


def test_streamed_reply_equals_deltas(srv):
    pieces = ["Hel", "lo, ", "wörld", " 🙂", "\n\"quoted\""]

    async def go():
        async with _client(srv) as client:
            stream = await client.chat.completions.create(
                model="c3-fake", messages=_user(scenario(chunks=pieces, delay_ms=1)), stream=True
            )
            return await _collect(stream)

    chunks, deltas = asyncio.run(go())
    assert deltas == pieces
    first, last = chunks[0], chunks[-1]
    assert first.object == "chat.completion.chunk" and first.model == "c3-fake"
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert first.system_fingerprint == "fp_fake" and first.id.startswith("chatcmpl-")
    assert last.choices[0].finish_reason == "stop" and last.choices[0].delta.content is None
    assert len(chunks) == len(pieces) + 2  # role + deltas + finish; no usage unless asked
    assert all(c.usage is None for c in chunks)
    rec = srv.wait_for_requests(1)[0]
    assert rec.wait_finished(2)
    assert rec.outcome == "completed" and rec.deltas_sent == len(pieces)
    assert rec.started_at <= rec.first_byte_at <= rec.finished_at and rec.client_closed_at is None
    assert rec.body["stream"] is True and rec.headers["authorization"] == "Bearer test"


def test_default_profile_echo_and_word_split(srv):
    async def go():
        async with _client(srv) as client:
            stream = await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "#fake {}"}, {"role": "assistant", "content": "x"},
                          {"role": "user", "content": "ping  pong"}],
                stream=True,
            )
            return await _collect(stream)

    _, deltas = asyncio.run(go())
    assert deltas == ["You ", "said: ", "ping  ", "pong"]


def test_usage_chunk_when_include_usage(srv):
    async def go():
        async with _client(srv) as client:
            stream = await client.chat.completions.create(
                model="c3-fake",
                messages=[{"role": "system", "content": "be brief"},
                          {"role": "user", "content": scenario(reply="one two three", finish_reason="length")}],
                stream=True,
                stream_options={"include_usage": True},
            )
            return await _collect(stream)

    chunks, deltas = asyncio.run(go())
    assert deltas == ["one ", "two ", "three"]
    *body, finish, usage = chunks
    assert all(c.usage is None for c in body + [finish])
    assert finish.choices[0].finish_reason == "length"
    assert usage.choices == []
    # prompt: "be brief" (2) + '#fake {"reply":"one two three","finish_reason":"length"}' (4 words)
    assert usage.usage.completion_tokens == 3
    assert usage.usage.prompt_tokens == 6
    assert usage.usage.total_tokens == 9


def test_usage_false_suppresses_usage_chunk(srv):
    async def go():
        async with _client(srv) as client:
            stream = await client.chat.completions.create(
                model="c3-fake", messages=_user(scenario(reply="a b", usage=False)), stream=True,
                stream_options={"include_usage": True},
            )
            return await _collect(stream)

    chunks, _ = asyncio.run(go())
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_wire_format_and_done(srv):
    async def go():
        async with _client(srv) as client:
            async with client.chat.completions.with_streaming_response.create(
                model="c3-fake", messages=_user(scenario(chunks=["a", "b"])), stream=True,
                stream_options={"include_usage": True},
            ) as resp:
                lines = [line async for line in resp.iter_lines()]
                return resp.headers, lines

    headers, lines = asyncio.run(go())
    assert headers["content-type"] == "text/event-stream; charset=utf-8"
    assert headers["transfer-encoding"] == "chunked"
    events = [line for line in lines if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert len(events) == 1 + 2 + 1 + 1 + 1  # role, 2 deltas, finish, usage, DONE
    assert '"usage":null' in events[0] and '"choices":[]' in events[-2]


def test_non_stream_completion(srv):
    async def go():
        async with _client(srv) as client:
            return await client.chat.completions.create(
                model="gpt-4o-mini", messages=_user(scenario(reply="Hi there friend", delay_ms=1))
            )

    resp = asyncio.run(go())
    assert resp.object == "chat.completion" and resp.model == "gpt-4o-mini"
    assert resp.choices[0].message.content == "Hi there friend"
    assert resp.choices[0].message.role == "assistant" and resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens == 3 and resp.usage.total_tokens == resp.usage.prompt_tokens + 3
    assert srv.wait_for_requests(1)[0].outcome == "completed"


def test_models_and_404(srv):
    async def go():
        async with _client(srv) as client:
            models = await client.models.list()
            with pytest.raises(openai.NotFoundError) as err:
                await client.get("/nope", cast_to=object)
            return models, err.value

    models, err = asyncio.run(go())
    assert [m.id for m in models.data] == ["gpt-4o-mini", "c3-fake"]
    assert err.status_code == 404 and err.body["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("status", "exc_type"),
    [(429, openai.RateLimitError), (500, openai.InternalServerError), (400, openai.BadRequestError)],
)
def test_error_status_mapping(srv, status, exc_type):
    async def go():
        async with _client(srv) as client:
            with pytest.raises(exc_type) as err:
                stream = await client.chat.completions.create(
                    model="c3-fake", messages=_user(scenario(status=status, error_message="boom")), stream=True
                )
                await _collect(stream)
            return err.value

    err = asyncio.run(go())
    assert err.status_code == status
    assert err.body["message"] == "boom" and set(err.body) == {"message", "type", "param", "code"}
    if status == 429:
        assert err.response.headers["retry-after"] == "1"
        assert err.code == "rate_limit_exceeded"
    rec = srv.wait_for_requests(1)[0]
    assert rec.wait_finished(2) and rec.outcome == "error_status"


def test_api_key_401():
    with FakeOpenAI(api_key="sekret") as srv:
        async def go():
            async with _client(srv, api_key="wrong") as bad:
                with pytest.raises(openai.AuthenticationError) as err:
                    await bad.chat.completions.create(model="c3-fake", messages=_user("hi"))
            async with _client(srv, api_key="sekret") as good:
                ok = await good.chat.completions.create(model="c3-fake", messages=_user("hi"))
            return err.value, ok

        err, ok = asyncio.run(go())
        assert err.status_code == 401 and err.code == "invalid_api_key"
        assert ok.choices[0].message.content == "You said: hi"
        assert [r.outcome for r in srv.requests] == ["error_status", "completed"]


def test_drop_after_raises_mid_stream(srv):
    async def go():
        got = []
        async with _client(srv) as client:
            stream = await client.chat.completions.create(
                model="c3-fake", messages=_user(scenario(reply="a b c d e f", drop_after=3)), stream=True
            )
            with pytest.raises(openai.APIConnectionError):
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        got.append(chunk.choices[0].delta.content)
        return got

    assert asyncio.run(go()) == ["a ", "b ", "c "]
    rec = srv.wait_for_requests(1)[0]
    assert rec.wait_finished(2) and rec.outcome == "dropped" and rec.deltas_sent == 3


@pytest.mark.parametrize("directive", [dict(hang=True, chunks=["x"]), dict(reply="a b c", delay_ms=5000)])
def test_client_close_is_recorded_promptly(srv, directive):
    async def go():
        async with _client(srv) as client:
            stream = await client.chat.completions.create(
                model="c3-fake", messages=_user(scenario(**directive)), stream=True
            )
            it = stream.__aiter__()
            await it.__anext__()  # role chunk
            await it.__anext__()  # first delta; the server now sleeps / hangs
            await asyncio.sleep(0.05)
            closed_at = time.monotonic()
            await stream.close()
            return closed_at

    closed_at = asyncio.run(go())
    rec = srv.wait_for_requests(1)[0]
    assert rec.wait_closed(2)
    assert rec.outcome == "client_closed" and rec.deltas_sent == 1
    assert 0 <= rec.client_closed_at - closed_at < 0.1
    assert rec.finished_at is not None


def test_keep_alive_reuses_connection(srv):
    async def go():
        async with _client(srv) as client:
            stream = await client.chat.completions.create(model="c3-fake", messages=_user("one"), stream=True)
            _, d1 = await _collect(stream)
            r2 = await client.chat.completions.create(model="c3-fake", messages=_user("two"))
            stream = await client.chat.completions.create(model="c3-fake", messages=_user("three"), stream=True)
            _, d3 = await _collect(stream)
            return "".join(d1), r2.choices[0].message.content, "".join(d3)

    assert asyncio.run(go()) == ("You said: one", "You said: two", "You said: three")
    recs = srv.wait_for_requests(3)
    assert len({r.conn_id for r in recs}) == 1


def test_connection_close_header_honoured(srv):
    async def go():
        async with _client(srv, default_headers={"Connection": "close"}) as client:
            for text in ("a", "b"):
                await client.chat.completions.create(model="c3-fake", messages=_user(text))

    asyncio.run(go())
    recs = srv.wait_for_requests(2)
    assert recs[0].conn_id != recs[1].conn_id


def test_silent_profile_and_helpers():
    with FakeOpenAI(profile="silent") as srv:
        async def go():
            async with _client(srv) as client:
                stream = await client.chat.completions.create(model="c3-fake", messages=_user("hi"), stream=True)
                first = await stream.__aiter__().__anext__()
                rec = srv.wait_for_requests(1)[0]
                assert not rec.wait_finished(0.05)
                await stream.close()
                return first, rec

        first, rec = asyncio.run(go())
        assert first.choices[0].delta.role == "assistant"
        assert rec.wait_closed(2) and isinstance(rec, RequestRecord)
        with pytest.raises(TimeoutError):
            srv.wait_for_requests(2, timeout=0.05)


def test_cli_ready_and_serves():
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_openai", "--host", "127.0.0.1", "--port", "0",
         "--profile", "instant", "--api-key", "k"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY "), (line, proc.stderr.read() if proc.poll() is not None else "")
        port = int(line.split()[1])
        with OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0) as client:
            stream = client.chat.completions.create(model="c3-fake", messages=_user("x"), stream=True)
            deltas = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
        assert len(deltas) == 64 and all(len(d.encode()) == 16 for d in deltas)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_200_concurrent_streams(srv):
    n = 200

    async def one(client, i):
        stream = await client.chat.completions.create(
            model="c3-fake",
            messages=_user(scenario(reply=" ".join(f"s{i}w{j}" for j in range(20)), delay_ms=5, jitter=0.3)),
            stream=True, stream_options={"include_usage": True},
        )
        chunks, deltas = await _collect(stream)
        return i, "".join(deltas), chunks[-1].usage.completion_tokens

    async def go():
        async with _client(srv) as client:
            return await asyncio.gather(*(one(client, i) for i in range(n)))

    t0 = time.monotonic()
    results = asyncio.run(go())
    assert time.monotonic() - t0 < 8
    for i, text, c in results:
        assert text == " ".join(f"s{i}w{j}" for j in range(20)) and c == 20
    recs = srv.wait_for_requests(n)
    assert all(r.wait_finished(2) for r in recs)
    assert sum(r.outcome == "completed" for r in recs) == n
