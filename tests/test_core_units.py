"""The pure pieces of the streaming core, on their own: the SSE encoder, request validation,
terminal events and the demo model."""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus

import pytest

from ai_features.streaming.events import ContentEvent, ReplyOutcome, StartEvent
from ai_features.streaming.providers import DemoProvider
from ai_features.streaming.sse import HEARTBEAT, SSE_HEADERS, encode_event, encode_payload, sse_bytes
from ai_features.streaming.validation import ApiError, parse_last_event_id, parse_reply_request
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


@pytest.mark.parametrize("raw", ["abc", "-1", "1.5"])
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
