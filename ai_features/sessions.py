"""The session engine both services use: Django's database sessions with an indexed key digest."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from django.contrib.auth import get_user_model
from django.contrib.sessions.backends.db import SessionStore as DBStore
from django.db import connection
from django.utils import timezone

from .sql import db_datetime, statement

if TYPE_CHECKING:
    from django.contrib.auth.base_user import AbstractBaseUser

# What stream_auth checks of a user, in the model's field order (Model.from_db takes them so). These
# are django.contrib.auth's User's (AUTH_USER_MODEL is not swapped in this product); a custom user
# model would need its own columns here, and its default manager's filters, if any, in the query.
_USER_FIELDS = ("id", "password", "is_active")
_SESSION_AND_USER = (
    "SELECT s.session_key, s.session_data, u.{user_id}, u.{user_password}, u.{user_is_active}"
    " FROM {session} s LEFT JOIN {user} u ON u.{user_id} = %s"
    " WHERE s.key_digest = %s AND s.expire_date > %s"
)


def session_key_digest(session_key: str) -> str:
    # Session keys are 32 random characters, so a plain hash cannot be reversed.
    return hashlib.sha256(session_key.encode()).hexdigest()


class SessionStore(DBStore):
    @classmethod
    def get_model_class(cls):
        from ai_features.models import ChatSession

        return ChatSession

    @classmethod
    def with_user_by_key_digest(cls, digest: str, user_id: int) -> tuple[SessionStore, AbstractBaseUser | None] | None:
        """The live session a stream token names (by digest, not by key) and the row of the user the
        token names, in one query: one round trip before the first token instead of two.

        The user comes with only the columns the checks need (its primary key, password and
        is_active); any other field loads on first use, as a deferred field does. None: no such
        live session. (session, None): the user no longer exists.

        Hand-written, like the other statements every reply runs (ai_features/sql.py)."""
        with connection.cursor() as cursor:
            cursor.execute(statement(_SESSION_AND_USER), [user_id, digest, db_datetime(timezone.now())])
            row = cursor.fetchone()
        if row is None:
            return None
        store = cls(session_key=row[0])
        store._session_cache = store.decode(row[1])  # what load() would have read, without reading it again
        pk, password, is_active = row[2:]
        if pk is None:
            return store, None
        # SQLite returns booleans as 0/1, which the ORM's converter would have made bools.
        return store, get_user_model().from_db(connection.alias, _USER_FIELDS, [pk, password, bool(is_active)])

    def create_model_instance(self, data):
        instance = super().create_model_instance(data)
        instance.key_digest = session_key_digest(instance.session_key)
        return instance
