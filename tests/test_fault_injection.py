"""Many replies at once, each hit by a (seeded) random fault: the reader goes away, Stop, the model
drops the connection midway or answers 500. Two sidecar apps (two runtimes, like two processes
sharing one database) serve them, and Stop and the final replays go to either one at random.

Afterwards every reply has ended, what each watcher read to its end is exactly what is stored, a
full replay of every reply is the stored text with the matching ending, and no watcher saw an
event id twice.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from http import HTTPStatus

import httpx
import pytest

from ai_features.models import Message
from ai_features.stream_auth import mint_stream_token
from tests.conftest import ThreadedUvicorn, login_session, wait_until
from tests.fake_openai import scenario
from tests.sse_client import SSEParser

pytestmark = pytest.mark.django_db(transaction=True)

SEED = 20260
REPLIES = 60
USERS = 5
KINDS = ("full", "abort", "stop", "drop", "http500")
EXPECTED_STATUS = {
    "full": {"completed"},
    "abort": {"completed"},  # a reader that goes away does not stop the reply
    "stop": {"cancelled", "completed"},  # completed only when Stop came after the last piece
    "drop": {"error"},
    "http500": {"error"},
}


@dataclass
class Plan:
    index: int
    kind: str
    user: int
    chunks: list[str]
    delay_ms: int
    cut_after: int  # events read before the reader leaves or presses Stop
    drop_after: int | None
    post_to: int
    stop_to: int
    replay_from: int
    start_delay: float

    @property
    def message(self) -> str:
        if self.kind == "http500":
            return scenario(status=500, error_message="secret upstream detail")
        if self.kind == "drop":
            return scenario(chunks=self.chunks, delay_ms=self.delay_ms, drop_after=self.drop_after)
        return scenario(chunks=self.chunks, delay_ms=self.delay_ms)


@dataclass
class Seen:
    """What one watcher read."""

    status: int | None = None
    events: list[tuple[int, dict]] = field(default_factory=list)
    to_the_end: bool = False
    stop_answer: tuple[int, dict] | None = None
    arrivals: list[float] = field(default_factory=list)  # monotonic time each event arrived
    stop_sent_at: float | None = None

    @property
    def ids(self) -> list[int]:
        return [i for i, _ in self.events]

    @property
    def pieces(self) -> list[tuple[int, str]]:
        return [(i, p["content"]) for i, p in self.events if p["type"] == "content"]

    @property
    def text(self) -> str:
        return "".join(text for _, text in self.pieces)

    @property
    def terminal(self) -> dict | None:
        return self.events[-1][1] if self.to_the_end else None


def make_plans(rng: random.Random) -> list[Plan]:
    plans = []
    for index in range(REPLIES):
        kind = KINDS[index % len(KINDS)] if index < len(KINDS) else rng.choice(KINDS)
        # Replies that get a Stop are longer, so that most Stops land mid-reply even under load.
        count = rng.randint(60, 120) if kind == "stop" else rng.randint(15, 60)
        chunks = [f"r{index}.{j} " for j in range(count)]
        plans.append(Plan(
            index=index,
            kind=kind,
            user=rng.randrange(USERS),
            chunks=chunks,
            delay_ms=rng.randint(5, 25),
            # Events read (the start included) before leaving or pressing Stop; a Stop comes in the
            # first half (1: right after the start event, often before the first piece).
            cut_after=rng.randint(1, count if kind == "abort" else count // 2),
            drop_after=rng.randint(1, count - 1),
            post_to=rng.randrange(2),
            stop_to=rng.randrange(2),
            replay_from=rng.randrange(2),
            start_delay=rng.uniform(0, 0.3),
        ))
    return plans


async def run_reply(plan: Plan, clients: list[httpx.AsyncClient], auth: list[dict], seen: Seen) -> None:
    await asyncio.sleep(plan.start_delay)
    headers = auth[plan.user]
    stop_task: asyncio.Task | None = None

    async def press_stop(reply_id: int) -> tuple[int, dict]:
        seen.stop_sent_at = time.monotonic()
        answer = await clients[plan.stop_to].post(f"/api/ai/chat/stream/{reply_id}/stop/", json={}, headers=headers)
        return answer.status_code, answer.json()

    async with clients[plan.post_to].stream(
        "POST", "/api/ai/chat/stream/", json={"message": plan.message}, headers=headers
    ) as response:
        seen.status = response.status_code
        if response.status_code != HTTPStatus.OK:
            await response.aread()
            return
        parser = SSEParser()
        leave = False
        async for chunk in response.aiter_raw():
            for event in parser.feed(chunk):
                payload = event.json
                seen.events.append((int(event.id), payload))
                seen.arrivals.append(time.monotonic())
                if payload["type"] in ("done", "error"):
                    seen.to_the_end = True
                elif len(seen.events) >= plan.cut_after:
                    if plan.kind == "abort":
                        leave = True
                        break
                    if plan.kind == "stop" and stop_task is None:
                        stop_task = asyncio.create_task(press_stop(seen.events[0][1]["assistant_message_id"]))
            if leave:
                break  # leaving the block closes the connection mid-stream
    if stop_task is not None:
        seen.stop_answer = await stop_task


async def replay(client: httpx.AsyncClient, headers: dict, reply_id: int) -> Seen:
    seen = Seen()
    async with client.stream("GET", f"/api/ai/chat/stream/{reply_id}/", headers=headers) as response:
        seen.status = response.status_code
        parser = SSEParser()
        async for chunk in response.aiter_raw():
            for event in parser.feed(chunk):
                seen.events.append((int(event.id), event.json))
    seen.to_the_end = bool(seen.events) and seen.events[-1][1]["type"] in ("done", "error")
    return seen


def expected_terminal(message: Message) -> tuple:
    if message.status in ("completed", "cancelled"):
        return ("done", message.status)
    return ("error", message.error_code)


def terminal_key(payload: dict) -> tuple:
    return ("done", payload["status"]) if payload["type"] == "done" else ("error", payload["code"])


def _second_app():
    """Another sidecar app: its own runtime and event loop, i.e. another process as far as replies
    are concerned (they share only the database)."""
    from asgi_stream import create_app

    return create_app()


def test_many_concurrent_replies_under_random_faults(sidecar, model_server, make_user, settings):
    settings.MAX_CONCURRENT_REPLIES_PER_USER = 1000
    settings.RATE_LIMIT_MESSAGES_PER_MINUTE = 10_000
    rng = random.Random(SEED)
    plans = make_plans(rng)
    users = [make_user() for _ in range(USERS)]
    auth = []
    for user in users:
        token, _ = mint_stream_token(user=user, session_key=login_session(user))
        auth.append({"Authorization": f"Bearer {token}"})

    with ThreadedUvicorn(_second_app()) as second:
        urls = [sidecar.url, second.url]
        live = [Seen() for _ in plans]
        started = time.monotonic()

        async def everything() -> None:
            limits = httpx.Limits(max_connections=500, max_keepalive_connections=100)
            timeout = httpx.Timeout(30.0)
            clients = [httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) for url in urls]
            try:
                await asyncio.gather(*(run_reply(plan, clients, auth, seen) for plan, seen in zip(plans, live)))
            finally:
                for client in clients:
                    await client.aclose()

        asyncio.run(everything())
        watched = time.monotonic() - started

        assert [s.status for s in live] == [HTTPStatus.OK] * len(plans)
        reply_ids = [s.events[0][1]["assistant_message_id"] for s in live]
        # Readers that left do not stop their replies: wait for those to end by themselves.
        wait_until(lambda: not Message.objects.filter(pk__in=reply_ids, status="streaming").exists(), timeout=30)
        stored = {m.pk: m for m in Message.objects.filter(pk__in=reply_ids)}

        async def all_replays() -> list[Seen]:
            clients = [httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(30.0)) for url in urls]
            try:
                return await asyncio.gather(*(
                    replay(clients[plan.replay_from], auth[plan.user], reply_id)
                    for plan, reply_id in zip(plans, reply_ids)
                ))
            finally:
                for client in clients:
                    await client.aclose()

        replays = asyncio.run(all_replays())

    problems: list[str] = []

    def check(condition: bool, plan: Plan, what: str) -> None:
        if not condition:
            problems.append(f"reply #{plan.index} ({plan.kind}, posted to {plan.post_to}): {what}")

    for plan, seen, reply_id, again in zip(plans, live, reply_ids, replays):
        message = stored[reply_id]
        full_text = "".join(plan.chunks)
        check(message.status != "streaming", plan, "still streaming")
        check(message.status in EXPECTED_STATUS[plan.kind], plan, f"status {message.status!r}")
        # No id twice, and ids in order with no gap.
        check(len(seen.ids) == len(set(seen.ids)), plan, f"an id seen twice: {seen.ids}")
        check(seen.ids == list(range(len(seen.ids))), plan, f"ids not contiguous from 0: {seen.ids}")
        # A watcher that read to the end saw exactly what is stored, and the matching ending.
        if plan.kind != "abort":
            check(seen.to_the_end, plan, "the watcher never got a terminal event")
        if seen.to_the_end:
            check(seen.text == message.content, plan, f"watched {seen.text!r} but stored {message.content!r}")
            check(terminal_key(seen.terminal) == expected_terminal(message), plan,
                  f"live ending {seen.terminal} but stored {message.status}/{message.error_code}")
        # A full replay is the stored text with the same ending, the same pieces under the same ids.
        check(again.status == HTTPStatus.OK and again.to_the_end, plan, f"replay incomplete: {again.events[-1:]}")
        if again.to_the_end:
            n = len(again.pieces)
            check(again.ids == list(range(n + 2)), plan, f"replay ids {again.ids}")
            check(again.text == message.content, plan, f"replayed {again.text!r} but stored {message.content!r}")
            check(terminal_key(again.terminal) == expected_terminal(message), plan, f"replay ending {again.terminal}")
            check(again.pieces[: len(seen.pieces)] == seen.pieces, plan, "the replay differs from what was watched")
        # What each fault should leave behind.
        if plan.kind in ("full", "abort"):
            check(message.content == full_text, plan, "a completed reply lost text")
        elif plan.kind == "stop":
            check(seen.stop_answer is not None and seen.stop_answer == (200, {"status": message.status}), plan,
                  f"stop answered {seen.stop_answer}, stored {message.status}")
            check(full_text.startswith(message.content), plan, "stopped text is not a prefix of the reply")
            if message.status == "completed":
                check(message.content == full_text, plan, "completed after Stop but text missing")
        elif plan.kind == "drop":
            check(message.error_code == "upstream_disconnected", plan, f"code {message.error_code!r}")
            check(message.content == "".join(plan.chunks[: plan.drop_after]), plan, "the text before the drop was not kept")
        elif plan.kind == "http500":
            check(message.error_code == "upstream_unavailable", plan, f"code {message.error_code!r}")
            check(message.content == "", plan, "text stored for a reply that never started")

    kinds = {kind: sum(p.kind == kind for p in plans) for kind in KINDS}
    latencies = sorted(
        (seen.arrivals[-1] - seen.stop_sent_at) * 1000
        for plan, seen, reply_id in zip(plans, live, reply_ids)
        if plan.kind == "stop" and stored[reply_id].status == "cancelled" and seen.to_the_end
    )
    print(f"\n{len(plans)} concurrent replies {kinds} watched in {watched:.2f} s; {len(latencies)} cancelled by "
          f"Stop, stop request -> watcher's terminal event: "
          + (f"median {latencies[len(latencies) // 2]:.0f} ms, max {latencies[-1]:.0f} ms" if latencies else "n/a"))
    assert not problems, "\n".join(problems)

