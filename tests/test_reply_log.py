"""A reply's writes while it streams: the log flush (every live reply's new pieces, for replies
still streaming only) and the end (the final row and the last log rows, together or not at all).

On PostgreSQL each is one statement (one round trip on a hosted database instead of BEGIN, the
statements and COMMIT); SQLite keeps the transactions. Both must store the same thing.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import IntegrityError, connection, transaction
from django.utils import timezone
from django.test.utils import CaptureQueriesContext

from ai_features import services
from ai_features.models import Message, ReplyChunk
from ai_features.streaming.events import ReplyOutcome
from ai_features.streaming.validation import ReplyRequest

pytestmark = pytest.mark.django_db


def a_streaming_reply(user) -> int:
    started = services.reply_start(user=user, request=ReplyRequest(message="hi"), model="m")
    return started.start.assistant_message_id


def finish(message_id: int, pieces: list[str], *, logged: int = 0, status: str = "completed") -> bool:
    outcome = ReplyOutcome(message_id=message_id, status=status, model="m", prompt_tokens=3,
                           completion_tokens=len(pieces), error_code="", error_message="")
    return services.reply_finish(services.ReplyFinish(
        outcome=outcome,
        content="".join(pieces),
        last_batches=services.log_batches(message_id, pieces, logged=logged),
        ttft_ms=12,
        duration_ms=345,
    ))


def logged_pieces(message_id: int) -> list[str]:
    return [text for _, text in services.reply_pieces(message_id=message_id, after=0)]


# No pieces; the last ones after an earlier flush; more than one log row's worth (several rows).
@pytest.mark.parametrize("count, flushed", [(0, 0), (5, 2), (services.MAX_PIECES_PER_CHUNK * 2 + 3, 7)])
def test_the_final_row_and_the_last_pieces_are_stored(user, count, flushed):
    message_id = a_streaming_reply(user)
    # What JSON and SQL quoting must carry through both writes unchanged.
    pieces = [f"piece {n} \"quoted\" 'single' back\\slash %s {{x}} ünïcode 🙂 \u2028\n" for n in range(count)]
    if flushed:
        services.reply_log_append(services.log_batches(message_id, pieces[:flushed], logged=0))

    assert finish(message_id, pieces, logged=flushed) is True

    reply = Message.objects.get(pk=message_id)
    assert (reply.status, reply.content, reply.model) == ("completed", "".join(pieces), "m")
    assert (reply.prompt_tokens, reply.completion_tokens, reply.ttft_ms, reply.duration_ms) == (3, count, 12, 345)
    assert reply.lease_expires_at is None and reply.finished_at is not None
    assert logged_pieces(message_id) == pieces
    first_seqs = list(ReplyChunk.objects.filter(message_id=message_id).order_by("first_seq")
                      .values_list("first_seq", flat=True))
    expected_tail = list(range(flushed + 1, count + 1, services.MAX_PIECES_PER_CHUNK))
    assert first_seqs == ([1] if flushed else []) + expected_tail


def test_a_reply_no_longer_streaming_is_left_as_it_is(user):
    message_id = a_streaming_reply(user)
    Message.objects.filter(pk=message_id).update(status="interrupted", content="what the reaper kept")

    assert finish(message_id, ["late", " pieces"]) is False

    reply = Message.objects.get(pk=message_id)
    assert (reply.status, reply.content) == ("interrupted", "what the reaper kept")
    assert not ReplyChunk.objects.filter(message_id=message_id).exists()


def test_a_failed_finish_stores_neither_part(user):
    """A log row that cannot be written undoes the final row too, so no watcher ever sees a
    terminal status without every piece. The caller's own transaction stays usable."""
    message_id = a_streaming_reply(user)
    services.reply_log_append(services.log_batches(message_id, ["one"], logged=0))

    with transaction.atomic():
        with pytest.raises(IntegrityError):
            finish(message_id, ["one", "two"], logged=0)  # piece 1 is logged already: a duplicate row
        assert Message.objects.get(pk=message_id).status == "streaming"

    assert logged_pieces(message_id) == ["one"]


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the one-statement finish is PostgreSQL's")
@pytest.mark.django_db(transaction=True)  # autocommit, as on the database threads: no savepoint
@pytest.mark.parametrize("count", [0, 3])
def test_finishing_is_one_statement_on_postgresql(user, count):
    message_id = a_streaming_reply(user)

    with CaptureQueriesContext(connection) as queries:
        assert finish(message_id, [f"p{n}" for n in range(count)]) is True

    assert len(queries) == 1
    assert len(logged_pieces(message_id)) == count


def test_a_flush_logs_the_replies_still_streaming_and_names_the_others(user):
    live, reaped, deleted = (a_streaming_reply(user) for _ in range(3))
    Message.objects.filter(pk=reaped).update(status="interrupted")
    Message.objects.filter(pk=deleted).delete()
    batches = [batch for message_id in (deleted, live, reaped)
               for batch in services.log_batches(message_id, [f"{message_id}-a", f"{message_id}-b"], logged=0)]

    assert services.reply_log_append(batches) == {reaped, deleted}

    assert logged_pieces(live) == [f"{live}-a", f"{live}-b"]
    assert not ReplyChunk.objects.exclude(message_id=live).exists()
    assert services.reply_log_append([]) == set()


def test_a_failed_flush_logs_nothing(user):
    first, second = a_streaming_reply(user), a_streaming_reply(user)
    services.reply_log_append(services.log_batches(second, ["one"], logged=0))

    with transaction.atomic():
        with pytest.raises(IntegrityError):  # second's piece 1 again: a duplicate row
            services.reply_log_append(services.log_batches(first, ["x"], logged=0)
                                      + services.log_batches(second, ["one"], logged=0))
        assert not ReplyChunk.objects.filter(message_id=first).exists()

    assert logged_pieces(first) == [] and logged_pieces(second) == ["one"]


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the one-statement flush is PostgreSQL's")
@pytest.mark.django_db(transaction=True)
def test_a_flush_is_one_statement_on_postgresql(user):
    replies = [a_streaming_reply(user) for _ in range(3)]
    batches = [batch for message_id in replies for batch in services.log_batches(message_id, ["a", "b"], logged=0)]

    with CaptureQueriesContext(connection) as queries:
        assert services.reply_log_append(batches) == set()

    assert len(queries) == 1
    assert [logged_pieces(message_id) for message_id in replies] == [["a", "b"]] * 3


@pytest.mark.django_db(transaction=True)  # two real connections: the reaper's lock is real
@pytest.mark.parametrize("write", ["finish", "flush"])
def test_a_write_that_waits_for_the_reapers_lock_then_finds_the_reply_reaped_stores_nothing(user, write):
    """The race the locks are for: a process stalls past its lease, another reaps the reply, and the
    stalled one's write arrives while the reaper holds the row. It must wait, see the reaped status,
    and add nothing to what the reaper stored."""
    message_id = a_streaming_reply(user)
    locked, release = threading.Event(), threading.Event()
    results: dict[str, object] = {}

    def reaper() -> None:
        try:
            with transaction.atomic():
                Message.objects.select_for_update().filter(pk=message_id).values("status").first()
                locked.set()
                release.wait(10)
                Message.objects.filter(pk=message_id).update(status="interrupted", content="what the reaper kept")
        finally:
            connection.close()

    def writer() -> None:
        try:
            if write == "finish":
                results["stored"] = finish(message_id, ["late", " pieces"])
            else:
                results["gone"] = services.reply_log_append(services.log_batches(message_id, ["late"], logged=0))
        except Exception as exc:  # noqa: BLE001 - reported by the assertions below
            results["error"] = exc
        finally:
            connection.close()

    reaping = threading.Thread(target=reaper)
    reaping.start()
    assert locked.wait(10)
    writing = threading.Thread(target=writer)
    writing.start()
    writing.join(0.5)
    assert writing.is_alive(), "the write did not wait for the reaper's lock"
    release.set()
    reaping.join(10)
    writing.join(10)

    assert "error" not in results, results
    assert results == ({"stored": False} if write == "finish" else {"gone": {message_id}})
    reply = Message.objects.get(pk=message_id)
    assert (reply.status, reply.content) == ("interrupted", "what the reaper kept")
    assert not ReplyChunk.objects.filter(message_id=message_id).exists()


def test_a_reply_that_cannot_be_reaped_does_not_block_the_others(user, caplog):
    """The reaper takes expired replies in id order every tick: one whose end fails (here a log row
    holding a piece that is not text, as written before pieces were checked) must not stop the
    replies after it from being ended, tick after tick."""
    bad, good = a_streaming_reply(user), a_streaming_reply(user)
    services.reply_log_append(services.log_batches(good, ["kept ", "text"], logged=0))
    ReplyChunk.objects.create(message_id=bad, first_seq=1, pieces=[["not", "text"]])
    Message.objects.filter(pk__in=[bad, good]).update(lease_expires_at=timezone.now() - timedelta(seconds=1))

    assert services.reap_expired_replies() == [good]

    assert Message.objects.get(pk=good).status == "interrupted"
    assert Message.objects.get(pk=good).content == "kept text"
    assert Message.objects.get(pk=bad).status == "streaming"  # tried again next tick, and logged:
    assert f"could not reap reply {bad}" in caplog.text
