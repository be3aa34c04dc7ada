"""Django's SQLite backend, with one process's writers taking turns on a Python lock.

SQLite lets one writer in at a time. A transaction that finds the database locked waits in SQLite's
busy handler, which sleeps 1, 2, 5, 10 … up to 100 ms between tries: under a burst of writers (the
sidecar's database threads storing, logging and finishing replies at once) most of the wait was sleep
after the lock had been freed. Here the writers of one process queue on a lock that is handed over as
soon as a transaction ends; SQLite's busy handler still arbitrates between processes (the sidecar and
gunicorn's workers). One lock per process: the project has one database.

Writes made outside a transaction (autocommit) do not queue here: the services that write from
request paths wrap theirs in `transaction.atomic()` so that they queue like the rest.
"""

from __future__ import annotations

import threading

from django.db.backends.sqlite3 import base

_writer = threading.Lock()


class DatabaseWrapper(base.DatabaseWrapper):
    _holds_writer = False

    def _start_transaction_under_autocommit(self):
        # Every transaction here is BEGIN IMMEDIATE (a writer). Wait no longer than SQLite itself
        # would: past that, go on and let SQLite's busy handler decide, so nothing waits forever
        # (at worst the timeout twice, when a holder is itself stuck behind another process).
        if not self._holds_writer:  # never wait on a lock this connection already holds
            self._holds_writer = _writer.acquire(timeout=self.settings_dict["OPTIONS"].get("timeout", 5))
        try:
            super()._start_transaction_under_autocommit()
        except BaseException:
            self._release_writer()
            raise

    def _commit(self):
        try:
            return super()._commit()
        finally:
            self._release_writer()

    def _rollback(self):
        try:
            return super()._rollback()
        finally:
            self._release_writer()

    def _close(self):
        try:
            return super()._close()
        finally:
            self._release_writer()

    def _release_writer(self) -> None:
        if self._holds_writer:
            self._holds_writer = False
            _writer.release()
