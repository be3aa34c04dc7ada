"""Units of database work on the sidecar's threads: when Django's connection health check runs.

PostgreSQL only: SQLite's connections cannot be lost this way (Django never checks them).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import DatabaseError, connection, connections

from ai_features.streaming import runtime

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(connection.vendor != "postgresql", reason="health checks matter for network databases"),
]


@pytest.fixture
def db_thread():
    """One database thread with a persistent, health-checked connection, as the sidecar runs them
    (the test settings close connections after every unit)."""
    settings_dict = connections.settings["default"]
    saved = settings_dict["CONN_MAX_AGE"], settings_dict["CONN_HEALTH_CHECKS"]
    settings_dict["CONN_MAX_AGE"], settings_dict["CONN_HEALTH_CHECKS"] = 60, True
    pool = ThreadPoolExecutor(max_workers=1)

    def run(fn):
        return pool.submit(runtime._unit_of_work, fn, (), {}).result()

    try:
        yield run
    finally:
        pool.submit(lambda: connection.close()).result()  # looked up in that thread
        pool.shutdown()
        settings_dict["CONN_MAX_AGE"], settings_dict["CONN_HEALTH_CHECKS"] = saved


def backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def count_health_checks() -> list[int]:
    """Patch this thread's connection so that its health checks are counted."""
    calls = [0]
    real = connection.is_usable

    def is_usable():
        calls[0] += 1
        return real()

    connection.is_usable = is_usable
    return calls


def terminate(pid: int) -> None:
    with connection.cursor() as cursor:  # the test's own connection
        cursor.execute("SELECT pg_terminate_backend(%s)", [pid])


def test_a_connection_used_moments_ago_is_not_checked_again_but_an_idle_one_is(db_thread, monkeypatch):
    first = db_thread(backend_pid)
    calls = db_thread(count_health_checks)

    assert db_thread(backend_pid) == first
    assert calls == [0]  # used a moment ago: no extra round trip

    monkeypatch.setattr(runtime, "HEALTH_CHECK_IDLE_SECONDS", 0.0)  # every connection counts as idle
    assert db_thread(backend_pid) == first
    assert calls == [1]


def test_a_connection_lost_while_idle_is_replaced_before_the_unit_runs(db_thread, monkeypatch):
    first = db_thread(backend_pid)
    terminate(first)
    monkeypatch.setattr(runtime, "HEALTH_CHECK_IDLE_SECONDS", 0.0)

    second = db_thread(backend_pid)

    assert second != first


def test_a_connection_lost_moments_after_use_fails_one_unit_and_the_next_reconnects(db_thread):
    first = db_thread(backend_pid)
    terminate(first)

    with pytest.raises(DatabaseError):
        db_thread(backend_pid)  # the trade-off: what a unit met without health checks
    second = db_thread(backend_pid)

    assert second != first
