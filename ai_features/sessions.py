"""The session engine both services use: Django's database sessions with an indexed key digest."""

from __future__ import annotations

import hashlib

from django.contrib.sessions.backends.db import SessionStore as DBStore
from django.db import connection
from django.utils import timezone

from .sql import db_datetime, statement


def session_key_digest(session_key: str) -> str:
    # Session keys are 32 random characters, so a plain hash cannot be reversed.
    return hashlib.sha256(session_key.encode()).hexdigest()


class SessionStore(DBStore):
    @classmethod
    def get_model_class(cls):
        from ai_features.models import ChatSession

        return ChatSession

    @classmethod
    def from_key_digest(cls, digest: str) -> SessionStore | None:
        """The live session a stream token names, loaded in one query (by digest, not by key).

        Hand-written, like the other statements every reply runs (ai_features/sql.py)."""
        with connection.cursor() as cursor:
            cursor.execute(
                statement("SELECT session_key, session_data FROM {session} WHERE key_digest = %s AND expire_date > %s"),
                [digest, db_datetime(timezone.now())],
            )
            row = cursor.fetchone()
        if row is None:
            return None
        store = cls(session_key=row[0])
        store._session_cache = store.decode(row[1])  # what load() would have read, without reading it again
        return store

    def create_model_instance(self, data):
        instance = super().create_model_instance(data)
        instance.key_digest = session_key_digest(instance.session_key)
        return instance
