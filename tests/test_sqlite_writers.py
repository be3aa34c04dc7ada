"""SQLite: one process's writers queue on a lock (c3_app/sqlite_backend), not in SQLite's busy handler."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connection, transaction

from ai_features.models import Conversation

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(connection.vendor != "sqlite", reason="the lock is part of the SQLite backend only"),
]


def writer_lock():
    from c3_app.sqlite_backend.base import _writer

    return _writer


def test_the_lock_is_held_for_a_transaction_and_released_by_commit_and_by_rollback(user):
    with transaction.atomic():
        Conversation.objects.create(user=user, title="kept")
        assert writer_lock().locked()
    assert not writer_lock().locked()

    with pytest.raises(ZeroDivisionError), transaction.atomic():
        Conversation.objects.create(user=user, title="rolled back")
        assert writer_lock().locked()
        1 / 0
    assert not writer_lock().locked()
    assert list(Conversation.objects.values_list("title", flat=True)) == ["kept"]


def test_a_second_writer_starts_as_soon_as_the_first_commits(user):
    # SQLite's busy handler would retry after sleeps of 1, 2, 5 … 50, 100 ms: a writer that found
    # the database locked for 0.24 s would start ~90 ms after it was freed. The lock hands over at once.
    committed_at: list[float] = []
    started_at: list[float] = []

    def second_writer():
        try:
            with transaction.atomic():
                started_at.append(time.monotonic())
                Conversation.objects.create(user=user, title="second")
        finally:
            connection.close()

    with transaction.atomic():
        Conversation.objects.create(user=user, title="first")
        other = threading.Thread(target=second_writer)
        other.start()
        time.sleep(0.24)
    committed_at.append(time.monotonic())
    other.join(10)

    assert started_at, "the second writer never got in"
    assert started_at[0] >= committed_at[0] - 0.005  # it waited for the first one
    assert started_at[0] - committed_at[0] < 0.06
    assert list(Conversation.objects.order_by("id").values_list("title", flat=True)) == ["first", "second"]
