"""Migration operations of our own."""

from __future__ import annotations

from django.db import NotSupportedError, migrations


class AddIndexConcurrentlyOnPostgreSQL(migrations.AddIndex):
    """CREATE INDEX CONCURRENTLY on PostgreSQL, a plain CREATE INDEX on other databases.

    A plain CREATE INDEX holds back every write to the table while it reads the whole table, and
    with them the lease renewals of the replies streaming meanwhile: a build longer than a lease gets
    them reaped. Concurrently, writes go on. The migration that uses it must set atomic = False.

    Such a migration is recorded only once all its operations have run, so a run that stops midway
    (a lock or statement timeout, a deploy cancelled or killed) leaves behind an index the next run
    would trip over ("already exists"), and with `migrate` in the start command no later deploy
    would boot. On PostgreSQL a failed concurrent build even leaves an INVALID index of that name.
    So an index of this name is dropped first: one of ours that no recorded migration made is a
    leftover of such a run.

    Written on migrations.AddIndex rather than django.contrib.postgres's AddIndexConcurrently, whose
    module imports psycopg: a SQLite-only install can migrate without it."""

    def describe(self) -> str:
        return super().describe() + " (concurrently on PostgreSQL)"

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        model = to_state.apps.get_model(app_label, self.model_name)
        if not self.allow_migrate_model(schema_editor.connection.alias, model):
            return
        postgresql = schema_editor.connection.vendor == "postgresql"
        if postgresql and schema_editor.connection.in_atomic_block:
            raise NotSupportedError("Building an index concurrently needs a migration with atomic = False.")
        concurrently = " CONCURRENTLY" if postgresql else ""
        schema_editor.execute(f"DROP INDEX{concurrently} IF EXISTS {schema_editor.quote_name(self.index.name)}")
        if postgresql:
            schema_editor.add_index(model, self.index, concurrently=True)
        else:
            schema_editor.add_index(model, self.index)

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        model = from_state.apps.get_model(app_label, self.model_name)
        if not self.allow_migrate_model(schema_editor.connection.alias, model):
            return
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.remove_index(model, self.index, concurrently=True)
        else:
            schema_editor.remove_index(model, self.index)
