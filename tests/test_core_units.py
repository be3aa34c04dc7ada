"""The pure pieces of the streaming core, on their own: the SSE encoder, request validation,
terminal events and the demo model."""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus

import pytest

from ai_features.streaming.events import ContentEvent, ReplyOutcome, StartEvent
from ai_features.streaming.providers import DemoProvider, OpenAIProvider
from ai_features.streaming.sse import HEARTBEAT, SSE_HEADERS, encode_event, encode_payload, sse_bytes
from ai_features.streaming.validation import ApiError, parse_last_event_id, parse_reply_request
from tests.fake_openai import FakeOpenAI, scenario
from tests.sse_client import parse_all


def test_an_event_is_one_id_line_and_one_data_line():
    encoded = encode_event(ContentEvent(7, "line one\nline two \u2028 \"quoted\" 🙂"))
    lines = encoded.decode().split("\n")
    assert lines[0] == "id: 7"
    assert lines[1].startswith("data: ")
    assert lines[2:] == ["", ""]
    assert json.loads(lines[1][6:]) == {"type": "content", "content": "line one\nline two \u2028 \"quoted\" 🙂"}


@pytest.mark.parametrize(
    "text",
    ["plain", "line\nbreak\r\ttab", 'quote " and \\ backslash', "\x00\x1f\x7f controls", "\u2028\u2029 separators",
     "日本語 🙂 </script> é"],
)
def test_the_fast_content_encoding_is_byte_for_byte_the_generic_one(text):
    event = ContentEvent(3, text)
    assert encode_event(event) == f"id: 3\ndata: {encode_payload(event)}\n\n".encode()


def test_encoded_events_parse_back_even_when_split_byte_by_byte():
    events = [StartEvent(1, 2, 3), ContentEvent(1, "日本語 🙂"), ReplyOutcome(3, "completed", "m").terminal_event(2)]
    wire = b"".join(encode_event(e) for e in events) + HEARTBEAT
    parser = parse_all(wire[i : i + 1] for i in range(len(wire)))
    assert [e.json["type"] for e in parser.events] == ["start", "content", "done"]
    assert [e.id for e in parser.events] == ["0", "1", "2"]
    assert parser.events[1].json["content"] == "日本語 🙂"
    assert parser.comments == ["ping"]


def test_sse_headers_forbid_buffering_and_caching():
    assert SSE_HEADERS["Content-Type"].startswith("text/event-stream")
    assert SSE_HEADERS["Cache-Control"] == "no-cache"
    assert SSE_HEADERS["X-Accel-Buffering"] == "no"


def test_an_empty_batch_becomes_a_heartbeat_comment_and_a_batch_one_write():
    async def watcher():
        yield []
        yield [ContentEvent(1, "x"), ContentEvent(2, "y")]

    async def collect():
        return [chunk async for chunk in sse_bytes(watcher())]

    chunks = asyncio.run(collect())
    assert chunks[0] == b": ping\n\n"
    assert chunks[1] == encode_event(ContentEvent(1, "x")) + encode_event(ContentEvent(2, "y"))
    assert [e.json["content"] for e in parse_all([chunks[1]]).events] == ["x", "y"]


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        (ReplyOutcome(9, "completed", "m", 3, 4), {"type": "done", "status": "completed", "usage": {"prompt_tokens": 3, "completion_tokens": 4}}),
        (ReplyOutcome(9, "cancelled", "m", None, 2), {"type": "done", "status": "cancelled"}),
        (ReplyOutcome(9, "interrupted"), {"type": "error", "code": "interrupted"}),
        (ReplyOutcome(9, "error", error_code="upstream_auth", error_message="nope"), {"type": "error", "code": "upstream_auth", "content": "nope"}),
    ],
)
def test_terminal_events_follow_the_stored_outcome(outcome, expected):
    payload = outcome.terminal_event(5).payload()
    assert payload.items() >= expected.items()
    assert payload["content"] is not None


def parse(body, content_type="application/json"):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_reply_request(raw, content_type, max_chars=10, max_bytes=200)


def test_a_valid_request_is_parsed_with_defaults():
    request = parse({"message": "hi"})
    assert (request.message, request.include_history, request.conversation_id, request.client_message_id) == (
        "hi", True, None, None
    )
    assert parse({"message": "hi"}, "Application/JSON; charset=utf-8").message == "hi"


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        ({"message": "hi"}, "text/plain", HTTPStatus.UNSUPPORTED_MEDIA_TYPE),
        ({"message": "hi"}, None, HTTPStatus.UNSUPPORTED_MEDIA_TYPE),
        ({"message": "hi"}, "application/x-www-form-urlencoded", HTTPStatus.UNSUPPORTED_MEDIA_TYPE),
        (b"\xff\xfe", "application/json", HTTPStatus.BAD_REQUEST),
        (b"null", "application/json", HTTPStatus.BAD_REQUEST),
        ({"message": "x" * 11}, "application/json", HTTPStatus.BAD_REQUEST),
        ({"message": "hi", "conversation_id": 0}, "application/json", HTTPStatus.NOT_FOUND),
        ({"message": "hi", "client_message_id": ""}, "application/json", HTTPStatus.BAD_REQUEST),
        ({"message": "y" * 300}, "application/json", HTTPStatus.REQUEST_ENTITY_TOO_LARGE),
    ],
)
def test_bad_requests_raise_api_errors(body, content_type, status):
    with pytest.raises(ApiError) as error:
        parse(body, content_type)
    assert error.value.status == status
    assert error.value.body()["error"]


@pytest.mark.parametrize(("raw", "after"), [(None, -1), ("", -1), ("0", 0), (" 12 ", 12)])
def test_last_event_id(raw, after):
    assert parse_last_event_id(raw) == after


@pytest.mark.parametrize("raw", ["abc", "-1", "1.5", "+1", "1_0", "١٢", "0x10"])
def test_a_bad_last_event_id_is_a_400(raw):
    with pytest.raises(ApiError) as error:
        parse_last_event_id(raw)
    assert error.value.status == HTTPStatus.BAD_REQUEST


def test_the_demo_model_streams_many_pieces_and_reports_usage():
    async def run():
        return [d async for d in DemoProvider(delay_seconds=0).stream([{"role": "user", "content": "hello"}])]

    deltas = asyncio.run(run())
    text = "".join(d.text for d in deltas)
    assert "offline demo model" in text and "hello" in text and "```python" in text
    assert len([d for d in deltas if d.text]) > 50
    assert deltas[-1].finished and deltas[-1].completion_tokens == len([d for d in deltas if d.text])


# --- Waking the watchers of a live reply ----------------------------------------------------------


def test_a_watcher_misses_no_piece_and_one_that_left_does_not_stop_the_others():
    """What arrives while a watcher is busy sending (after it looked at the version) wakes it at
    once; a watcher cancelled while waiting (its client went away) lets go of its future at once,
    and the next piece still reaches everyone else."""
    from ai_features.streaming.runtime import LiveReply

    async def run() -> list[str]:
        reply = LiveReply(start=StartEvent(1, 2, 3), model="m")
        seen = reply.version
        reply.append("a")  # arrives while the watcher is busy
        await asyncio.wait_for(reply.changed_since(seen), 1)  # returns at once

        leaving = asyncio.create_task(reply.changed_since(reply.version))
        staying = asyncio.create_task(reply.changed_since(reply.version))
        await asyncio.sleep(0)
        assert not leaving.done() and not staying.done()  # nothing new: they wait
        leaving.cancel()
        await asyncio.sleep(0)
        assert leaving.cancelled() and len(reply.waiters) == 1  # only the one still waiting
        reply.append("b")
        await asyncio.wait_for(staying, 1)
        assert reply.waiters == []
        return reply.pieces

    assert asyncio.run(run()) == ["a", "b"]


# --- The provider's reading of the model's stream --------------------------------------------------


def _data_lines(reads: list[bytes]) -> list[bytes]:
    from ai_features.streaming.providers import _sse_data

    async def chunks():
        for read in reads:
            yield read

    async def collect():
        return [payload async for payload in _sse_data(chunks())]

    return asyncio.run(collect())


@pytest.mark.parametrize(
    "reads",
    [
        [b'data: {"a":1}\n\ndata: {"a":2}\n\ndata: [DONE]\n\n'],
        [b'data: {"a":1}\r\n\r\ndata: {"a":2}\r', b'\n\r\ndata: [DONE]\r\n\r\n'],  # CRLF split between reads
        [b'data: {"a":1}\r\rdata: {"a":2}\r\r', b"data: [DONE]\r\r"],  # bare CR, valid SSE
        [b'data: {"a"', b":1}\n", b'\n: comment\nevent: x\ndata: {"a":2}\n\ndata: [DONE]'],  # no final break
    ],
)
def test_data_lines_are_found_whatever_the_line_ends_and_read_boundaries(reads):
    assert _data_lines(reads) == [b'{"a":1}', b'{"a":2}', b"[DONE]"]


def test_a_chunk_with_half_a_character_is_read_with_the_half_kept_for_the_next_delta():
    from ai_features.streaming.providers import _parse_chunk

    assert _parse_chunk(b'{"t": "caf\xc3"}') == ({"t": "caf\udcc3"}, "bytes")  # half of "é", as surrogateescape
    assert _parse_chunk(b'{"t": "\\ud83d"}') == ({"t": "\ud83d"}, "escapes")  # half of an emoji's UTF-16 pair
    assert _parse_chunk(b'{"t": "caf\xc3\xa9"}') == ({"t": "caf\u00e9"}, None)


def test_a_model_server_that_never_accepts_the_connection_is_a_timeout_not_a_disconnect():
    """The SDK's aiohttp transport reports refused connections and connect timeouts alike as
    ConnectTimeout; the provider must still tell them apart. A listener whose accept queue is full
    drops new SYNs, so the connection attempt really times out."""
    import socket

    from ai_features.streaming.providers import OpenAIProvider, ProviderError

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):  # fill the accept queue (never accepted)
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)

    async def attempt():
        provider = OpenAIProvider(api_key="k", base_url=f"http://127.0.0.1:{port}/v1", model="m", timeout_seconds=0.5)
        try:
            async for _ in provider.stream([{"role": "user", "content": "hi"}]):
                pass
        finally:
            await provider.aclose()

    try:
        with pytest.raises(ProviderError) as raised:
            asyncio.run(attempt())
    finally:
        for sock in [*fillers, listener]:
            sock.close()
    assert raised.value.code == "upstream_timeout"


def test_the_model_server_gets_the_sdks_request_with_the_whole_context():
    with FakeOpenAI(api_key="k") as server:
        context = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Ça va? \u2028 \"quoted\" \\ 😀"},
            {"role": "assistant", "content": "Oui."},
            {"role": "user", "content": "hi"},
        ]

        async def one_reply() -> str:
            provider = OpenAIProvider(api_key="k", base_url=server.base_url, model="gpt-4o-mini", timeout_seconds=5)
            try:
                return "".join([d.text async for d in provider.stream(context)])
            finally:
                await provider.aclose()

        assert asyncio.run(one_reply())
        (request,) = server.wait_for_requests(1)
    assert request.path == "/v1/chat/completions"
    assert request.body == {"model": "gpt-4o-mini", "messages": context, "stream": True,
                            "stream_options": {"include_usage": True}}
    assert request.headers["content-type"] == "application/json"
    assert request.headers["authorization"] == "Bearer k"
    assert request.headers["user-agent"].startswith("AsyncOpenAI/Python")


@pytest.mark.parametrize("end_delay_ms", [0, 30])
def test_the_upstream_connection_is_reused_even_when_the_body_ends_after_done(end_delay_ms):
    # After [DONE] the provider reads on (briefly) to the end of the chunked body, so the pooled
    # HTTP/1.1 connection is kept for the next reply instead of being closed and opened again.
    with FakeOpenAI() as server:
        async def two_replies() -> list[str]:
            provider = OpenAIProvider(api_key="k", base_url=server.base_url, model="m", timeout_seconds=5)
            texts = []
            for _ in range(2):
                message = [{"role": "user", "content": scenario(chunks=["a", "b"], end_delay_ms=end_delay_ms)}]
                texts.append("".join([d.text async for d in provider.stream(message)]))
            await provider.aclose()
            return texts

        assert asyncio.run(two_replies()) == ["ab", "ab"]
        first, second = server.wait_for_requests(2)
    assert first.conn_id == second.conn_id


@pytest.mark.parametrize("encoding", ["gzip", "identity", None])
def test_a_reply_is_read_whether_or_not_the_model_server_compresses_it(encoding):
    """The SDK's client accepts gzip, and a proxy in front of a model server may use it: the stream
    is then one gzip stream, flushed after every event, in chunks of HTTP/1.1 chunked encoding. The
    provider reads the decoded bytes (it must not, say, split the compressed ones into lines)."""
    import zlib

    from ai_features.streaming.providers import OpenAIProvider

    events = [
        b'data: {"choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n',
        b'data: {"choices":[{"index":0,"delta":{"content":"lo \xc3\xa9"}}]}\n\n',
        b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n',
        b"data: [DONE]\n\n",
    ]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        await reader.readexactly(length)
        header = b"" if encoding is None else b"Content-Encoding: " + encoding.encode() + b"\r\n"
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" + header + b"Transfer-Encoding: chunked\r\n\r\n")
        compressor = zlib.compressobj(wbits=31)  # gzip framing
        for event in events:
            data = compressor.compress(event) + compressor.flush(zlib.Z_SYNC_FLUSH) if encoding == "gzip" else event
            writer.write(b"%x\r\n%b\r\n" % (len(data), data))
            await writer.drain()
        if encoding == "gzip":
            tail = compressor.flush()
            writer.write(b"%x\r\n%b\r\n" % (len(tail), tail))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def one_reply():
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        provider = OpenAIProvider(api_key="k", base_url=f"http://127.0.0.1:{port}/v1", model="m", timeout_seconds=5)
        try:
            return [delta async for delta in provider.stream([{"role": "user", "content": "hi"}])]
        finally:
            await provider.aclose()
            server.close()

    deltas = asyncio.run(one_reply())
    assert "".join(d.text for d in deltas) == "Hello é"
    assert any(d.prompt_tokens == 3 and d.completion_tokens == 2 for d in deltas)
    assert deltas[-1].finished


@pytest.mark.parametrize(
    ("location", "status"),
    [(("path", "message_id"), HTTPStatus.NOT_FOUND), (("body", "message"), HTTPStatus.BAD_REQUEST)],
)
def test_the_sidecars_validation_errors_are_json(location, status):
    from fastapi.exceptions import RequestValidationError

    from asgi_stream import invalid_request

    error = RequestValidationError([{"loc": location, "msg": "bad", "type": "value_error"}])
    answer = asyncio.run(invalid_request(None, error))
    assert answer.status_code == status
    assert json.loads(answer.body)["error"]
