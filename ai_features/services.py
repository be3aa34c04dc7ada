"""Writes: plain, synchronous functions called by the views, the streaming core, the admin and tests.

The streaming core calls the reply functions from its database threads, never on the event loop.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from datetime import timedelta
from http import HTTPStatus

import orjson
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, IntegrityError, connection, connections, transaction
from django.utils import timezone

from . import selectors
from .sql import db_datetime, statement
from .models import Conversation, Message, ReplyChunk
from .streaming.events import ReplyOutcome, StartEvent
from .streaming.validation import ApiError, ReplyRequest

logger = logging.getLogger(__name__)

TITLE_LENGTH = 60
# The runtime flushes a reply's buffer when it holds this many pieces, whatever the clock says.
MAX_PIECES_PER_CHUNK = 256


# --- Conversations -----------------------------------------------------------------------------


def conversation_rename(*, user, conversation_id: int, title: str) -> Conversation | None:
    conversation = selectors.conversation_get(user=user, conversation_id=conversation_id)
    if conversation is None:
        return None
    conversation.title = title
    with transaction.atomic():  # a transaction, so that on SQLite it queues with the other writers
        conversation.save(update_fields=["title", "updated_at"])
    return conversation


def conversation_delete(*, user, conversation_id: int) -> bool:
    conversation = selectors.conversation_get(user=user, conversation_id=conversation_id)
    if conversation is None:
        return False
    # A reply still generating is stopped by its process: its next log write finds the row gone
    # (within 0.2 s while it streams), or the once-a-second check does (while it is silent), so
    # nothing is written for it afterwards.
    conversation.delete()
    return True


def message_delete(*, user, conversation_id: int, message_id: int) -> bool:
    message = Message.objects.filter(user=user, conversation_id=conversation_id, pk=message_id).first()
    if message is None:
        return False
    message.delete()
    return True


def _title_from(text: str) -> str:
    title = " ".join(text.split())
    return title if len(title) <= TITLE_LENGTH else title[: TITLE_LENGTH - 1] + "…"


# --- Starting a reply ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplyStart:
    start: StartEvent
    context: list[dict[str, str]]
    existing: bool  # a retry with a known client_message_id: nothing was stored, watch the first reply


def reply_start(*, user, request: ReplyRequest, model: str) -> ReplyStart:
    """Store the user message and a `streaming` assistant row, and build the model's context.

    Raises ApiError 404 (conversation not the caller's), 409 (a known key whose reply was deleted) or
    429 (rate limits); stores nothing then.
    A retry with a known `client_message_id` stores nothing and returns the first reply. The unique
    constraint finds it, not a read before every send: most sends are new ones. A retry that a limit
    refuses gets the first reply too, since the first send is what filled the limit.
    """
    try:
        if connection.vendor == "postgresql":
            return _store_new_reply_in_one_statement(user=user, request=request, model=model)
        _check_rate_limits(user)
        with transaction.atomic():
            return _store_new_reply(user=user, request=request, model=model)
    except (IntegrityError, ApiError):
        existing = _existing_reply(user=user, client_message_id=request.client_message_id)
        if existing is None:
            raise
        return existing


def _existing_reply(*, user, client_message_id: str | None) -> ReplyStart | None:
    """The reply an earlier send with this key started; None when no message holds the key."""
    if not client_message_id:
        return None
    user_message = Message.objects.filter(user=user, client_message_id=client_message_id).first()
    if user_message is None:
        return None
    reply = Message.objects.filter(reply_to=user_message).order_by("id").first()
    if reply is None:
        # Its reply was deleted: there is nothing to replay, and the key stays taken as long as the
        # message holding it exists.
        raise ApiError(
            HTTPStatus.CONFLICT,
            "This client_message_id was already used, and the reply it started has been deleted. "
            "Send the message with a new client_message_id.",
        )
    start = StartEvent(user_message.conversation_id, user_message.pk, reply.pk)
    return ReplyStart(start=start, context=[], existing=True)


def _check_rate_limits(user) -> None:
    _refuse_over_limits(*_limited_counts(user.pk))


def _refuse_over_limits(live: int, recent: int) -> None:
    if live >= settings.MAX_CONCURRENT_REPLIES_PER_USER:
        raise ApiError(
            HTTPStatus.TOO_MANY_REQUESTS,
            f"You already have {live} replies generating. Wait for one to finish or stop it.",
            headers={"Retry-After": "5"},
        )
    if recent >= settings.RATE_LIMIT_MESSAGES_PER_MINUTE:
        raise ApiError(
            HTTPStatus.TOO_MANY_REQUESTS,
            "You are sending messages too quickly. Please wait a minute.",
            headers={"Retry-After": "60"},
        )


# The user's replies still generating and messages of the last minute, each counted only up to its
# limit (the answer is the same, and the work stays bounded however high a limit is set). The live
# count is answered by the partial index of live replies by user (message_user_live). A planner uses
# a partial index only when the query's terms imply the index's condition, so the role and status it
# names are written into the SQL rather than bound: a prepared statement's generic plan cannot see
# through a parameter.
_LIMITED_COUNTS = (
    "(SELECT COUNT(*) FROM (SELECT 1 FROM {message} WHERE user_id = %s"
    f" AND status = '{Message.Status.STREAMING}' AND role = '{Message.Role.ASSISTANT}'"
    " AND lease_expires_at > %s LIMIT %s) AS live_rows) AS live,"
    " (SELECT COUNT(*) FROM (SELECT 1 FROM {message} WHERE user_id = %s AND role = %s"
    " AND created_at >= %s LIMIT %s) AS recent_rows) AS recent"
)


def _limited_counts_params(user_id: int, now) -> list:
    return [
        user_id, db_datetime(now),
        max(settings.MAX_CONCURRENT_REPLIES_PER_USER, 0),  # PostgreSQL refuses LIMIT -1
        user_id, Message.Role.USER, db_datetime(now - timedelta(minutes=1)),
        max(settings.RATE_LIMIT_MESSAGES_PER_MINUTE, 0),
    ]


def _limited_counts(user_id: int) -> tuple[int, int]:
    """Hand-written, like the other statements every reply runs (ai_features/sql.py)."""
    with connection.cursor() as cursor:
        cursor.execute(statement("SELECT " + _LIMITED_COUNTS), _limited_counts_params(user_id, timezone.now()))
        live, recent = cursor.fetchone()
    return live, recent


def _store_new_reply(*, user, request: ReplyRequest, model: str) -> ReplyStart:
    is_new = request.conversation_id is None
    if is_new:
        conversation = Conversation.objects.create(user=user, title=_title_from(request.message))
    else:
        conversation = (
            Conversation.objects.select_for_update().filter(user=user, pk=request.conversation_id).first()
        )
        if conversation is None:
            raise ApiError(HTTPStatus.NOT_FOUND, "Conversation not found.")

    history = _history(conversation, limit=_history_limit(request))
    user_message, reply = _new_rows(user=user, request=request, model=model)
    user_message.conversation = reply.conversation = conversation
    user_message.save(force_insert=True)
    reply.reply_to = user_message
    reply.save(force_insert=True)
    if not is_new:
        conversation.save(update_fields=["updated_at"])  # a new one was stamped when created

    start = StartEvent(conversation.pk, user_message.pk, reply.pk)
    context = _context([(m.role, m.content) for m in history], request.message)
    return ReplyStart(start=start, context=context, existing=False)


def _context(history: list[tuple[str, str]], message: str) -> list[dict[str, str]]:
    """What the model is sent: the system prompt, the earlier messages (oldest first), the new one."""
    context: list[dict[str, str]] = []
    if settings.SYSTEM_PROMPT:
        context.append({"role": "system", "content": settings.SYSTEM_PROMPT})
    context.extend({"role": role, "content": content} for role, content in history)
    context.append({"role": "user", "content": message})
    return context


def _history_limit(request: ReplyRequest) -> int:
    if not request.include_history or request.conversation_id is None:
        return 0
    return max(settings.MAX_CHAT_HISTORY, 0)


def _new_rows(*, user, request: ReplyRequest, model: str) -> tuple[Message, Message]:
    """The user's message and the streaming reply, as both store paths insert them."""
    user_message = Message(
        user=user,
        role=Message.Role.USER,
        content=request.message,
        status=Message.Status.COMPLETED,
        client_message_id=request.client_message_id,
    )
    reply = Message(
        user=user,
        role=Message.Role.ASSISTANT,
        status=Message.Status.STREAMING,
        model=model,
        lease_expires_at=timezone.now() + timedelta(seconds=settings.GENERATION_LEASE_SECONDS),
    )
    return user_message, reply


def _insert_row(obj, *, skip: tuple[str, ...] = ()) -> tuple[str, str, str]:
    """What the one-statement store inserts for `obj`, as the ORM would insert it: every concrete
    field but the primary key and `skip`, with its default or auto_now stamp (pre_save) adapted for
    the database. Returns the quoted columns, the same columns read from the JSON record `r`, and
    the record: one JSON object, which json_populate_record() types column by column in the
    statement. One parameter per row instead of one per field: the store's parameters stay within
    psycopg's statement cache (50), which otherwise parsed the statement again on every call, and
    no per-field adaptation runs in Python. Every value here is one JSON has (str, int, bool, None,
    datetime); a field that adapts to anything else would make orjson raise, not store it wrongly."""
    fields, columns, record_columns = _insert_columns(type(obj), skip)
    db = connections[DEFAULT_DB_ALIAS]  # this thread's connection, looked up once, not once per field
    record = {f.column: f.get_db_prep_save(f.pre_save(obj, True), db) for f in fields}
    return columns, record_columns, orjson.dumps(record).decode()


@functools.cache
def _insert_columns(model, skip: tuple[str, ...]) -> tuple[tuple, str, str]:
    """The fields and quoted columns of `_insert_row`, built once per model: they cost ~250 µs of
    the database thread's CPU per reply when built each time."""
    fields = tuple(f for f in model._meta.concrete_fields if not f.primary_key and f.attname not in skip)
    quoted = [connection.ops.quote_name(f.column) for f in fields]
    return fields, ", ".join(quoted), ", ".join(f"r.{column}" for column in quoted)


def _store_new_reply_in_one_statement(*, user, request: ReplyRequest, model: str) -> ReplyStart:
    """PostgreSQL: what `_check_rate_limits` and `_store_new_reply` do, in one statement.

    On a hosted database every statement is a network round trip, and these were six to eight of
    them (the limits, BEGIN, the conversation's lock or insert, the history, two inserts, the
    conversation's stamp, COMMIT) before a reply's first token. Data-modifying CTEs do it in one, and
    a statement is atomic by itself, so no transaction is opened. The rows are built as the ORM builds
    them (model instances, their defaults and stamps) and inserted by hand, so no save signals fire
    (none are registered). A refused request locks, stamps and stores nothing.

    One difference: the history is read in the statement's snapshot, taken before the conversation's
    lock is granted, so a message sent to the same conversation at the same moment from another tab
    may be missing from this reply's context (the ORM path reads the history after the lock).
    """
    now = timezone.now()
    is_new = request.conversation_id is None
    # Stamps in the ORM path's order: a new conversation, then the question, then the reply.
    if is_new:
        columns, record_columns, record = _insert_row(Conversation(user=user, title=_title_from(request.message)))
    user_message, reply = _new_rows(user=user, request=request, model=model)
    user_message_columns, user_message_record_columns, user_message_record = _insert_row(
        user_message, skip=("conversation_id",)
    )
    reply_columns, reply_record_columns, reply_record = _insert_row(reply, skip=("conversation_id", "reply_to_id"))
    allowed = "lim.live < %s AND lim.recent < %s"
    allowed_params = [settings.MAX_CONCURRENT_REPLIES_PER_USER, settings.RATE_LIMIT_MESSAGES_PER_MINUTE]
    if is_new:
        target = (
            f"target AS (INSERT INTO {{conversation}} ({columns}) SELECT {record_columns}"
            " FROM lim, json_populate_record(NULL::{conversation}, %s::json) AS r"
            f" WHERE {allowed} RETURNING id)"
        )
        target_params = [record, *allowed_params]
    else:
        # Locked only when the limits allow, and stamped after its new messages, as the ORM path's
        # save(update_fields=["updated_at"]).
        target = (
            "target AS (SELECT c.id FROM {conversation} AS c, lim WHERE c.id = %s AND c.user_id = %s"
            f" AND {allowed} FOR UPDATE OF c),"
            " stamp AS (UPDATE {conversation} SET updated_at = %s WHERE id IN (SELECT id FROM target))"
        )
        target_params = [request.conversation_id, user.pk, *allowed_params, db_datetime(timezone.now())]
    template = (
        f"WITH lim AS (SELECT {_LIMITED_COUNTS}), {target},"
        # In the snapshot before the inserts, so the new message is not part of its own history.
        " hist AS (SELECT role, content, created_at, id FROM {message} WHERE conversation_id IN"
        "  (SELECT id FROM target) AND content <> '' AND role IN (%s, %s)"
        "  ORDER BY created_at DESC, id DESC LIMIT %s),"
        f" um AS (INSERT INTO {{message}} (conversation_id, {user_message_columns})"
        f"  SELECT target.id, {user_message_record_columns}"
        "  FROM target, json_populate_record(NULL::{message}, %s::json) AS r RETURNING id, conversation_id),"
        f" rm AS (INSERT INTO {{message}} (conversation_id, reply_to_id, {reply_columns})"
        f"  SELECT um.conversation_id, um.id, {reply_record_columns}"
        "  FROM um, json_populate_record(NULL::{message}, %s::json) AS r RETURNING id)"
        " SELECT lim.live, lim.recent, (SELECT id FROM target), (SELECT id FROM um), (SELECT id FROM rm),"
        " (SELECT json_agg(json_build_array(hist.role, hist.content) ORDER BY hist.created_at, hist.id)"
        "  FROM hist)"
        " FROM lim"
    )
    params = [
        *_limited_counts_params(user.pk, now),
        *target_params,
        Message.Role.USER, Message.Role.ASSISTANT, _history_limit(request),
        user_message_record,
        reply_record,
    ]
    [(live, recent, conversation_id, user_message_id, reply_id, history)] = _one_statement(template, params)
    _refuse_over_limits(live, recent)
    if conversation_id is None:
        raise ApiError(HTTPStatus.NOT_FOUND, "Conversation not found.")
    start = StartEvent(conversation_id, user_message_id, reply_id)
    context = _context([(role, content) for role, content in history or ()], request.message)
    return ReplyStart(start=start, context=context, existing=False)


def _history(conversation: Conversation, *, limit: int) -> list[Message]:
    """The most recent earlier messages that have text (partial replies count), oldest first."""
    if limit <= 0:
        return []
    recent = (
        conversation.messages.exclude(content="")
        .filter(role__in=[Message.Role.USER, Message.Role.ASSISTANT])
        .order_by("-created_at", "-id")[:limit]
    )
    return list(reversed(list(recent)))


# --- The life of a reply ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogBatch:
    message_id: int
    first_seq: int
    pieces: list[str]


def log_batches(message_id: int, pieces: list[str], *, logged: int) -> list[LogBatch]:
    """The not yet logged pieces (those after the first `logged`) as rows of at most
    MAX_PIECES_PER_CHUNK pieces: `reply_pieces` relies on that bound to find where to start."""
    return [
        LogBatch(message_id, first + 1, pieces[first : first + MAX_PIECES_PER_CHUNK])
        for first in range(logged, len(pieces), MAX_PIECES_PER_CHUNK)
    ]


def _lock_streaming(message_ids: list[int]) -> set[int]:
    """Lock the rows of these replies that are still streaming (in id order, so two lockers never
    deadlock) and return their ids. Call inside a transaction."""
    return set(
        Message.objects.select_for_update()
        .filter(pk__in=message_ids, status=Message.Status.STREAMING)
        .order_by("pk")
        .values_list("pk", flat=True)
    )


def reply_log_append(batches: list[LogBatch]) -> set[int]:
    """Write batches of several replies in one transaction, only for replies still streaming.
    Returns the ids that are no longer streaming (reaped, deleted): their process must stop.

    The rows are locked first, like the reaper does, so a reply is never reaped between the
    check and the write (the reaper's text would then miss these pieces)."""
    if not batches:
        return set()
    ids = sorted({batch.message_id for batch in batches})
    if connection.vendor == "postgresql":
        # One statement, atomic by itself, instead of BEGIN, the lock, the insert and COMMIT: a
        # database thread is held for one round trip per tick, and a reply's final write (which
        # waits for a flush in flight) waits less. The lock is taken in id order, as _lock_streaming's.
        rows = _one_statement(
            f"WITH rows AS (SELECT * FROM {_LOG_ROWS}),"
            " live AS (SELECT id FROM {message} WHERE id IN (SELECT message_id FROM rows) AND status = %s"
            "  ORDER BY id FOR UPDATE),"
            " logged AS (INSERT INTO {chunk} (message_id, first_seq, pieces)"
            "  SELECT rows.message_id, rows.first_seq, rows.pieces"
            "  FROM rows WHERE rows.message_id IN (SELECT id FROM live))"
            " SELECT id FROM live",
            [_log_rows_json(batches), Message.Status.STREAMING],
        )
        return set(ids) - {row[0] for row in rows}
    with transaction.atomic():
        live = _lock_streaming(ids)
        _insert_log_rows([b for b in batches if b.message_id in live])
    return set(ids) - live


# PostgreSQL: log rows arrive as one JSON document, a list of {"message_id", "first_seq", "pieces"}.
# One string parameter, which psycopg quotes in C, whatever the number of rows and pieces. As arrays
# for unnest(), psycopg quoted every element of the jsonb[] array in Python, character by character
# through a regex callback: ~4.6 ms of a database thread's CPU for one tick's flush at 128 streams.
_LOG_ROWS = "json_to_recordset(%s::json) AS rows (message_id bigint, first_seq integer, pieces jsonb)"


def _log_rows_json(batches: list[LogBatch]) -> str:
    # Pieces are strings (the provider refuses content of any other type and replaces what no
    # database can store), so orjson's JSON is the JSON the field's own encoder would have written.
    return orjson.dumps(
        [{"message_id": b.message_id, "first_seq": b.first_seq, "pieces": b.pieces} for b in batches]
    ).decode()


def _insert_log_rows(batches: list[LogBatch]) -> None:
    """SQLite: one executemany for the rows of every live reply (one tick's flush holds one row per
    reply).

    bulk_create built a model instance and its SQL per row (~30 µs each); this only adapts the JSON
    value through the field itself."""
    if not batches:
        return
    pieces_field = ReplyChunk._meta.get_field("pieces")
    rows = [(b.message_id, b.first_seq, pieces_field.get_db_prep_save(b.pieces, connection)) for b in batches]
    with connection.cursor() as cursor:
        cursor.executemany(statement("INSERT INTO {chunk} (message_id, first_seq, pieces) VALUES (%s, %s, %s)"), rows)


@dataclass(frozen=True, slots=True)
class ReplyFinish:
    outcome: ReplyOutcome
    content: str
    last_batches: list[LogBatch]
    ttft_ms: int | None
    duration_ms: int


_FINISH = (
    "UPDATE {message} SET status = %s, content = %s, model = %s, prompt_tokens = %s,"
    " completion_tokens = %s, error_code = %s, error_message = %s, ttft_ms = %s,"
    " duration_ms = %s, lease_expires_at = NULL, finished_at = %s, updated_at = %s"
    " WHERE id = %s AND status = %s"
)


def reply_finish(finish: ReplyFinish) -> bool:
    """Write the last pieces and the final row in one transaction, so a watcher that sees the
    terminal status also sees every piece. False when the row was no longer streaming.

    The update is hand-written, like the other statements every reply runs (ai_features/sql.py).
    On PostgreSQL the update and the last log rows are one statement (the rows are inserted only if
    the update found the reply streaming): one round trip before `done` instead of four (BEGIN,
    UPDATE, INSERT, COMMIT)."""
    outcome = finish.outcome
    now = db_datetime(timezone.now())
    params = [
        outcome.status, finish.content, outcome.model, outcome.prompt_tokens, outcome.completion_tokens,
        outcome.error_code, outcome.error_message[:500], finish.ttft_ms, finish.duration_ms, now, now,
        outcome.message_id, Message.Status.STREAMING,
    ]
    if connection.vendor == "postgresql":
        [(finished,)] = _one_statement(
            f"WITH finished AS ({_FINISH} RETURNING id),"
            " logged AS (INSERT INTO {chunk} (message_id, first_seq, pieces)"
            f"  SELECT finished.id, rows.first_seq, rows.pieces FROM finished, {_LOG_ROWS})"
            " SELECT COUNT(*) FROM finished",
            [*params, _log_rows_json(finish.last_batches)],
        )
        return finished == 1
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(statement(_FINISH), params)
        updated = cursor.rowcount == 1
        if updated:
            _insert_log_rows(finish.last_batches)
    return updated


def _one_statement(template: str, params: list) -> list[tuple]:
    """PostgreSQL: run one statement that is atomic by itself (the store, the flush, the end) and
    return its rows. On its own it needs no transaction, so no BEGIN and COMMIT round trips; inside a
    caller's transaction (tests, a view's atomic block) a failed statement must not poison it, so
    a savepoint, as atomic() would make."""
    atomic = transaction.atomic() if connection.in_atomic_block else contextlib.nullcontext()
    with atomic, connection.cursor() as cursor:
        cursor.execute(statement(template), params)
        return cursor.fetchall()


# PostgreSQL: a list of reply ids as one JSON parameter (_ids_json), which psycopg quotes in C,
# rather than a placeholder per id, which the ORM's pk__in builds and adapts one by one in Python.
_ID_LIST = "(SELECT value::bigint FROM json_array_elements_text(%s::json))"


def _ids_json(message_ids: list[int]) -> str:
    return orjson.dumps(message_ids).decode()


def reply_renew_leases(message_ids: list[int]) -> set[int]:
    """Extend the leases of these replies; returns the ids that were renewed (still streaming)."""
    if not message_ids:
        return set()
    expires = timezone.now() + timedelta(seconds=settings.GENERATION_LEASE_SECONDS)
    if connection.vendor == "postgresql":
        # One statement (the lock in id order, as _lock_streaming's, then the update) with the ids
        # as one JSON parameter: the ORM's transaction of two statements, each with a placeholder
        # per id, held a database thread (and the GIL) for 17 ms of CPU at 2,000 live replies.
        rows = _one_statement(
            f"WITH live AS (SELECT id FROM {{message}} WHERE id IN {_ID_LIST} AND status = %s ORDER BY id FOR UPDATE)"
            " UPDATE {message} SET lease_expires_at = %s WHERE id IN (SELECT id FROM live) RETURNING id",
            [_ids_json(message_ids), Message.Status.STREAMING, db_datetime(expires)],
        )
        return {message_id for (message_id,) in rows}
    with transaction.atomic():
        renewed = _lock_streaming(message_ids)
        Message.objects.filter(pk__in=renewed).update(lease_expires_at=expires)
    return renewed


def replies_gone(message_ids: list[int]) -> set[int]:
    """Of these replies, those no longer live here: deleted, or reaped while their process stalled.
    The log write finds them too, but only for a reply with new text to write."""
    if not message_ids:
        return set()
    if connection.vendor == "postgresql":
        rows = _one_statement(
            f"SELECT id FROM {{message}} WHERE id IN {_ID_LIST} AND status = %s",
            [_ids_json(message_ids), Message.Status.STREAMING],
        )
        return set(message_ids) - {message_id for (message_id,) in rows}
    live = Message.objects.filter(pk__in=message_ids, status=Message.Status.STREAMING).values_list("pk", flat=True)
    return set(message_ids) - set(live)


# The condition is message_stop_requested's, written out so that a planner can see it holds.
_STOP_REQUESTS = f"SELECT id FROM {{message}} WHERE stop_requested AND status = '{Message.Status.STREAMING}'"


def stop_requests() -> list[int]:
    """The live replies someone asked to stop (through any process): usually none.

    It reads only those rows (message_stop_requested), not the caller's live replies one by one: a
    poll ten times a second that named every live reply cost 2 ms of a database thread's CPU at 128
    live replies and 13 ms at 2,000. A reply deleted or reaped elsewhere is found by the log flush
    (while it streams) and by `replies_gone`, once a second. Hand-written like the statements every reply
    runs (ai_features/sql.py): as a queryset it cost ~0.4 ms of CPU, ten times a second."""
    with connection.cursor() as cursor:
        cursor.execute(statement(_STOP_REQUESTS))
        return [message_id for (message_id,) in cursor.fetchall()]


def reply_request_stop(*, message_id: int) -> None:
    with transaction.atomic():  # a transaction, so that on SQLite it queues with the other writers
        Message.objects.filter(pk=message_id, status=Message.Status.STREAMING).update(stop_requested=True)


def reply_pieces(*, message_id: int, after: int) -> list[tuple[int, str]]:
    """Logged pieces with sequence numbers above `after`, in order."""
    pieces: list[tuple[int, str]] = []
    # A chunk holds at most MAX_PIECES_PER_CHUNK pieces, so earlier chunks cannot reach past `after`.
    chunks = ReplyChunk.objects.filter(message_id=message_id, first_seq__gt=after - MAX_PIECES_PER_CHUNK)
    for chunk in chunks.order_by("first_seq").only("first_seq", "pieces"):
        for offset, text in enumerate(chunk.pieces):
            seq = chunk.first_seq + offset
            if seq > after:
                pieces.append((seq, text))
    return pieces


def reap_expired_replies(*, only: int | None = None) -> list[int]:
    """End replies whose generating process died (lease expired), keeping their logged text:
    `interrupted`, or `cancelled` when someone had asked to stop them."""
    now = timezone.now()
    expired = Message.objects.filter(status=Message.Status.STREAMING, lease_expires_at__lt=now)
    if only is not None:
        expired = expired.filter(pk=only)
    reaped = []
    for message_id in expired.values_list("pk", flat=True):
        try:
            if _reap(message_id, now):
                reaped.append(message_id)
        except Exception:  # noqa: BLE001 - one reply that cannot be ended must not block the others
            # The rows come in id order every tick, so a failure here used to stop the reaping of
            # every later reply for good (a log row written before pieces were checked to be strings
            # could do it). This reply is tried again next tick; the log says which one it is.
            logger.exception("could not reap reply %s", message_id)
    return reaped


def _reap(message_id: int, now) -> bool:
    with transaction.atomic():
        row = (
            Message.objects.select_for_update()
            .filter(pk=message_id, status=Message.Status.STREAMING, lease_expires_at__lt=now)
            .values("stop_requested")
            .first()
        )
        if row is None:
            return False  # renewed or finished meanwhile
        text = "".join(text for _, text in reply_pieces(message_id=message_id, after=0))
        status = Message.Status.CANCELLED if row["stop_requested"] else Message.Status.INTERRUPTED
        Message.objects.filter(pk=message_id).update(
            status=status,
            content=text,
            error_code="" if status == Message.Status.CANCELLED else "interrupted",
            lease_expires_at=None,
            finished_at=now,
            updated_at=now,
        )
    return True


@dataclass(frozen=True, slots=True)
class ReplySnapshot:
    start: StartEvent
    outcome: ReplyOutcome | None  # None while still streaming
    pieces: list[tuple[int, str]]
    piece_count: int  # all logged pieces, for the terminal event's id
    model: str


def reply_snapshot(*, message_id: int, after: int) -> ReplySnapshot | None:
    """A reply as the log shows it. The status is read before the pieces: the final write stores
    both in one transaction, so a terminal status guarantees every piece is visible."""
    row = (
        Message.objects.filter(pk=message_id, role=Message.Role.ASSISTANT)
        .values(
            "conversation_id", "reply_to_id", "status", "model", "prompt_tokens", "completion_tokens",
            "error_code", "error_message",
        )
        .first()
    )
    if row is None:
        return None
    outcome = None
    if row["status"] != Message.Status.STREAMING:
        outcome = ReplyOutcome(
            message_id=message_id,
            status=row["status"],
            model=row["model"],
            prompt_tokens=row["prompt_tokens"],
            completion_tokens=row["completion_tokens"],
            error_code=row["error_code"],
            error_message=row["error_message"],
        )
    pieces = reply_pieces(message_id=message_id, after=after)
    if pieces:
        piece_count = pieces[-1][0]
    elif outcome is None:
        piece_count = 0  # only a finished reply needs it (for its terminal event's id)
    else:
        last = ReplyChunk.objects.filter(message_id=message_id).order_by("-first_seq").values("first_seq", "pieces").first()
        piece_count = last["first_seq"] + len(last["pieces"]) - 1 if last else 0
    start = StartEvent(row["conversation_id"], row["reply_to_id"] or 0, message_id)
    return ReplySnapshot(start=start, outcome=outcome, pieces=pieces, piece_count=piece_count, model=row["model"])


def reply_status(*, message_id: int) -> str | None:
    return Message.objects.filter(pk=message_id).values_list("status", flat=True).first()
