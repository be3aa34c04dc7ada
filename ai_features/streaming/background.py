"""A generation runtime on its own thread, for WSGI processes (gunicorn, runserver, tests).

WSGI views are synchronous and a request thread ends when its client goes away, but a reply must
outlive the request that asked for it. So each process gets one event loop in a daemon thread that
owns the replies; views hand it coroutines and read their SSE bytes through a small bridge.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

from django.conf import settings

from .runtime import GenerationRuntime

T = TypeVar("T")


class BackgroundRuntime:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.runtime = GenerationRuntime()
        self._thread = threading.Thread(target=self.loop.run_forever, name="c3-generation", daemon=True)
        self._thread.start()
        self.call(self.runtime.start())

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def iterate(self, body: AsyncIterator[bytes]) -> Iterator[bytes]:
        """Drive an async body from a WSGI thread. When the client disconnects, the server closes
        this iterator, which closes the watcher (never the reply itself)."""

        async def next_chunk() -> bytes | None:
            try:
                return await anext(body)
            except StopAsyncIteration:
                return None

        try:
            while (chunk := self.call(next_chunk())) is not None:
                yield chunk
        finally:
            aclose = getattr(body, "aclose", None)
            if aclose is not None and not self.loop.is_closed():
                self.call(aclose(), timeout=10)

    def shutdown(self) -> None:
        if self.loop.is_running():
            self.call(self.runtime.shutdown(settings.GENERATION_SHUTDOWN_GRACE_SECONDS))
            self.loop.call_soon_threadsafe(self.loop.stop)


_instance: BackgroundRuntime | None = None
_lock = threading.Lock()


def background_runtime() -> BackgroundRuntime:
    """This process's runtime, started on first use (after gunicorn forked its workers)."""
    global _instance
    with _lock:
        if _instance is None:
            _instance = BackgroundRuntime()
            atexit.register(_instance.shutdown)
        return _instance
