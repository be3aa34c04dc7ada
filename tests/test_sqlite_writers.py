"""SQLite: one process's writers queue on a lock (c3_app/sqlite_backend), not in SQLite's busy handler."""

from __future__ import annotations

import threading

import pytest
from django.db import connection, transaction

from ai_features.models import Conversation

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(connection.vendor != "sqlite", reason="the lock is part of the SQLite backend only"),
]


class RecordingLock:
    """The backend's lock, with a record of who waited for it and who got it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.waiting = threading.Event()  # some thread called acquire() while the lock was held
        self.acquired_by: list[str] = []

    def acquire(self, timeout: float = -1) -> bool:
        if self._lock.locked():
            self.waiting.set()
        got = self._lock.acquire(timeout=timeout)
        if got:
            self.acquired_by.append(threading.current_thread().name)
        return got

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()


@pytest.fixture
def writer_lock(monkeypatch):
    from c3_app.sqlite_backend import base

    lock = RecordingLock()
    monkeypatch.setattr(base, "_writer", lock)
    return lock


def test_the_lock_is_held_for_a_transaction_and_released_by_commit_rollback_and_close(user, writer_lock):
    with transaction.atomic():
        Conversation.objects.create(user=user, title="kept")
        assert writer_lock.locked()
    assert not writer_lock.locked()

    with pytest.raises(ZeroDivisionError), transaction.atomic():
        Conversation.objects.create(user=user, title="rolled back")
        assert writer_lock.locked()
        1 / 0
    assert not writer_lock.locked()

    with transaction.atomic():
        Conversation.objects.create(user=user, title="closed before its end")
        connection.close()
    assert not writer_lock.locked()
    assert list(Conversation.objects.values_list("title", flat=True)) == ["kept"]


def test_a_second_writer_waits_on_the_lock_and_gets_it_when_the_first_commits(user, writer_lock):
    second_wrote = threading.Event()

    def second_writer():
        try:
            with transaction.atomic():
                Conversation.objects.create(user=user, title="second")
            second_wrote.set()
        finally:
            connection.close()

    with transaction.atomic():
        Conversation.objects.create(user=user, title="first")
        other = threading.Thread(target=second_writer, name="second-writer")
        other.start()
        # It queues on the lock (not in SQLite's busy handler) while this transaction is open.
        assert writer_lock.waiting.wait(10)
        assert not second_wrote.is_set()
    other.join(10)

    assert second_wrote.is_set()
    assert writer_lock.acquired_by[-1] == "second-writer"  # it held the lock, not a timed-out wait
    assert list(Conversation.objects.order_by("id").values_list("title", flat=True)) == ["first", "second"]
