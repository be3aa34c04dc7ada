"""Storing a new reply: on PostgreSQL one statement does what the ORM path does in six to eight.

Each statement is a network round trip on a hosted database, before the reply's first token. The
one-statement path must store exactly the rows the ORM path stores, refuse exactly what it refuses,
and store nothing when it refuses.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta
from http import HTTPStatus

import pytest
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.test.utils import CaptureQueriesContext

from ai_features import services
from ai_features.models import Conversation, Message
from ai_features.streaming.validation import ApiError, ReplyRequest

pytestmark = pytest.mark.django_db

postgresql_only = pytest.mark.skipif(connection.vendor != "postgresql", reason="the one-statement path is PostgreSQL's")


def store_with_the_orm(user, request: ReplyRequest) -> services.ReplyStart:
    services._check_rate_limits(user)
    with transaction.atomic():
        return services._store_new_reply(user=user, request=request, model="m")


def store_in_one_statement(user, request: ReplyRequest) -> services.ReplyStart:
    return services._store_new_reply_in_one_statement(user=user, request=request, model="m")


def a_conversation_with_history(user) -> Conversation:
    conversation = Conversation.objects.create(user=user, title="earlier")
    for role, content in [("user", "first"), ("assistant", "one"), ("user", "second"), ("system", "not history"),
                          ("assistant", ""), ("assistant", "partial reply")]:
        Message.objects.create(conversation=conversation, user=user, role=role, content=content)
    return conversation


def stored(start: services.ReplyStart, *, follow_up: bool) -> dict:
    """The rows a reply start stored, as comparable values (ids and stamps aside)."""
    def values(obj, *skip):
        return {f.attname: getattr(obj, f.attname) for f in obj._meta.concrete_fields
                if not f.primary_key and f.attname not in skip}

    stamps = ("created_at", "updated_at", "lease_expires_at", "conversation_id", "reply_to_id")
    conversation = Conversation.objects.get(pk=start.start.conversation_id)
    user_message = Message.objects.get(pk=start.start.user_message_id)
    reply = Message.objects.get(pk=start.start.assistant_message_id)
    assert user_message.conversation_id == reply.conversation_id == conversation.pk
    assert reply.reply_to_id == user_message.pk and user_message.reply_to_id is None
    lease = reply.lease_expires_at - reply.created_at
    assert abs(lease.total_seconds() - settings.GENERATION_LEASE_SECONDS) < 5
    assert user_message.lease_expires_at is None
    assert reply.created_at >= user_message.created_at >= conversation.created_at
    if follow_up:  # stamped after its new messages, as the ORM path's save(update_fields=...)
        assert conversation.updated_at >= reply.created_at
    return {
        "conversation": values(conversation, "created_at", "updated_at"),
        "user_message": values(user_message, *stamps),
        "reply": values(reply, *stamps),
        "context": start.context,
    }


@postgresql_only
@pytest.mark.parametrize("follow_up", [False, True])
def test_one_statement_stores_what_the_orm_stores(user, follow_up, settings):
    settings.MAX_CHAT_HISTORY = 3
    conversations = [a_conversation_with_history(user) if follow_up else None for _ in range(2)]
    # What the JSON records and SQL quoting must carry through unchanged.
    message = "What next? 100% 'sure' \"q\" back\\slash %s {x} \u2028 ünïcode 🙂"
    results = []
    for store, conversation, client_id in [(store_with_the_orm, conversations[0], "a %s 'q' \\"),
                                           (store_in_one_statement, conversations[1], "b %s 'q' \\")]:
        request = ReplyRequest(message=message, conversation_id=conversation.pk if conversation else None,
                               client_message_id=client_id)
        results.append(stored(store(user, request), follow_up=follow_up))
    for result, client_id, conversation in zip(results, ("a %s 'q' \\", "b %s 'q' \\"), conversations):
        assert result["user_message"].pop("client_message_id") == client_id
        assert result["user_message"]["content"] == message
        assert result["conversation"]["title"] == ("earlier" if follow_up else services._title_from(message))
        assert result["conversation"]["user_id"] == result["user_message"]["user_id"] == user.pk
        assert result["reply"]["user_id"] == user.pk
    assert results[0] == results[1]
    if follow_up:
        # The last three user and assistant messages with text, oldest first: not the empty reply,
        # not the system row.
        assert [m["content"] for m in results[1]["context"][1:-1]] == ["one", "second", "partial reply"]


@postgresql_only
def test_one_statement_adds_to_the_conversation_asked_for(user):
    mine = [a_conversation_with_history(user) for _ in range(2)]

    started = store_in_one_statement(user, ReplyRequest(message="here", conversation_id=mine[1].pk))

    assert started.start.conversation_id == mine[1].pk
    assert Message.objects.filter(conversation=mine[0]).count() == 6


@postgresql_only
def test_a_follow_up_stamps_its_conversation(user):
    conversation = a_conversation_with_history(user)
    Conversation.objects.filter(pk=conversation.pk).update(updated_at=conversation.updated_at - timedelta(hours=1))
    before = Conversation.objects.get(pk=conversation.pk).updated_at

    store_in_one_statement(user, ReplyRequest(message="again", conversation_id=conversation.pk))

    assert Conversation.objects.get(pk=conversation.pk).updated_at > before


@postgresql_only
@pytest.mark.django_db(transaction=True)  # autocommit, as on the database threads: no savepoint
@pytest.mark.parametrize("follow_up", [False, True])
def test_a_new_reply_is_one_statement_on_postgresql(user, follow_up):
    conversation = a_conversation_with_history(user) if follow_up else None
    request = ReplyRequest(message="hi", conversation_id=conversation.pk if conversation else None)

    with CaptureQueriesContext(connection) as queries:
        services.reply_start(user=user, request=request, model="m")

    assert len(queries) == 1


def row_counts() -> tuple[int, int]:
    return Conversation.objects.count(), Message.objects.count()


@pytest.mark.parametrize("limit", ["RATE_LIMIT_MESSAGES_PER_MINUTE", "MAX_CONCURRENT_REPLIES_PER_USER"])
@pytest.mark.parametrize("follow_up", [False, True])
def test_over_a_limit_nothing_is_stored_locked_or_stamped(user, follow_up, limit, settings):
    """In the caller's own conversation too: the limit, not the lookup, is what refuses."""
    mine = a_conversation_with_history(user)
    store = services.reply_start
    store(user=user, request=ReplyRequest(message="a live reply"), model="m")  # one live reply, 3 messages
    counts, stamped = row_counts(), Conversation.objects.get(pk=mine.pk).updated_at
    setattr(settings, limit, 1)

    with pytest.raises(ApiError) as refused:
        store(user=user, request=ReplyRequest(message="hi", conversation_id=mine.pk if follow_up else None), model="m")

    assert refused.value.status == HTTPStatus.TOO_MANY_REQUESTS
    assert row_counts() == counts
    assert Conversation.objects.get(pk=mine.pk).updated_at == stamped


@postgresql_only
@pytest.mark.parametrize("in_a_transaction", [False, True])
def test_a_repeated_client_message_id_stores_nothing_more(user, in_a_transaction):
    request = ReplyRequest(message="once", client_message_id="same-id")
    first = store_in_one_statement(user, request)
    counts = row_counts()

    with transaction.atomic() if in_a_transaction else contextlib.nullcontext():
        with pytest.raises(IntegrityError):
            store_in_one_statement(user, request)
        assert row_counts() == counts  # the caller's transaction still works
        again = services.reply_start(user=user, request=request, model="m")

    assert again.existing and again.start == first.start
    assert row_counts() == counts


@pytest.mark.parametrize("follow_up", [False, True])
def test_a_refused_reply_stores_nothing(user, other_user, follow_up, settings):
    """Both paths, whichever database runs the tests: over a limit (429) or someone else's
    conversation (404), nothing is stored, and the limit is reported before the 404."""
    theirs = a_conversation_with_history(other_user)
    request = ReplyRequest(message="hi", conversation_id=theirs.pk if follow_up else None)
    counts = row_counts()

    settings.RATE_LIMIT_MESSAGES_PER_MINUTE = 0
    with pytest.raises(ApiError) as refused:
        services.reply_start(user=user, request=request, model="m")
    assert refused.value.status == HTTPStatus.TOO_MANY_REQUESTS
    assert row_counts() == counts

    settings.RATE_LIMIT_MESSAGES_PER_MINUTE = 100
    if follow_up:
        with pytest.raises(ApiError) as refused:
            services.reply_start(user=user, request=request, model="m")
        assert refused.value.status == HTTPStatus.NOT_FOUND
        assert row_counts() == counts
        assert Conversation.objects.get(pk=theirs.pk).updated_at == theirs.updated_at


@postgresql_only
def test_a_value_too_long_for_its_column_is_refused_not_cut_short(user):
    from django.db import DataError

    counts = row_counts()
    with pytest.raises(DataError):
        services._store_new_reply_in_one_statement(user=user, request=ReplyRequest(message="hi"), model="m" * 101)
    assert row_counts() == counts


@pytest.mark.parametrize("conversation_id", [2**63, 2**70])
def test_a_conversation_id_past_the_database_integers_is_not_found(user, conversation_id):
    counts = row_counts()
    with pytest.raises(ApiError) as refused:
        services.reply_start(user=user, request=ReplyRequest(message="hi", conversation_id=conversation_id), model="m")
    assert refused.value.status == HTTPStatus.NOT_FOUND
    assert row_counts() == counts
