"""The stream contract of shared/API.md, run against both adapters over real HTTP: the FastAPI
sidecar under uvicorn and Django's fallback under a WSGI server. The model is the local
OpenAI-compatible server, reached through the real openai SDK."""

from __future__ import annotations

import json
import logging
import socket
import time
import weakref
from http import HTTPStatus

import pytest
from django.utils import timezone

from ai_features.models import Conversation, Message, ReplyChunk
from tests.conftest import StreamService, wait_until
from tests.fake_openai import scenario

pytestmark = pytest.mark.django_db(transaction=True)


def stored_counts() -> tuple[int, int]:
    return Conversation.objects.count(), Message.objects.count()


# --- The happy path -----------------------------------------------------------------------------------


def test_streams_a_reply_as_sse_and_stores_it(stream_service, model_server, user):
    client = stream_service.client(user)

    result = client.send(scenario(chunks=["Hel", "lo", ", wor", "ld!"]))

    assert result.status == HTTPStatus.OK
    assert result.headers["content-type"].startswith("text/event-stream")
    assert result.headers["cache-control"] == "no-cache"
    assert result.headers["x-accel-buffering"] == "no"
    assert "content-encoding" not in result.headers
    types = [p["type"] for p in result.payloads]
    assert types == ["start", "content", "content", "content", "content", "done"]
    assert [e.id for e in result.events] == ["0", "1", "2", "3", "4", "5"]
    assert all(set(p) >= {"type", "content"} for p in result.payloads)
    assert all(e.event is None for e in result.events)
    assert result.text == "Hello, world!"

    start, done = result.payloads[0], result.terminal
    assert done["status"] == "completed"
    assert done["model"] == "gpt-4o-mini"
    assert done["usage"]["completion_tokens"] == 4
    assert done["usage"]["prompt_tokens"] > 0

    reply = Message.objects.get(pk=start["assistant_message_id"])
    assert done["message_id"] == reply.pk
    assert reply.content == result.text
    assert reply.status == Message.Status.COMPLETED
    assert reply.conversation_id == start["conversation_id"]
    assert reply.completion_tokens == 4 and reply.prompt_tokens == done["usage"]["prompt_tokens"]
    assert reply.ttft_ms is not None and reply.duration_ms is not None and reply.duration_ms >= reply.ttft_ms
    question = Message.objects.get(pk=start["user_message_id"])
    assert question.role == Message.Role.USER and question.user == user
    assert model_server.requests[-1].body["stream"] is True
    assert model_server.requests[-1].body["stream_options"] == {"include_usage": True}


def test_cookie_session_works_on_both_services(stream_service, model_server, user):
    client = stream_service.client(user, auth="cookie")
    result = client.send("hello by cookie")
    assert result.status == HTTPStatus.OK
    assert result.terminal["status"] == "completed"
    assert result.text == "You said: hello by cookie"


def test_stream_token_works_on_both_services(stream_service, model_server, user):
    client = stream_service.client(user, auth="token")
    result = client.send("hello by token")
    assert result.status == HTTPStatus.OK
    assert result.text == "You said: hello by token"


def test_multibyte_text_survives_intact(stream_service, model_server, user):
    pieces = ["日本", "語 и ", "кириллица ", "한국어 ", "🙂👍🏽", "\n```py\nprint('x')\n```"]
    result = stream_service.client(user).send(scenario(chunks=pieces))
    assert result.text == "".join(pieces)
    assert Message.objects.get(pk=result.terminal["message_id"]).content == "".join(pieces)


@pytest.mark.parametrize(
    ("pieces", "expected"),
    [
        # PostgreSQL refuses NUL in text and jsonb.
        (["before ", "a\x00b", " after"], "before a\ufffdb after"),
        # Half of an emoji's UTF-16 pair, as a JSON escape (\ud83d), with no other half to join:
        # no UTF-8 text can hold it.
        (["smile ", "\ud83d", " done"], "smile \ufffd done"),
    ],
    ids=["nul", "lone-surrogate"],
)
def test_model_text_no_database_can_store_is_replaced_not_fatal(stream_service, model_server, user, pieces, expected):
    # The reply must still stream, be logged, be stored and replay the same.
    streams_stores_and_replays(stream_service, user, scenario(chunks=pieces), expected)


def streams_stores_and_replays(stream_service, user, message: str, expected: str) -> None:
    """The reply to `message` completes with the text `expected`, live, stored and replayed."""
    result = stream_service.client(user).send(message)
    assert result.terminal["type"] == "done" and result.terminal["status"] == "completed"
    assert result.text == expected
    assert Message.objects.get(pk=result.terminal["message_id"]).content == result.text
    replayed = stream_service.client(user).resume(result.terminal["message_id"], last_event_id=None)
    assert replayed.text == result.text


def hexes(*parts: str | bytes) -> list[str]:
    return [(part.encode() if isinstance(part, str) else part).hex() for part in parts]


@pytest.mark.parametrize(
    ("deltas", "expected"),
    [
        # An emoji's UTF-16 pair cut between two deltas, each half a JSON escape (as JavaScript's
        # JSON.stringify writes a lone half).
        ({"chunks": ["smile ", "\ud83d", "\ude00", " done"]}, "smile \U0001f600 done"),
        # A character's UTF-8 bytes cut between two events: each event's JSON is invalid UTF-8.
        ({"chunks_hex": hexes("smile ", b"\xf0\x9f", b"\x98\x80 done")}, "smile \U0001f600 done"),
        ({"chunks_hex": hexes(b"caf\xc3", b"\xa9 ", b"\xe6\x97", b"\xa5\xe6\x9c\xac")}, "café 日本"),
        # What cannot be joined becomes U+FFFD, as before: a sequence the next delta does not
        # finish, and one the reply ends in the middle of.
        ({"chunks_hex": hexes(b"caf\xc3", " ok")}, "caf\ufffd ok"),
        ({"chunks_hex": hexes("end ", b"\xf0\x9f")}, "end \ufffd"),
    ],
    ids=["utf16-pair", "utf8-emoji", "utf8-several", "utf8-unfinished", "utf8-cut-at-the-end"],
)
def test_a_character_the_model_server_split_between_deltas_arrives_whole(stream_service, model_server, user,
                                                                          deltas, expected):
    streams_stores_and_replays(stream_service, user, scenario(**deltas), expected)


def test_continuing_a_conversation_sends_history_in_order(stream_service, model_server, user, settings):
    settings.SYSTEM_PROMPT = "Be brief."
    settings.MAX_CHAT_HISTORY = 3
    client = stream_service.client(user)
    first = client.send("one")
    conversation_id = first.payloads[0]["conversation_id"]
    client.send("two", conversation_id=conversation_id)

    third = client.send("three", conversation_id=conversation_id)

    assert third.payloads[0]["conversation_id"] == conversation_id
    sent = model_server.requests[-1].body["messages"]
    assert sent[0] == {"role": "system", "content": "Be brief."}
    # The 3 most recent earlier messages, oldest first, then the new one.
    assert [m["content"] for m in sent[1:]] == ["You said: one", "two", "You said: two", "three"]
    assert [m["role"] for m in sent[1:]] == ["assistant", "user", "assistant", "user"]


def test_include_history_false_sends_only_the_new_message(stream_service, model_server, user, settings):
    settings.SYSTEM_PROMPT = ""
    client = stream_service.client(user)
    first = client.send("one")
    client.send("two", conversation_id=first.payloads[0]["conversation_id"], include_history=False)
    assert model_server.requests[-1].body["messages"] == [{"role": "user", "content": "two"}]


def test_partial_replies_count_as_history(stream_service, model_server, user, settings):
    settings.SYSTEM_PROMPT = ""
    client = stream_service.client(user)
    failed = client.send(scenario(chunks=["half ", "an ", "answer"], drop_after=2))
    assert failed.terminal["type"] == "error"
    client.send("again", conversation_id=failed.payloads[0]["conversation_id"])
    contents = [m["content"] for m in model_server.requests[-1].body["messages"]]
    assert contents[-2:] == ["half an ", "again"]


def test_heartbeat_comments_while_the_model_is_silent(stream_service, model_server, user, settings):
    settings.STREAM_HEARTBEAT_SECONDS = 0.2
    result = stream_service.client(user).send(scenario(chunks=["slow"], first_delay_ms=900))
    assert "ping" in result.comments
    assert result.raw.count(b": ping\n\n") >= 2
    assert result.text == "slow"


def test_idempotent_retry_streams_the_first_reply_and_stores_nothing_new(stream_service, model_server, user):
    client = stream_service.client(user)
    first = client.send(scenario(chunks=["only ", "once"]), client_message_id="abc-123")
    counts = stored_counts()

    again = client.send(scenario(chunks=["only ", "once"]), client_message_id="abc-123")

    assert stored_counts() == counts
    assert again.payloads == first.payloads
    assert len(model_server.requests) == 1


def test_a_retry_whose_first_reply_was_deleted_is_a_409_and_stores_nothing(stream_service, model_server, user):
    client = stream_service.client(user)
    first = client.send("once", client_message_id="deleted-reply")
    Message.objects.filter(pk=first.terminal["message_id"]).delete()
    counts = stored_counts()

    again = client.send("once", client_message_id="deleted-reply")

    assert again.status == HTTPStatus.CONFLICT
    assert again.headers["content-type"].startswith("application/json")
    assert "client_message_id" in again.json["error"]
    assert stored_counts() == counts
    assert len(model_server.requests) == 1


def test_the_same_client_message_id_of_another_user_is_independent(stream_service, model_server, user, other_user):
    stream_service.client(user).send("mine", client_message_id="same-key")
    theirs = stream_service.client(other_user).send("theirs", client_message_id="same-key")
    assert theirs.text == "You said: theirs"


# --- Errors before any byte -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"{not json", HTTPStatus.BAD_REQUEST),
        (b"[1, 2]", HTTPStatus.BAD_REQUEST),
        ({}, HTTPStatus.BAD_REQUEST),
        ({"message": ""}, HTTPStatus.BAD_REQUEST),
        ({"message": "   \n\t "}, HTTPStatus.BAD_REQUEST),
        ({"message": 42}, HTTPStatus.BAD_REQUEST),
        ({"message": "hi", "include_history": "yes"}, HTTPStatus.BAD_REQUEST),
        ({"message": "hi", "conversation_id": "7"}, HTTPStatus.BAD_REQUEST),
        ({"message": "hi", "conversation_id": True}, HTTPStatus.BAD_REQUEST),
        ({"message": "hi", "client_message_id": 5}, HTTPStatus.BAD_REQUEST),
        ({"message": "a\x00b"}, HTTPStatus.BAD_REQUEST),  # PostgreSQL cannot store NUL in text
        ({"message": "hi", "client_message_id": "id\x00"}, HTTPStatus.BAD_REQUEST),
        # Half a surrogate pair, escaped as a browser's JSON.stringify does: it has no UTF-8 form.
        (json.dumps({"message": "half an emoji \ud83d"}).encode(), HTTPStatus.BAD_REQUEST),
        (json.dumps({"message": "hi", "client_message_id": "id\udc00"}).encode(), HTTPStatus.BAD_REQUEST),
        ({"message": "hi", "conversation_id": 999999}, HTTPStatus.NOT_FOUND),
        # Small bodies that json.loads refuses with a bare ValueError or a RecursionError.
        (b'{"message": "hi", "conversation_id": ' + b"1" * 5000 + b"}", HTTPStatus.BAD_REQUEST),
        (b'{"message": "hi", "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", HTTPStatus.BAD_REQUEST),
    ],
)
def test_bad_requests_get_a_json_error_and_store_nothing(stream_service, model_server, user, body, expected):
    client = stream_service.client(user)
    result = client.send(body=body)
    assert result.status == expected
    assert result.headers["content-type"].startswith("application/json")
    assert isinstance(result.json["error"], str) and result.json["error"]
    assert stored_counts() == (0, 0)
    assert model_server.requests == []


def test_a_message_over_the_limit_is_rejected(stream_service, model_server, user, settings):
    settings.MAX_MESSAGE_CHARS = 50
    result = stream_service.client(user).send("x" * 51)
    assert result.status == HTTPStatus.BAD_REQUEST
    assert "50" in result.json["error"]
    assert stored_counts() == (0, 0)


def test_an_oversized_body_is_413(stream_service, model_server, user, settings):
    settings.MAX_REQUEST_BYTES = 1000
    result = stream_service.client(user).send(body=json.dumps({"message": "y" * 5000}))
    assert result.status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    assert stored_counts() == (0, 0)


def test_a_body_past_djangos_upload_limit_is_a_413_json_error(stream_service, model_server, user, settings):
    # The fallback reads request.body, which Django refuses past DATA_UPLOAD_MAX_MEMORY_SIZE with an
    # HTML 400 of its own; both adapters answer 413 JSON.
    settings.MAX_REQUEST_BYTES = 1000
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 500
    result = stream_service.client(user).send(body=json.dumps({"message": "y" * 5000}))
    assert result.status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    assert result.headers["content-type"].startswith("application/json")
    assert result.json["error"]
    assert stored_counts() == (0, 0)


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/api/ai/chat/stream/", HTTPStatus.METHOD_NOT_ALLOWED),
        ("PUT", "/api/ai/chat/stream/1/stop/", HTTPStatus.METHOD_NOT_ALLOWED),
        ("GET", "/api/ai/chat/stream/abc/", HTTPStatus.NOT_FOUND),
        ("GET", "/api/ai/chat/stream/1/nothing-here/", HTTPStatus.NOT_FOUND),
    ],
)
def test_a_wrong_method_or_path_is_a_json_error(stream_service, user, method, path, expected):
    result = stream_service.client(user).collect(method, path)
    assert result.status == expected
    assert result.headers["content-type"].startswith("application/json")
    assert isinstance(result.json["error"], str) and result.json["error"]
    if expected == HTTPStatus.METHOD_NOT_ALLOWED:
        assert "POST" in result.headers["allow"]


def test_a_non_json_content_type_is_415(stream_service, model_server, user):
    client = stream_service.client(user)
    result = client.collect("POST", "/api/ai/chat/stream/", content=b'{"message": "hi"}',
                            headers={"Content-Type": "text/plain"})
    assert result.status == HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    assert "error" in result.json
    assert stored_counts() == (0, 0)


def test_anonymous_and_bad_tokens_are_401(stream_service, model_server, user):
    anonymous = stream_service.client(None)
    assert anonymous.send("hi").status == HTTPStatus.UNAUTHORIZED
    forged = anonymous.collect("POST", "/api/ai/chat/stream/", json={"message": "hi"},
                               headers={"Authorization": "Bearer not-a-token"})
    assert forged.status == HTTPStatus.UNAUTHORIZED
    assert "error" in forged.json
    assert stored_counts()[1] == 0


def test_an_anonymous_caller_is_401_whatever_is_wrong_with_the_body(stream_service, model_server, user, settings):
    # The sidecar checks the caller in the same unit of database work that stores the reply; the
    # body's own errors must still not be reported to someone who is not logged in.
    settings.MAX_REQUEST_BYTES = 1000
    anonymous = stream_service.client(None)
    for body, content_type in [
        (json.dumps({"message": "y" * 5000}).encode(), "application/json"),  # else 413
        (b'{"message": "hi"}', "text/plain"),  # else 415
        (b"{not json", "application/json"),  # else 400
    ]:
        result = anonymous.collect("POST", "/api/ai/chat/stream/", content=body, headers={"Content-Type": content_type})
        assert result.status == HTTPStatus.UNAUTHORIZED, content_type
        assert "error" in result.json
    assert stored_counts() == (0, 0)
    assert model_server.requests == []


def test_the_sidecar_refuses_a_foreign_origin_before_it_asks_who_is_calling(sidecar, model_server):
    anonymous = StreamService("sidecar", sidecar.url).client(None)
    result = anonymous.collect("POST", "/api/ai/chat/stream/", json={"message": "hi"},
                               headers={"Origin": "https://evil.example"})
    assert result.status == HTTPStatus.FORBIDDEN
    assert stored_counts() == (0, 0)


def test_a_client_that_leaves_in_the_middle_of_its_body_is_not_a_server_error(sidecar, model_server, user, caplog):
    # uvicorn's own logger does not propagate to the root logger that caplog listens on.
    server_log = logging.getLogger("uvicorn.error")
    server_log.addHandler(caplog.handler)
    try:
        with socket.create_connection(("127.0.0.1", sidecar.port)) as sock:
            sock.sendall(
                b"POST /api/ai/chat/stream/ HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer not-a-token\r\n"
                b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n" + b'{"message": "half'
            )
            time.sleep(0.2)  # the sidecar is now reading the body
        time.sleep(0.3)
        assert StreamService("sidecar", sidecar.url).client(user).send("still here").status == HTTPStatus.OK
    finally:
        server_log.removeHandler(caplog.handler)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert stored_counts() == (1, 2)  # only "still here" and its reply


def test_a_foreign_origin_is_403_and_changes_nothing(stream_service, model_server, user):
    for auth in ("cookie", "token"):
        client = stream_service.client(user, auth=auth)
        result = client.collect(
            "POST", "/api/ai/chat/stream/", json={"message": "hi"}, headers={"Origin": "https://evil.example"}
        )
        assert result.status == HTTPStatus.FORBIDDEN, auth
        assert "error" in result.json
    assert stored_counts() == (0, 0)


def test_someone_elses_conversation_is_404(stream_service, model_server, user, other_user):
    mine = stream_service.client(user).send("private")
    conversation_id = mine.payloads[0]["conversation_id"]
    counts = stored_counts()

    result = stream_service.client(other_user).send("let me in", conversation_id=conversation_id)

    assert result.status == HTTPStatus.NOT_FOUND
    assert stored_counts() == counts


def test_too_many_messages_a_minute_is_429(stream_service, model_server, user, settings):
    settings.RATE_LIMIT_MESSAGES_PER_MINUTE = 2
    client = stream_service.client(user)
    assert client.send("one").status == HTTPStatus.OK
    assert client.send("two").status == HTTPStatus.OK
    counts = stored_counts()
    result = client.send("three")
    assert result.status == HTTPStatus.TOO_MANY_REQUESTS
    assert result.headers["retry-after"]
    assert stored_counts() == counts


def test_too_many_replies_generating_at_once_is_429(stream_service, model_server, user, settings):
    settings.MAX_CONCURRENT_REPLIES_PER_USER = 1
    client = stream_service.client(user)
    first = send_and_leave(client, scenario(chunks=["slow "], hang=True), events=1)
    counts = stored_counts()

    result = client.send("a second one meanwhile")

    assert result.status == HTTPStatus.TOO_MANY_REQUESTS
    assert "1 replies generating" in result.json["error"]
    assert stored_counts() == counts
    assert client.stop(first[0]["assistant_message_id"]).json() == {"status": "cancelled"}
    assert client.send("and now it may").status == HTTPStatus.OK


def test_the_limits_count_live_replies_and_this_minutes_messages_of_the_caller_only(user, other_user, settings):
    from datetime import timedelta

    from django.utils import timezone

    from ai_features import services

    now = timezone.now()
    soon, past = now + timedelta(seconds=30), now - timedelta(seconds=1)
    for owner in (user, other_user):
        conversation = Conversation.objects.create(user=owner, title="limits")
        # Live: a streaming assistant row with a lease that holds. Not live: an expired lease, a
        # finished row (whatever its lease says), a user row.
        for role, status, lease in [
            ("assistant", "streaming", soon), ("assistant", "streaming", soon), ("assistant", "streaming", past),
            ("assistant", "completed", soon), ("assistant", "completed", None), ("user", "streaming", soon),
        ]:
            Message.objects.create(conversation=conversation, user=owner, role=role, status=status,
                                   lease_expires_at=lease)
        for _ in range(3):
            Message.objects.create(conversation=conversation, user=owner, role="user", content="hi")
        old = Message.objects.filter(user=owner, role="user").order_by("id").first()
        Message.objects.filter(pk=old.pk).update(created_at=now - timedelta(minutes=2))

    settings.MAX_CONCURRENT_REPLIES_PER_USER, settings.RATE_LIMIT_MESSAGES_PER_MINUTE = 3, 4
    assert services._limited_counts(user.pk) == (2, 3)  # user messages: 3 this minute, 1 before
    services._check_rate_limits(user)

    settings.MAX_CONCURRENT_REPLIES_PER_USER = 2
    with pytest.raises(services.ApiError) as refused:
        services._check_rate_limits(user)
    assert "2 replies generating" in refused.value.message
    settings.MAX_CONCURRENT_REPLIES_PER_USER, settings.RATE_LIMIT_MESSAGES_PER_MINUTE = 3, 3
    with pytest.raises(services.ApiError) as refused:
        services._check_rate_limits(user)
    assert refused.value.status == HTTPStatus.TOO_MANY_REQUESTS and "too quickly" in refused.value.message

    # Each count stops at its limit: the answer is the same and the work is bounded.
    settings.MAX_CONCURRENT_REPLIES_PER_USER, settings.RATE_LIMIT_MESSAGES_PER_MINUTE = 1, 1
    assert services._limited_counts(user.pk) == (1, 1)
    # A limit set below zero refuses everything, as zero does (and is no database error).
    settings.MAX_CONCURRENT_REPLIES_PER_USER, settings.RATE_LIMIT_MESSAGES_PER_MINUTE = -1, -1
    assert services._limited_counts(user.pk) == (0, 0)
    with pytest.raises(services.ApiError):
        services._check_rate_limits(user)


def query_plan(sql: str, params: list | None = None) -> str:
    """The plan the database would run `sql` with. On PostgreSQL an empty test table has no
    statistics for the planner to weigh, so the plans that need none (a sequential scan, a bitmap of
    another index) are ruled out: what is left shows which index the query's terms allow."""
    from django.db import connection

    with connection.cursor() as cursor:
        if connection.vendor != "postgresql":
            cursor.execute("EXPLAIN QUERY PLAN " + sql, params or [])
            return "\n".join(str(row) for row in cursor.fetchall())
        cursor.execute("SET enable_seqscan = off")
        cursor.execute("SET enable_bitmapscan = off")
        try:
            cursor.execute("EXPLAIN " + sql, params or [])
            return "\n".join(str(row) for row in cursor.fetchall())
        finally:
            cursor.execute("RESET enable_seqscan")
            cursor.execute("RESET enable_bitmapscan")


def test_the_live_reply_count_reads_the_senders_live_replies_only(user):
    """Every send counts the sender's live replies. Through the partial index of live replies by user,
    that is an index lookup of those few rows; without it, the count read every live reply of every
    user (message_live_lease) or the sender's whole history (the user index), whichever the planner
    chose. This holds the index and the query's terms that let a planner use it."""
    from django.utils import timezone

    from ai_features import services
    from ai_features.sql import statement

    plan = query_plan(statement("SELECT " + services._LIMITED_COUNTS), services._limited_counts_params(user.pk, timezone.now()))
    assert "message_user_live" in plan, plan


def test_the_stop_poll_finds_the_live_replies_asked_to_stop_and_reads_only_those(user, other_user):
    """Each process polls for Stop requests made through the others ten times a second. The poll
    names no replies: it reads the live ones asked to stop (through message_stop_requested), so its
    cost does not grow with the replies the process holds. (SQLite's planner, with no statistics,
    reads the live replies through the status index instead: fine at a quick start's scale.)"""
    from django.db import connection

    from ai_features import services
    from ai_features.sql import statement

    wanted = []
    for owner in (user, other_user):
        conversation = Conversation.objects.create(user=owner, title="stop poll")
        for status, stop in [("streaming", True), ("streaming", False), ("cancelled", True), ("completed", False)]:
            reply = Message.objects.create(conversation=conversation, user=owner, role="assistant", status=status,
                                           stop_requested=stop)
            if status == "streaming" and stop:
                wanted.append(reply.pk)
    assert sorted(services.stop_requests()) == sorted(wanted)
    if connection.vendor == "postgresql":
        assert "message_stop_requested" in query_plan(statement(services._STOP_REQUESTS))


def test_a_lease_renewal_extends_the_live_replies_named_and_nothing_else(user, settings):
    from datetime import timedelta

    from ai_features import services

    settings.GENERATION_LEASE_SECONDS = 30
    conversation = Conversation.objects.create(user=user, title="leases")
    soon = timezone.now() + timedelta(seconds=1)
    live, other_live, finished = (
        Message.objects.create(conversation=conversation, user=user, role="assistant", status=status, lease_expires_at=soon)
        for status in ("streaming", "streaming", "completed")
    )
    assert services.reply_renew_leases([finished.pk, live.pk, 10**12]) == {live.pk}
    leases = dict(Message.objects.values_list("pk", "lease_expires_at"))
    assert leases[live.pk] > timezone.now() + timedelta(seconds=25)
    assert leases[other_live.pk] == leases[finished.pk] == soon  # not named, or no longer live


@pytest.mark.parametrize("limit", ["generating", "per_minute"])
def test_a_retry_of_a_stored_message_is_not_refused_by_the_limits_it_counts_against(
    stream_service, model_server, user, settings, limit
):
    # The page resends with the same client_message_id when it lost the answer: the first send is
    # what fills the limit, so the retry must get that reply back, not a 429.
    if limit == "generating":
        settings.MAX_CONCURRENT_REPLIES_PER_USER = 1
    else:
        settings.RATE_LIMIT_MESSAGES_PER_MINUTE = 1
    client = stream_service.client(user)
    first = send_and_leave(client, scenario(chunks=["slow "], hang=True), events=1, client_message_id="lost-answer")
    counts = stored_counts()

    with client.open("POST", "/api/ai/chat/stream/",
                     json={"message": "resent", "client_message_id": "lost-answer"}) as response:
        assert response.status_code == HTTPStatus.OK
        again = read_events(response, 1)

    assert again[0]["assistant_message_id"] == first[0]["assistant_message_id"]
    assert stored_counts() == counts
    assert client.send("a new message").status == HTTPStatus.TOO_MANY_REQUESTS
    client.stop(first[0]["assistant_message_id"])


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": 12.5, "completion_tokens": "many"},
        {"prompt_tokens": True, "completion_tokens": -3},
        {"prompt_tokens": 2**40, "completion_tokens": None},
    ],
)
def test_usage_counts_the_database_cannot_hold_are_dropped_not_the_reply(stream_service, model_server, user, usage):
    result = stream_service.client(user).send(scenario(chunks=["kept ", "text"], usage=usage))

    assert result.terminal["type"] == "done"
    reply = Message.objects.get(pk=result.payloads[0]["assistant_message_id"])
    assert (reply.status, reply.content) == (Message.Status.COMPLETED, "kept text")
    # No count stored from the server; completion_tokens falls back to one per delta, as without usage.
    assert (reply.prompt_tokens, reply.completion_tokens) == (None, 2)


# --- Failures of the model ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code"),
    [(401, "upstream_auth"), (429, "upstream_rate_limited"), (500, "upstream_unavailable")],
)
def test_model_server_errors_end_the_stream_with_one_error_event(stream_service, model_server, user, status, code):
    result = stream_service.client(user).send(scenario(status=status, error_message="secret upstream detail"))

    assert result.status == HTTPStatus.OK
    assert [p["type"] for p in result.payloads] == ["start", "error"]
    error = result.terminal
    assert error["code"] == code
    assert error["content"] and "secret upstream detail" not in error["content"]
    assert "Traceback" not in result.raw.decode() and "sk-test" not in result.raw.decode()
    reply = Message.objects.get(pk=result.payloads[0]["assistant_message_id"])
    assert reply.status == Message.Status.ERROR and reply.error_code == code
    assert Message.objects.filter(pk=result.payloads[0]["user_message_id"]).exists()


def test_a_connection_dropped_midway_keeps_the_partial_text(stream_service, model_server, user):
    result = stream_service.client(user).send(scenario(chunks=["one ", "two ", "three ", "four"], drop_after=2))

    assert [p["type"] for p in result.payloads] == ["start", "content", "content", "error"]
    assert result.terminal["code"] == "upstream_disconnected"
    reply = Message.objects.get(pk=result.payloads[0]["assistant_message_id"])
    assert reply.status == Message.Status.ERROR
    assert reply.content == result.text == "one two "


@pytest.mark.parametrize("content", [["a", "list"], {"an": "object"}, 42, True])
def test_content_that_is_not_text_is_an_error_that_keeps_the_text_so_far(stream_service, model_server, user, content):
    result = stream_service.client(user).send(scenario(contents=["one ", "two ", content, "never"]))

    assert [p["type"] for p in result.payloads] == ["start", "content", "content", "error"]
    assert result.terminal["code"] == "upstream_malformed"
    reply = Message.objects.get(pk=result.payloads[0]["assistant_message_id"])
    assert (reply.status, reply.error_code) == (Message.Status.ERROR, "upstream_malformed")
    assert reply.content == result.text == "one two "
    replayed = stream_service.client(user).resume(reply.pk, last_event_id=None)
    assert replayed.text == "one two " and replayed.terminal["code"] == "upstream_malformed"


def test_a_failure_while_ending_a_reply_still_ends_its_stream(sidecar, model_server, user, monkeypatch):
    """A bug in the reply's own ending must not leave its watchers waiting and its lease renewed
    forever (the row would stay streaming): the stream ends with an error event, and the process
    lets the reply go, so the reaper ends its row once the lease expires."""
    from ai_features import services
    from tests.conftest import StreamService

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in ending the reply")

    monkeypatch.setattr(services, "ReplyFinish", broken)
    result = StreamService("sidecar", sidecar.url).client(user).send(scenario(chunks=["one ", "two"]))

    assert [p["type"] for p in result.payloads] == ["start", "content", "content", "error"]
    assert result.terminal["code"] == "internal_error" and "Traceback" not in result.raw.decode()
    reply_id = result.payloads[0]["assistant_message_id"]
    assert reply_id not in sidecar.server.config.app.state.runtime.live
    Message.objects.filter(pk=reply_id).update(lease_expires_at=timezone.now())
    assert services.reap_expired_replies() == [reply_id]
    assert Message.objects.get(pk=reply_id).status == Message.Status.INTERRUPTED


def test_an_unreachable_model_server_is_an_error_event(stream_service, model_server, user, settings):
    settings.OPENAI_BASE_URL = "http://127.0.0.1:9/v1"  # discard port: nothing listens
    result = stream_service.client(user).send("anyone there?")
    assert result.terminal["type"] == "error"
    assert result.terminal["code"] == "upstream_disconnected"


def test_a_model_gone_silent_midway_times_out_and_keeps_the_partial_text(stream_service, model_server, user, settings):
    # The read timeout and a refused connection surface through the same SDK exception; they must
    # still be told apart (upstream_timeout here, upstream_disconnected above).
    settings.OPENAI_TIMEOUT_SECONDS = 0.5
    result = stream_service.client(user).send(scenario(chunks=["one ", "two "], hang=True))

    assert [p["type"] for p in result.payloads] == ["start", "content", "content", "error"]
    assert result.terminal["code"] == "upstream_timeout"
    reply = Message.objects.get(pk=result.payloads[0]["assistant_message_id"])
    assert reply.status == Message.Status.ERROR and reply.content == "one two "


def test_a_reply_over_the_token_limit_ends_with_a_typed_error_and_keeps_its_text(
    stream_service, model_server, user, settings
):
    settings.MAX_REPLY_TOKENS = 3
    result = stream_service.client(user).send(scenario(chunks=["a", "b", "c", "d", "e"]))
    assert result.terminal["code"] == "reply_too_long"
    assert result.text == "abc"
    assert Message.objects.get(pk=result.terminal["message_id"]).content == "abc"


# --- Clients that go away, Stop and resume -------------------------------------------------------------------


_readers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def read_events(response, count: int) -> list[dict]:
    """Read up to `count` more events from an open response (call again to read on)."""
    from tests.sse_client import SSEParser

    if response not in _readers:
        _readers[response] = {"chunks": response.iter_raw(), "parser": SSEParser(), "returned": 0}
    reader = _readers[response]
    parser, first = reader["parser"], reader["returned"]
    while len(parser.events) - first < count:
        chunk = next(reader["chunks"], None)
        if chunk is None:
            break
        parser.feed(chunk)
    events = parser.events[first : first + count]
    reader["returned"] = first + len(events)
    return [dict(e.json, _id=int(e.id)) for e in events]


def send_and_leave(client, message: str, *, events: int, **fields) -> list[dict]:
    """Send a message, read the first `events` events, and go away (close the connection)."""
    with client.open("POST", "/api/ai/chat/stream/", json={"message": message, **fields}) as response:
        return read_events(response, events)


def test_a_client_that_disconnects_does_not_stop_the_reply(stream_service, model_server, user):
    client = stream_service.client(user)
    chunks = [f"w{i} " for i in range(30)]
    seen = send_and_leave(client, scenario(chunks=chunks, delay_ms=20), events=4)
    reply_id = seen[0]["assistant_message_id"]

    reply = wait_until(lambda: Message.objects.filter(pk=reply_id).exclude(status="streaming").first(), timeout=10)

    assert reply.status == Message.Status.COMPLETED
    assert reply.content == "".join(chunks)


def test_resume_after_a_disconnect_has_no_gap_and_no_duplicate(stream_service, model_server, user):
    client = stream_service.client(user)
    chunks = [f"p{i} " for i in range(40)]
    first_half = send_and_leave(client, scenario(chunks=chunks, delay_ms=15), events=6)
    reply_id = first_half[0]["assistant_message_id"]
    last_id = first_half[-1]["_id"]

    second_half = client.resume(reply_id, last_event_id=last_id)

    assert [int(e.id) for e in second_half.events] == list(range(last_id + 1, len(chunks) + 2))
    text = "".join(e["content"] for e in first_half if e["type"] == "content") + second_half.text
    stored = Message.objects.get(pk=reply_id)
    assert text == stored.content == "".join(chunks)
    assert second_half.terminal["type"] == "done"


def test_a_finished_reply_replays_identically(stream_service, model_server, user):
    client = stream_service.client(user)
    live = client.send(scenario(chunks=["a", "b", "c"]))
    reply_id = live.payloads[0]["assistant_message_id"]

    replay = client.resume(reply_id)

    assert [(e.id, e.data) for e in replay.events] == [(e.id, e.data) for e in live.events]
    assert client.resume(reply_id, last_event_id=2).payloads == live.payloads[3:]
    caught_up = client.resume(reply_id, last_event_id=int(live.events[-1].id))
    assert caught_up.status == HTTPStatus.OK and caught_up.raw == b""  # nothing left: no event, no ping


def test_two_watchers_see_identical_events(stream_service, model_server, user):
    import threading

    client, second_tab = stream_service.client(user), stream_service.client(user)
    chunks = [f"t{i} " for i in range(25)]
    results = {}
    with client.open("POST", "/api/ai/chat/stream/", json={"message": scenario(chunks=chunks, delay_ms=20)}) as response:
        start = read_events(response, 1)[0]
        watcher = threading.Thread(target=lambda: results.update(second=second_tab.resume(start["assistant_message_id"])))
        watcher.start()
        rest = read_events(response, 10_000)
    watcher.join(timeout=20)

    first_events = [(e["_id"], e["type"], e["content"]) for e in [start, *rest]]
    second_events = [(int(e.id), e.json["type"], e.json["content"]) for e in results["second"].events]
    assert first_events == second_events
    assert first_events[-1][1] == "done"


def test_stop_before_the_first_token_cancels_upstream_at_once(stream_service, model_server, user):
    client = stream_service.client(user)
    with client.open("POST", "/api/ai/chat/stream/", json={"message": scenario(hang=True)}) as response:
        start = read_events(response, 1)[0]
        upstream = model_server.wait_for_requests(1)[0]
        stopped_at = time.monotonic()
        answer = client.stop(start["assistant_message_id"])
        rest = read_events(response, 10_000)

    assert answer.status_code == HTTPStatus.OK and answer.json() == {"status": "cancelled"}
    assert upstream.wait_closed(timeout=2)
    assert upstream.client_closed_at - stopped_at < 0.1
    assert [e["type"] for e in rest] == ["done"] and rest[0]["status"] == "cancelled"
    reply = Message.objects.get(pk=start["assistant_message_id"])
    assert reply.status == Message.Status.CANCELLED and reply.content == ""


def test_stop_after_some_tokens_keeps_exactly_what_was_streamed(stream_service, model_server, user):
    client = stream_service.client(user)
    chunks = [f"s{i} " for i in range(200)]
    with client.open("POST", "/api/ai/chat/stream/", json={"message": scenario(chunks=chunks, delay_ms=10)}) as response:
        events = read_events(response, 6)
        upstream = model_server.wait_for_requests(1)[0]
        stopped_at = time.monotonic()
        answer = client.stop(events[0]["assistant_message_id"])
        events += read_events(response, 10_000)

    assert answer.json() == {"status": "cancelled"}
    assert upstream.wait_closed(timeout=2) and upstream.client_closed_at - stopped_at < 0.1
    streamed = "".join(e["content"] for e in events if e["type"] == "content")
    reply = Message.objects.get(pk=events[0]["assistant_message_id"])
    assert events[-1]["type"] == "done" and events[-1]["status"] == "cancelled"
    assert reply.status == Message.Status.CANCELLED
    assert reply.content == streamed and 5 <= len(streamed.split()) < 200
    assert reply.completion_tokens == len(streamed.split())


def test_stop_is_idempotent(stream_service, model_server, user):
    client = stream_service.client(user)
    done = client.send(scenario(chunks=["fin"]))
    reply_id = done.terminal["message_id"]
    assert client.stop(reply_id).json() == {"status": "completed"}
    assert client.stop(reply_id).json() == {"status": "completed"}
    assert Message.objects.get(pk=reply_id).content == "fin"


def test_someone_elses_reply_is_404_for_resume_and_stop(stream_service, model_server, user, other_user):
    reply_id = stream_service.client(user).send("mine").terminal["message_id"]
    intruder = stream_service.client(other_user)
    assert intruder.resume(reply_id).status == HTTPStatus.NOT_FOUND
    assert intruder.stop(reply_id).status_code == HTTPStatus.NOT_FOUND
    assert Message.objects.get(pk=reply_id).status == Message.Status.COMPLETED


def test_a_bad_last_event_id_is_400(stream_service, model_server, user):
    client = stream_service.client(user)
    reply_id = client.send("x").terminal["message_id"]
    result = client.collect("GET", f"/api/ai/chat/stream/{reply_id}/", headers={"Last-Event-ID": "abc"})
    assert result.status == HTTPStatus.BAD_REQUEST


def test_the_log_is_written_in_batches_not_per_token(stream_service, model_server, user, settings):
    settings.GENERATION_FLUSH_SECONDS = 0.2
    chunks = [f"{i} " for i in range(300)]
    started = time.monotonic()
    result = stream_service.client(user).send(scenario(chunks=chunks, delay_ms=3))
    seconds = time.monotonic() - started
    reply_id = result.terminal["message_id"]

    log_rows = ReplyChunk.objects.filter(message_id=reply_id).count()

    assert result.text == "".join(chunks)
    # One log row per flush tick while it streamed, plus the final one: O(duration), not O(tokens).
    assert log_rows <= seconds / 0.2 + 3
    assert log_rows < 30


def test_deleting_the_conversation_of_a_silent_reply_stops_it_within_a_second_or_two(stream_service, model_server,
                                                                                    user):
    """A reply with no text to log (the model has not said a word) is not found gone by a log
    write: the once-a-second check finds it."""
    from ai_features import services

    client = stream_service.client(user)
    with client.open("POST", "/api/ai/chat/stream/", json={"message": scenario(hang=True)}) as response:
        start = read_events(response, 1)[0]
        upstream = model_server.wait_for_requests(1)[0]
        deleted_at = time.monotonic()
        assert services.conversation_delete(user=user, conversation_id=start["conversation_id"])
        rest = read_events(response, 10)

    assert rest and rest[-1]["type"] == "done"
    assert upstream.wait_closed(timeout=3) and upstream.outcome == "client_closed"
    assert time.monotonic() - deleted_at < 3


def test_replies_gone_are_the_named_replies_no_longer_streaming(user):
    from ai_features import services

    conversation = Conversation.objects.create(user=user, title="gone")
    live, finished = (Message.objects.create(conversation=conversation, user=user, role="assistant", status=status)
                      for status in ("streaming", "completed"))
    deleted = 10**12
    assert services.replies_gone([live.pk, finished.pk, deleted]) == {finished.pk, deleted}
    assert services.replies_gone([]) == set()


def test_deleting_the_conversation_stops_its_reply_and_the_upstream_request(stream_service, model_server, user):
    from ai_features import services

    client = stream_service.client(user)
    with client.open("POST", "/api/ai/chat/stream/", json={"message": scenario(chunks=["x "] * 500, delay_ms=20)}) as response:
        start = read_events(response, 3)[0]
        upstream = model_server.wait_for_requests(1)[0]
        assert services.conversation_delete(user=user, conversation_id=start["conversation_id"])
        rest = read_events(response, 10_000)

    assert rest and rest[-1]["type"] == "done"  # the watcher is ended, not left hanging
    assert upstream.wait_closed(timeout=2) and upstream.outcome == "client_closed"
    assert not Message.objects.filter(pk=start["assistant_message_id"]).exists()
