"""Hand-written SQL, for the few statements every reply runs (see docs/benchmarks.md, rounds 4-5).

Built as querysets they cost ~300 µs of Python each, against ~20 µs for the statement itself on
SQLite, on the threads whose GIL the event loop needs to relay tokens. Table names come from the
models and values are adapted as the ORM adapts them, so the SQL follows the models' definitions.
"""

from __future__ import annotations

import functools

from django.db import connection


@functools.cache
def statement(template: str) -> str:
    """`template` with {conversation}, {message}, {chunk}, {session} and {user} filled in with the
    models' table names, and {user_<field>} with the user model's column names, quoted for the
    database. Built once per template."""
    from django.contrib.auth import get_user_model

    from .models import ChatSession, Conversation, Message, ReplyChunk

    qn = connection.ops.quote_name
    user_model = get_user_model()
    return template.format(
        conversation=qn(Conversation._meta.db_table),
        message=qn(Message._meta.db_table),
        chunk=qn(ReplyChunk._meta.db_table),
        session=qn(ChatSession._meta.db_table),
        user=qn(user_model._meta.db_table),
        **{f"user_{field.name}": qn(field.column) for field in user_model._meta.concrete_fields},
    )


def db_datetime(value):
    """A datetime as the ORM would store it (SQLite keeps naive UTC text and compares it as text)."""
    return connection.ops.adapt_datetimefield_value(value)
