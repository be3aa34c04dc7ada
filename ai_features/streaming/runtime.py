"""Durable generations: a reply is a task of the process that started it; HTTP responses only watch.

    launch() ──▶ _generate(): provider deltas ─▶ LiveReply.pieces (memory) ──▶ in-process watchers
                                                        │
                 _maintain() every tick: one batched log write for all live replies,
                 lease renewal, Stop requests made through other processes, the reaper
                                                        │
    watch() on another process ◀── polls the ReplyChunk log and the row's status ◀┘

Nothing is written per token: a reply costs a start row, one log row per flush tick while it
streams, and a final update. A watcher that goes away never stops the reply; only Stop does.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from django.conf import settings
from django.db import close_old_connections, connection

from .. import services
from .events import ContentEvent, ReplyEvent, ReplyOutcome, StartEvent, TerminalEvent
from .providers import DemoProvider, OpenAIProvider, Provider, ProviderError

logger = logging.getLogger(__name__)
T = TypeVar("T")

# --- Database work off the event loop -------------------------------------------------------------

_db_executor: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _db_executor
    if _db_executor is None:
        # Each thread holds at most one connection: connections are bounded by this pool, not by
        # the number of streams.
        _db_executor = ThreadPoolExecutor(max_workers=settings.DB_THREADS, thread_name_prefix="c3-db")
    return _db_executor


# A connection this thread used less than this long ago is taken to be alive. With
# CONN_HEALTH_CHECKS, Django checks a persistent connection at the start of every unit of work with
# a query of its own: a round trip to the database (a network one on a hosted database) before the
# first statement of every new reply, and ~30 µs of client CPU, although under load the same
# connection was used a few milliseconds earlier. A connection idle for longer (the usual way to
# lose one: a server or pooler closing idle connections) is still checked; one lost within this
# window fails the unit that meets it, as it would without health checks, and Django replaces it
# before the next one (errors_occurred).
HEALTH_CHECK_IDLE_SECONDS = 5.0
# How often a process checks that its silent replies were not deleted or reaped elsewhere (the Stop
# poll, every GENERATION_POLL_SECONDS, reads only the replies asked to stop).
GONE_CHECK_SECONDS = 1.0
_thread_state = threading.local()


def _unit_of_work(fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
    # These threads get no request_started/finished signals, so do what they would do.
    close_old_connections()
    if time.monotonic() - getattr(_thread_state, "used_at", -HEALTH_CHECK_IDLE_SECONDS) < HEALTH_CHECK_IDLE_SECONDS:
        connection.health_check_done = True
    try:
        return fn(*args, **kwargs)
    finally:
        close_old_connections()
        _thread_state.used_at = time.monotonic()


async def run_db(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_executor(), functools.partial(_unit_of_work, fn, args, kwargs))


# --- One reply being generated in this process ----------------------------------------------------


class ReplyLimitReached(Exception):
    pass


class LeaseLost(Exception):
    """Another process reaped this reply while this one was stalled: stop adding to it."""


@dataclass(eq=False)
class LiveReply:
    start: StartEvent
    model: str
    pieces: list[str] = field(default_factory=list)
    flushed: int = 0  # pieces already in the log
    terminal: TerminalEvent | None = None
    # Bumped by every wake-up. A watcher that saw version v waits only while it is still v, so
    # what arrives while it is sending a batch is never missed.
    version: int = 0
    waiters: list[asyncio.Future] = field(default_factory=list)
    task: asyncio.Task | None = None
    stop_reason: str | None = None  # "stopped", "shutdown", "gone" (deleted or reaped elsewhere)
    started: bool = False  # _generate is running (so a cancellation reaches its except clause)
    finishing: bool = False
    write_in_flight: asyncio.Task | None = None
    started_at: float = field(default_factory=time.monotonic)
    last_event_at: float = field(default_factory=time.monotonic)  # for heartbeats
    first_piece_at: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    # Until when (monotonic) this process may assume its lease still holds. Past it, the reply is
    # not extended until the database confirms nobody reaped it meanwhile (a stall, a pause).
    lease_deadline: float = 0.0

    @property
    def id(self) -> int:
        return self.start.assistant_message_id

    def append(self, text: str) -> None:
        if self.first_piece_at is None:
            self.first_piece_at = time.monotonic()
        self.pieces.append(text)
        self._notify()

    def _notify(self) -> None:
        # Wake every watcher at once; each one then reads what it has not seen yet. A wake with
        # nothing new is a heartbeat (see GenerationRuntime._beat_forever). One bare future per
        # waiting watcher rather than a new asyncio.Event per piece (an Event allocates a deque
        # and binds itself to the loop under a global threading lock on its first wait): 2-3 µs
        # less per token (bench/pipeline.py, docs/benchmarks.md round 8).
        self.last_event_at = time.monotonic()
        self.version += 1
        if self.waiters:
            waiters, self.waiters = self.waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def changed_since(self, version: int) -> None:
        """Return once the reply has changed since `version` (at once if it already has)."""
        if self.version == version:
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                # The watcher's client went away: its future must not wait for the next wake-up
                # (on a silent reply, a heartbeat interval away) to be let go.
                if waiter in self.waiters:
                    self.waiters.remove(waiter)
                raise

    def request_stop(self, reason: str) -> None:
        if self.finishing or self.task is None or self.task.done():
            return
        self.stop_reason = reason
        # A task cancelled before its first step never runs its body, so it would skip its own
        # ending (the row would stay "streaming"); not started yet, _generate sees stop_reason.
        if self.started:
            self.task.cancel()


# --- The runtime ------------------------------------------------------------------------------------


class GenerationRuntime:
    """Owns this process's live replies. Must be started and used on one event loop."""

    def __init__(self) -> None:
        self.live: dict[int, LiveReply] = {}
        self.accepting = True
        self._providers: dict[tuple, Provider] = {}
        self._maintenance: asyncio.Task | None = None
        self._heartbeats: asyncio.Task | None = None
        self._shutdown: asyncio.Task | None = None

    # Life cycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        # A process that starts reaps what a dead predecessor left streaming.
        try:
            await run_db(services.reap_expired_replies)
        except Exception:  # noqa: BLE001 - a database hiccup at boot must not stop the service
            logger.exception("could not reap expired replies at start")
        self._maintenance = asyncio.create_task(self._maintain(), name="c3-generation-maintenance")
        self._heartbeats = asyncio.create_task(self._beat_forever(), name="c3-heartbeats")

    def begin_shutdown(self, grace_seconds: float) -> asyncio.Task:
        """Refuse new replies now; let running ones finish within the grace period, then store the
        rest as interrupted with their text (their watchers get that terminal event). Idempotent:
        SIGTERM starts it, the lifespan's end awaits the same task."""
        if self._shutdown is None:
            self.accepting = False
            self._shutdown = asyncio.create_task(self._shut_down(grace_seconds), name="c3-generation-shutdown")
        return self._shutdown

    async def shutdown(self, grace_seconds: float) -> None:
        await self.begin_shutdown(grace_seconds)

    async def _shut_down(self, grace_seconds: float) -> None:
        tasks = [reply.task for reply in self.live.values() if reply.task]
        if tasks and grace_seconds > 0:
            await asyncio.wait(tasks, timeout=grace_seconds)
        # Again until none is left: a request that passed the `accepting` check just before the
        # shutdown began launches its reply afterwards, and that one must end as interrupted too.
        while running := [reply.task for reply in self.live.values() if reply.task and not reply.task.done()]:
            for reply in list(self.live.values()):
                reply.request_stop("shutdown")
            await asyncio.gather(*running, return_exceptions=True)
        for task in (self._maintenance, self._heartbeats):
            if task:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        for provider in self._providers.values():
            await provider.aclose()
        self._providers.clear()

    def provider(self) -> Provider:
        """The configured model provider, one per runtime (its connection pool belongs to this loop)."""
        if settings.OPENAI_API_KEY:
            key: tuple = ("openai", settings.OPENAI_API_KEY, settings.OPENAI_BASE_URL, settings.OPENAI_MODEL,
                          settings.OPENAI_TIMEOUT_SECONDS)
        else:
            key = ("demo", settings.DEMO_MODEL_DELAY_MS)
        provider = self._providers.get(key)
        if provider is None:
            if key[0] == "openai":
                provider = OpenAIProvider(
                    api_key=settings.OPENAI_API_KEY,
                    base_url=settings.OPENAI_BASE_URL,
                    model=settings.OPENAI_MODEL,
                    timeout_seconds=settings.OPENAI_TIMEOUT_SECONDS,
                )
            else:
                provider = DemoProvider(delay_seconds=settings.DEMO_MODEL_DELAY_MS / 1000)
            self._providers[key] = provider
        return provider

    # Generating ----------------------------------------------------------------------------------

    def launch(self, start: StartEvent, context: list[dict[str, str]], provider: Provider) -> LiveReply:
        reply = LiveReply(start=start, model=provider.model, lease_deadline=self._lease_deadline_from(time.monotonic()))
        self.live[reply.id] = reply
        reply.task = asyncio.create_task(self._generate(reply, provider, context), name=f"c3-reply-{reply.id}")
        return reply

    @staticmethod
    def _lease_deadline_from(renewed_at: float) -> float:
        # A margin below the lease, for clock differences between this process and the reaper's.
        return renewed_at + settings.GENERATION_LEASE_SECONDS * 0.8

    async def _confirm_lease(self, reply: LiveReply) -> None:
        renewed_at = time.monotonic()
        if reply.id not in await run_db(services.reply_renew_leases, [reply.id]):
            raise LeaseLost
        reply.lease_deadline = self._lease_deadline_from(renewed_at)

    async def _generate(self, reply: LiveReply, provider: Provider, context: list[dict[str, str]]) -> None:
        reply.started = True
        status, error_code, error_message = "completed", "", ""
        model_finished = False
        max_pieces = settings.MAX_REPLY_TOKENS  # read once: a Django setting costs ~0.4 µs a read
        try:
            if reply.stop_reason is not None:
                raise asyncio.CancelledError  # stopped before it could start: end it the same way
            async with asyncio.timeout(settings.MAX_REPLY_SECONDS):
                # aclosing: leaving early (Stop, a limit) closes the provider's upstream request.
                async with aclosing(provider.stream(context)) as deltas:
                    async for delta in deltas:
                        if delta.text:
                            if time.monotonic() >= reply.lease_deadline:
                                await self._confirm_lease(reply)
                            reply.append(delta.text)
                            if len(reply.pieces) >= max_pieces:
                                raise ReplyLimitReached
                        if delta.prompt_tokens is not None:
                            reply.prompt_tokens = delta.prompt_tokens
                        if delta.completion_tokens is not None:
                            reply.completion_tokens = delta.completion_tokens
                        if delta.finished:
                            model_finished = True
        except asyncio.CancelledError:
            # Stop cancels this task; so does a shutdown past its grace period. Either way the
            # text so far is kept: swallow the cancellation and finish the row below.
            status = "cancelled" if reply.stop_reason in ("stopped", "gone") else "interrupted"
        except LeaseLost:
            status = "interrupted"  # what the reaper stored; _finish reports the stored outcome
        except TimeoutError:
            status, error_code = "error", "reply_too_long"
            error_message = f"The reply reached the {settings.MAX_REPLY_SECONDS:g}-second limit and was ended."
        except ReplyLimitReached:
            status, error_code = "error", "reply_too_long"
            error_message = f"The reply reached the {settings.MAX_REPLY_TOKENS}-token limit and was ended."
        except ProviderError as exc:
            status, error_code, error_message = "error", exc.code, exc.message
        except Exception:  # noqa: BLE001 - any bug still ends the reply with its text kept
            logger.exception("reply %s failed", reply.id)
            status, error_code, error_message = "error", "internal_error", "Something went wrong while generating the reply."
        if model_finished:
            # The model said the reply is complete; a Stop, shutdown or limit that arrives while
            # the provider tidies its connection up does not make it less so.
            status, error_code, error_message = "completed", "", ""
        try:
            await self._finish(reply, status, error_code, error_message)
        except Exception:  # noqa: BLE001 - a bug in ending the reply must not leave it live forever
            logger.exception("could not end reply %s", reply.id)
            self._abandon(reply)

    def _abandon(self, reply: LiveReply) -> None:
        """End a reply whose own ending failed: its watchers get an error event instead of waiting
        forever, and this process stops renewing its lease, so the reaper ends the row with its
        logged text once the lease expires, as for a process that died."""
        if reply.terminal is None:
            outcome = ReplyOutcome(message_id=reply.id, status="error", model=reply.model, error_code="internal_error",
                                   error_message="Something went wrong while ending the reply.")
            reply.terminal = outcome.terminal_event(len(reply.pieces) + 1)
            reply._notify()
        self.live.pop(reply.id, None)

    async def _finish(self, reply: LiveReply, status: str, error_code: str, error_message: str) -> None:
        reply.finishing = True
        if reply.write_in_flight is not None:
            await asyncio.gather(reply.write_in_flight, return_exceptions=True)
        ended = time.monotonic()
        completion_tokens = reply.completion_tokens
        if completion_tokens is None and reply.pieces:
            completion_tokens = len(reply.pieces)  # the model never reported usage: one delta ≈ one token
        outcome = ReplyOutcome(
            message_id=reply.id,
            status=status,
            model=reply.model,
            prompt_tokens=reply.prompt_tokens,
            completion_tokens=completion_tokens,
            error_code=error_code or ("interrupted" if status == "interrupted" else ""),
            error_message=error_message,
        )
        finish = services.ReplyFinish(
            outcome=outcome,
            content="".join(reply.pieces),
            last_batches=services.log_batches(reply.id, reply.pieces, logged=reply.flushed),
            ttft_ms=round((reply.first_piece_at - reply.started_at) * 1000) if reply.first_piece_at else None,
            duration_ms=round((ended - reply.started_at) * 1000),
        )
        stored = await self._store_finish(finish)
        if not stored:
            # Deleted, or reaped while this process was stalled: the database's outcome wins, so a
            # replay and this live stream end the same way.
            outcome = await self._stored_outcome(reply)
        reply.terminal = outcome.terminal_event(len(reply.pieces) + 1)
        reply._notify()
        self.live.pop(reply.id, None)

    @staticmethod
    async def _store_finish(finish: services.ReplyFinish) -> bool:
        for attempt in range(4):
            try:
                return await run_db(services.reply_finish, finish)
            except Exception:  # noqa: BLE001 - if every attempt fails, the reaper keeps the logged text
                logger.exception("could not store the end of reply %s (attempt %s)", finish.outcome.message_id, attempt + 1)
                await asyncio.sleep(0.25 * 2**attempt)
        return True  # keep our own outcome for the watchers; the row ends through the reaper

    @staticmethod
    async def _stored_outcome(reply: LiveReply) -> ReplyOutcome:
        snapshot = await run_db(services.reply_snapshot, message_id=reply.id, after=1 << 62)
        if snapshot is None or snapshot.outcome is None:
            return ReplyOutcome(message_id=reply.id, status="cancelled", model=reply.model)
        return snapshot.outcome

    # Housekeeping: one loop per process, whatever the number of replies ----------------------------

    async def _maintain(self) -> None:
        poll = settings.GENERATION_POLL_SECONDS
        lease = settings.GENERATION_LEASE_SECONDS
        last_flush = last_renew = last_reap = last_gone_check = time.monotonic()
        while True:
            await asyncio.sleep(poll)
            now = time.monotonic()
            try:
                if now - last_flush >= settings.GENERATION_FLUSH_SECONDS:
                    last_flush = now
                    await self._flush()
                if self.live:
                    for message_id in await run_db(services.stop_requests):
                        if reply := self.live.get(message_id):
                            reply.request_stop("stopped")
                if self.live and now - last_gone_check >= GONE_CHECK_SECONDS:
                    # Deleted or reaped elsewhere: the log write finds such a reply within a flush
                    # while it streams; this finds a silent one (waiting for its first token).
                    last_gone_check = now
                    for message_id in await run_db(services.replies_gone, list(self.live)):
                        if reply := self.live.get(message_id):
                            reply.request_stop("gone")
                if now - last_renew >= lease / 3:
                    last_renew = now
                    await self._renew_leases()
                if now - last_reap >= lease / 2:
                    last_reap = now
                    if reaped := await run_db(services.reap_expired_replies):
                        logger.warning("marked %d replies interrupted (their process stopped): %s", len(reaped), reaped)
            except Exception:  # noqa: BLE001 - keep maintaining; the next tick retries
                logger.exception("generation maintenance failed")

    async def _beat_forever(self) -> None:
        """Wake the watchers of replies silent for a heartbeat interval: one clock for all streams
        instead of a timer per watcher per token. Its own task, so that heartbeats keep going
        while the maintenance loop waits on a slow database."""
        while True:
            await asyncio.sleep(settings.GENERATION_POLL_SECONDS)
            now = time.monotonic()
            interval = settings.STREAM_HEARTBEAT_SECONDS
            for reply in self.live.values():
                if now - reply.last_event_at >= interval:
                    reply._notify()

    async def _renew_leases(self) -> None:
        live = list(self.live.values())
        if not live:
            return
        renewed_at = time.monotonic()
        renewed = await run_db(services.reply_renew_leases, [reply.id for reply in live])
        for reply in live:
            if reply.id in renewed:
                reply.lease_deadline = self._lease_deadline_from(renewed_at)
            else:
                reply.request_stop("gone")

    async def _flush(self) -> None:
        batches: list[services.LogBatch] = []
        flushed_up_to: list[tuple[LiveReply, int]] = []
        for reply in self.live.values():
            end = len(reply.pieces)
            if reply.finishing or reply.flushed >= end:
                continue
            batches += services.log_batches(reply.id, reply.pieces[:end], logged=reply.flushed)
            flushed_up_to.append((reply, end))
        if not batches:
            return

        async def write() -> None:
            gone = await run_db(services.reply_log_append, batches)
            for reply, end in flushed_up_to:
                reply.flushed = end
                if reply.id in gone:
                    reply.request_stop("gone")

        task = asyncio.create_task(write())
        for reply, _ in flushed_up_to:
            reply.write_in_flight = task  # _finish waits for it, so the log never has a gap
        try:
            await task
        finally:
            for reply, _ in flushed_up_to:
                if reply.write_in_flight is task:
                    reply.write_in_flight = None

    # Watching ------------------------------------------------------------------------------------

    def watch(self, message_id: int, *, after: int) -> AsyncIterator[list[ReplyEvent]]:
        """Batches of the events with ids above `after` (-1: from the start), following the reply to
        its end. A batch holds every event available at that moment, so a watcher that falls behind
        catches up in one write; an empty batch means the reply was silent for a heartbeat interval."""
        reply = self.live.get(message_id)
        return self._watch_live(reply, after) if reply else self._watch_log(message_id, after)

    @staticmethod
    async def _watch_live(reply: LiveReply, after: int) -> AsyncIterator[list[ReplyEvent]]:
        batch: list[ReplyEvent] = [reply.start] if after < 0 else []
        next_seq = max(after, 0) + 1
        while True:
            seen = reply.version
            pieces = reply.pieces
            if next_seq <= len(pieces):
                batch += [ContentEvent(seq, pieces[seq - 1]) for seq in range(next_seq, len(pieces) + 1)]
                next_seq = len(pieces) + 1
            if reply.terminal is not None:
                if reply.terminal.id > after:
                    batch.append(reply.terminal)
                if batch:
                    yield batch
                return
            if batch:
                yield batch
                batch = []
            await reply.changed_since(seen)  # at once if more arrived while the batch was being sent
            if next_seq > len(reply.pieces) and reply.terminal is None:
                yield []  # woken with nothing new: a heartbeat

    @staticmethod
    async def _watch_log(message_id: int, after: int) -> AsyncIterator[list[ReplyEvent]]:
        """Follow a reply generated by another process (or already finished) through the database."""
        next_seq = max(after, 0) + 1
        silent_since = time.monotonic()
        started = False
        model = ""
        while True:
            snapshot = await run_db(services.reply_snapshot, message_id=message_id, after=next_seq - 1)
            if snapshot is None:
                # Deleted meanwhile. The owning process ends its own watchers with `done`/cancelled
                # (see _stored_outcome); this one ends the same way, so that every stream of the
                # reply closes with exactly one terminal event. A watcher that has not sent the
                # start event yet has sent nothing that needs ending.
                if started or after >= 0:
                    yield [ReplyOutcome(message_id=message_id, status="cancelled", model=model).terminal_event(next_seq)]
                return
            model = snapshot.model
            batch: list[ReplyEvent] = []
            if after < 0 and not started:
                started = True
                batch.append(snapshot.start)
            for seq, text in snapshot.pieces:
                batch.append(ContentEvent(seq, text))
                next_seq = seq + 1
            if snapshot.outcome is not None:
                terminal = snapshot.outcome.terminal_event(snapshot.piece_count + 1)
                if terminal.id > after:
                    batch.append(terminal)
                if batch:
                    yield batch
                return
            if batch:
                silent_since = time.monotonic()
                yield batch
            elif time.monotonic() - silent_since >= settings.STREAM_HEARTBEAT_SECONDS:
                silent_since = time.monotonic()
                yield []
            await asyncio.sleep(settings.GENERATION_POLL_SECONDS)

    # Stopping ------------------------------------------------------------------------------------

    async def stop(self, message_id: int, *, wait_seconds: float = 5.0) -> str:
        """Stop a reply wherever it is generated; returns its final status (or the current one if
        the owning process has not answered within `wait_seconds`)."""
        reply = self.live.get(message_id)
        if reply is not None and reply.task is not None:
            reply.request_stop("stopped")
            await asyncio.wait([reply.task], timeout=wait_seconds)
        else:
            await run_db(services.reply_request_stop, message_id=message_id)
            deadline = time.monotonic() + wait_seconds
            while time.monotonic() < deadline:
                # An owner that died will not answer: once its lease has expired, end the reply
                # here (the reaper stores a stopped reply as cancelled, with its logged text).
                await run_db(services.reap_expired_replies, only=message_id)
                snapshot = await run_db(services.reply_snapshot, message_id=message_id, after=1 << 62)
                if snapshot is None or snapshot.outcome is not None:
                    break
                await asyncio.sleep(settings.GENERATION_POLL_SECONDS)
        return await run_db(services.reply_status, message_id=message_id) or "deleted"
