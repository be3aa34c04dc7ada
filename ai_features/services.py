"""Writes: plain, synchronous functions called by the views, the streaming core, the admin and tests.

The streaming core calls the reply functions from its database threads, never on the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from http import HTTPStatus

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from . import selectors
from .models import Conversation, Message, ReplyChunk
from .streaming.events import ReplyOutcome, StartEvent
from .streaming.validation import ApiError, ReplyRequest

TITLE_LENGTH = 60
# The runtime flushes a reply's buffer when it holds this many pieces, whatever the clock says.
MAX_PIECES_PER_CHUNK = 256


# --- Conversations -----------------------------------------------------------------------------


def conversation_rename(*, user, conversation_id: int, title: str) -> Conversation | None:
    conversation = selectors.conversation_get(user=user, conversation_id=conversation_id)
    if conversation is None:
        return None
    conversation.title = title
    conversation.save(update_fields=["title", "updated_at"])
    return conversation


def conversation_delete(*, user, conversation_id: int) -> bool:
    conversation = selectors.conversation_get(user=user, conversation_id=conversation_id)
    if conversation is None:
        return False
    # A reply still generating is stopped by its process (it notices the stop request or the
    # missing row), so nothing is written for it afterwards.
    conversation.messages.filter(status=Message.Status.STREAMING).update(stop_requested=True)
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

    Raises ApiError 404 (conversation not the caller's) or 429 (rate limits); stores nothing then.
    """
    if request.client_message_id:
        existing = _existing_reply(user=user, client_message_id=request.client_message_id)
        if existing is not None:
            return existing
    _check_rate_limits(user)
    try:
        with transaction.atomic():
            return _store_new_reply(user=user, request=request, model=model)
    except IntegrityError:
        # Two requests with the same idempotency key raced: the other one stored the reply.
        if request.client_message_id:
            existing = _existing_reply(user=user, client_message_id=request.client_message_id)
            if existing is not None:
                return existing
        raise


def _existing_reply(*, user, client_message_id: str) -> ReplyStart | None:
    user_message = Message.objects.filter(user=user, client_message_id=client_message_id).first()
    if user_message is None:
        return None
    reply = Message.objects.filter(reply_to=user_message).order_by("id").first()
    if reply is None:
        return None
    start = StartEvent(user_message.conversation_id, user_message.pk, reply.pk)
    return ReplyStart(start=start, context=[], existing=True)


def _check_rate_limits(user) -> None:
    now = timezone.now()
    live = Message.objects.filter(
        user=user, role=Message.Role.ASSISTANT, status=Message.Status.STREAMING, lease_expires_at__gt=now
    ).count()
    if live >= settings.MAX_CONCURRENT_REPLIES_PER_USER:
        raise ApiError(
            HTTPStatus.TOO_MANY_REQUESTS,
            f"You already have {live} replies generating. Wait for one to finish or stop it.",
            headers={"Retry-After": "5"},
        )
    recent = Message.objects.filter(
        user=user, role=Message.Role.USER, created_at__gte=now - timedelta(minutes=1)
    ).count()
    if recent >= settings.RATE_LIMIT_MESSAGES_PER_MINUTE:
        raise ApiError(
            HTTPStatus.TOO_MANY_REQUESTS,
            "You are sending messages too quickly. Please wait a minute.",
            headers={"Retry-After": "60"},
        )


def _store_new_reply(*, user, request: ReplyRequest, model: str) -> ReplyStart:
    if request.conversation_id is None:
        conversation = Conversation.objects.create(user=user, title=_title_from(request.message))
    else:
        conversation = (
            Conversation.objects.select_for_update().filter(user=user, pk=request.conversation_id).first()
        )
        if conversation is None:
            raise ApiError(HTTPStatus.NOT_FOUND, "Conversation not found.")

    history = _history(conversation) if request.include_history else []
    user_message = Message.objects.create(
        conversation=conversation,
        user=user,
        role=Message.Role.USER,
        content=request.message,
        status=Message.Status.COMPLETED,
        client_message_id=request.client_message_id,
    )
    reply = Message.objects.create(
        conversation=conversation,
        user=user,
        role=Message.Role.ASSISTANT,
        status=Message.Status.STREAMING,
        model=model,
        reply_to=user_message,
        lease_expires_at=timezone.now() + timedelta(seconds=settings.GENERATION_LEASE_SECONDS),
    )
    conversation.save(update_fields=["updated_at"])

    context: list[dict[str, str]] = []
    if settings.SYSTEM_PROMPT:
        context.append({"role": "system", "content": settings.SYSTEM_PROMPT})
    context.extend({"role": m.role, "content": m.content} for m in history)
    context.append({"role": "user", "content": request.message})
    start = StartEvent(conversation.pk, user_message.pk, reply.pk)
    return ReplyStart(start=start, context=context, existing=False)


def _history(conversation: Conversation) -> list[Message]:
    """The most recent earlier messages that have text (partial replies count), oldest first."""
    limit = settings.MAX_CHAT_HISTORY
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


def reply_log_append(batches: list[LogBatch]) -> set[int]:
    """Write batches of several replies at once. Returns the ids whose rows are gone (deleted)."""
    if not batches:
        return set()
    rows = [ReplyChunk(message_id=b.message_id, first_seq=b.first_seq, pieces=b.pieces) for b in batches]
    try:
        with transaction.atomic():
            ReplyChunk.objects.bulk_create(rows)
        return set()
    except IntegrityError:
        # A reply (or its conversation) was deleted while generating: write the others one by one.
        pass
    gone: set[int] = set()
    for row in rows:
        try:
            with transaction.atomic():
                row.save(force_insert=True)
        except IntegrityError:
            gone.add(row.message_id)
    return gone


@dataclass(frozen=True, slots=True)
class ReplyFinish:
    outcome: ReplyOutcome
    content: str
    last_batch: LogBatch | None
    ttft_ms: int | None
    duration_ms: int


def reply_finish(finish: ReplyFinish) -> bool:
    """Write the last pieces and the final row in one transaction, so a watcher that sees the
    terminal status also sees every piece. False when the row was no longer streaming."""
    outcome = finish.outcome
    with transaction.atomic():
        updated = Message.objects.filter(pk=outcome.message_id, status=Message.Status.STREAMING).update(
            status=outcome.status,
            content=finish.content,
            model=outcome.model,
            prompt_tokens=outcome.prompt_tokens,
            completion_tokens=outcome.completion_tokens,
            error_code=outcome.error_code,
            error_message=outcome.error_message[:500],
            ttft_ms=finish.ttft_ms,
            duration_ms=finish.duration_ms,
            lease_expires_at=None,
            finished_at=timezone.now(),
            updated_at=timezone.now(),
        )
        if updated and finish.last_batch is not None:
            batch = finish.last_batch
            ReplyChunk.objects.create(message_id=batch.message_id, first_seq=batch.first_seq, pieces=batch.pieces)
    return bool(updated)


def reply_renew_leases(message_ids: list[int]) -> None:
    if message_ids:
        expires = timezone.now() + timedelta(seconds=settings.GENERATION_LEASE_SECONDS)
        Message.objects.filter(pk__in=message_ids, status=Message.Status.STREAMING).update(lease_expires_at=expires)


def reply_ids_to_stop(message_ids: list[int]) -> set[int]:
    """Of these live replies, the ones stopped through another process, deleted, or reaped."""
    if not message_ids:
        return set()
    still_live = set(
        Message.objects.filter(pk__in=message_ids, status=Message.Status.STREAMING, stop_requested=False).values_list(
            "pk", flat=True
        )
    )
    return set(message_ids) - still_live


def reply_request_stop(*, message_id: int) -> None:
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


def reap_expired_replies() -> list[int]:
    """Mark replies whose generating process died as `interrupted`, keeping their logged text."""
    now = timezone.now()
    expired = list(
        Message.objects.filter(status=Message.Status.STREAMING, lease_expires_at__lt=now).values_list("pk", flat=True)
    )
    reaped = []
    for message_id in expired:
        with transaction.atomic():
            text = "".join(text for _, text in reply_pieces(message_id=message_id, after=0))
            updated = Message.objects.filter(
                pk=message_id, status=Message.Status.STREAMING, lease_expires_at__lt=now
            ).update(
                status=Message.Status.INTERRUPTED,
                content=text,
                error_code="interrupted",
                lease_expires_at=None,
                finished_at=now,
                updated_at=now,
            )
        if updated:
            reaped.append(message_id)
    return reaped


@dataclass(frozen=True, slots=True)
class ReplySnapshot:
    start: StartEvent
    outcome: ReplyOutcome | None  # None while still streaming
    pieces: list[tuple[int, str]]
    piece_count: int  # all logged pieces, for the terminal event's id


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
    return ReplySnapshot(start=start, outcome=outcome, pieces=pieces, piece_count=piece_count)


def reply_status(*, message_id: int) -> str | None:
    return Message.objects.filter(pk=message_id).values_list("status", flat=True).first()
