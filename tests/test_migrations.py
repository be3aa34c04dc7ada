"""Migrations on a database of their own: they apply, reverse, and survive a run that stopped midway.

`migrate` runs in the main app's start command (render.yaml), so a migration that cannot be run
again after a failure keeps every later deploy from booting."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.stack import ScratchPostgres, postgres_url

ROOT = Path(__file__).resolve().parent.parent
LIVE_INDEXES = ("message_user_live", "message_stop_requested")


class ScratchDatabase:
    """An empty database of the suite's kind (SQLite, or PostgreSQL when DATABASE_URL names one)."""

    def __init__(self, tmp_path: Path) -> None:
        base = postgres_url()
        self.postgres = ScratchPostgres(base, prefix="c3_migrations") if base else None
        self.path = tmp_path / "migrations.sqlite3"
        self.url = self.postgres.url if self.postgres else f"sqlite:///{self.path}"

    @property
    def postgresql(self) -> bool:
        return self.postgres is not None

    def manage(self, *args: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "PYTEST"))}
        return subprocess.run(
            [sys.executable, "manage.py", *args], cwd=ROOT, env={**env, "DEBUG": "1", "DATABASE_URL": self.url},
            capture_output=True, text=True, timeout=120,
        )

    def sql(self, statement: str) -> list[tuple]:
        if self.postgres:
            import psycopg

            with psycopg.connect(urlunsplit(urlsplit(self.url)._replace(scheme="postgresql")), autocommit=True) as conn:
                cursor = conn.execute(statement)
                return cursor.fetchall() if cursor.description else []
        import sqlite3

        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            return conn.execute(statement).fetchall()
        finally:
            conn.close()

    def live_indexes(self) -> dict[str, str]:
        """Each live-reply index there is: its definition, and on PostgreSQL whether it is valid."""
        names = ", ".join(f"'{name}'" for name in LIVE_INDEXES)
        if self.postgresql:
            rows = self.sql(
                "SELECT c.relname, pg_get_indexdef(i.indexrelid) || CASE WHEN i.indisvalid THEN '' ELSE ' INVALID' END"
                f" FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname IN ({names})"
            )
        else:
            rows = self.sql(f"SELECT name, sql FROM sqlite_master WHERE type = 'index' AND name IN ({names})")
        return dict(rows)

    def drop(self) -> None:
        if self.postgres:
            self.postgres.drop()


@pytest.fixture
def scratch(tmp_path) -> Iterator[ScratchDatabase]:
    database = ScratchDatabase(tmp_path)
    try:
        yield database
    finally:
        database.drop()


def migrated(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout + result.stderr


def assert_live_indexes_built(scratch: ScratchDatabase) -> None:
    indexes = scratch.live_indexes()
    assert set(indexes) == set(LIVE_INDEXES)
    for definition in indexes.values():
        assert "INVALID" not in definition
        assert "WHERE" in definition.upper()  # the partial index, not whatever had its name before


def test_migrations_apply_reverse_and_apply_again(scratch):
    migrated(scratch.manage("migrate", "--noinput"))
    assert_live_indexes_built(scratch)
    migrated(scratch.manage("migrate", "ai_features", "0001", "--noinput"))
    assert scratch.live_indexes() == {}
    migrated(scratch.manage("migrate", "--noinput"))
    assert_live_indexes_built(scratch)
    check = scratch.manage("makemigrations", "--check", "--dry-run")
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_migration_run_that_stopped_midway_can_be_run_again(scratch):
    migrated(scratch.manage("migrate", "--noinput"))
    migrated(scratch.manage("migrate", "ai_features", "0001", "--noinput"))
    scratch.sql("INSERT INTO ai_features_chatsession (session_key, session_data, expire_date, key_digest)"
                " VALUES ('a', '', '2000-01-01', 'd1'), ('b', '', '2000-01-01', 'd1')")
    # What a stopped run leaves: the first index built but the migration not recorded, and on
    # PostgreSQL the second an INVALID index (a concurrent build that failed: here a unique index
    # over duplicates, as a lock timeout or a cancelled deploy would leave it).
    scratch.sql("CREATE INDEX message_user_live ON ai_features_message (id)")
    if scratch.postgresql:
        with pytest.raises(Exception, match="could not create unique index"):
            scratch.sql("CREATE UNIQUE INDEX CONCURRENTLY message_stop_requested ON ai_features_chatsession (key_digest)")
        assert scratch.live_indexes()["message_stop_requested"].endswith("INVALID")
    else:
        scratch.sql("CREATE INDEX message_stop_requested ON ai_features_chatsession (key_digest)")

    migrated(scratch.manage("migrate", "--noinput"))
    assert_live_indexes_built(scratch)
