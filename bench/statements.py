"""The database work every reply does, alone on one thread: thread CPU per call, no server, no loop.

    python -m bench.statements --db postgres                          # this checkout
    python -m bench.statements --db postgres --candidate /tmp/c3-base  # and another, interleaved

Each checkout runs in its own process per round (rounds alternate between checkouts), on a fresh
database: the stream token's check, the store of a new reply (a new conversation, and a follow-up),
one tick's log flush for 128 live replies, and a reply's end with 60 pieces. It prints the median
over rounds of each process's median, in µs of thread CPU (time.thread_time), so the figures
compare code, not the machine's load at one moment. The statements' own time in the database
server is not included; that is what the round trips measure (bench.delay_proxy).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench.checkouts import ROOT, alternating, run_worker

WORKS = ("auth", "start-new", "start-follow-up", "flush-128", "finish")


def measure(checkout: str, calls: int, repeats: int) -> dict[str, float]:
    """Runs inside the worker process, with `checkout` first on sys.path and DATABASE_URL set."""
    sys.path.insert(0, checkout)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "c3_app.settings")
    import django

    django.setup()
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from ai_features import services, stream_auth
    from ai_features.sessions import SessionStore
    from ai_features.streaming.events import ReplyOutcome
    from ai_features.streaming.validation import parse_reply_request

    assert Path(services.__file__).resolve().is_relative_to(Path(checkout).resolve()), services.__file__
    settings.MAX_CONCURRENT_REPLIES_PER_USER = settings.RATE_LIMIT_MESSAGES_PER_MINUTE = 10**9
    call_command("migrate", verbosity=0)
    user_model = get_user_model()
    users = [user_model(username=f"bench{n}") for n in range(200)]
    for user in users:
        user.set_unusable_password()  # hashing 200 real passwords would take a minute
    users = user_model.objects.bulk_create(users)
    session = SessionStore()
    session.update({"_auth_user_id": str(users[0].pk), "_auth_user_backend": "django.contrib.auth.backends.ModelBackend",
                    "_auth_user_hash": users[0].get_session_auth_hash()})
    session.create()
    authorization = "Bearer " + stream_auth.mint_stream_token(user=users[0], session_key=session.session_key)[0]

    def request(**fields):
        return parse_reply_request(json.dumps({"message": "hello there", **fields}).encode(), "application/json",
                                   max_chars=10_000, max_bytes=100_000)

    counter = iter(range(10**9))

    def start(user=None, **fields):
        return services.reply_start(user=user or users[next(counter) % len(users)], request=request(**fields), model="m")

    # A follow-up per user, round robin: each user's rows (which the limits count) stay few.
    follow_ups = [(user, start(user=user).start.conversation_id) for user in users]
    follow_up_turn = iter(range(10**9))

    def follow_up():
        user, conversation_id = follow_ups[next(follow_up_turn) % len(follow_ups)]
        return start(user=user, conversation_id=conversation_id)
    pieces = [f"w{n:03d} lorem ipsu " for n in range(10)]

    def flush_of_128_replies():
        ids = [start().start.assistant_message_id for _ in range(128)]
        return lambda: services.reply_log_append([services.LogBatch(i, 1, pieces) for i in ids])

    def end_of_a_reply():
        reply_id = start().start.assistant_message_id
        finish = services.ReplyFinish(
            outcome=ReplyOutcome(reply_id, "completed", "m", 5, 60), content="".join(pieces * 6),
            last_batches=services.log_batches(reply_id, pieces * 6, logged=0), ttft_ms=3, duration_ms=1300)
        return lambda: services.reply_finish(finish)

    works = {
        "auth": (lambda: stream_auth.authenticate_stream_caller(authorization=authorization, session_key=None), None),
        "start-new": (start, None),
        "start-follow-up": (follow_up, None),
        "flush-128": (None, flush_of_128_replies),
        "finish": (None, end_of_a_reply),
    }
    results = {}
    for name, (call, prepare) in works.items():
        n = 1 if name == "flush-128" else calls
        samples = []
        for _ in range(repeats):
            prepared = [prepare() for _ in range(n)] if prepare else [call] * n
            began = time.thread_time()
            for run in prepared:
                run()
            samples.append((time.thread_time() - began) / n * 1e6)
        results[name] = statistics.median(samples[1:])  # the first repeat warms caches up
    assert stream_auth.authenticate_stream_caller(authorization=authorization, session_key=None) is not None
    return results


def measure_in_a_worker(checkout: str, db: str, pg_url: str, calls: int, repeats: int) -> dict[str, float]:
    env = dict(os.environ, SECRET_KEY=os.environ.get("SECRET_KEY", "bench-" + "s" * 50), DB_CONN_MAX_AGE="600")
    if db == "postgres":
        import psycopg

        name = f"c3_statements_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        env["DATABASE_URL"] = pg_url.rsplit("/", 1)[0] + "/" + name
    else:
        scratch = tempfile.mkdtemp(prefix="c3-statements-")
        env["DATABASE_URL"] = f"sqlite:///{scratch}/db.sqlite3"
    try:
        return run_worker("bench.statements", checkout, ["--calls", str(calls), "--repeats", str(repeats)], env)
    finally:
        if db == "postgres":
            with psycopg.connect(pg_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="postgres")
    parser.add_argument("--pg-url", default=os.environ.get("BENCH_PG_URL", "postgres://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--candidate", action="append", default=[], help="another checkout to measure (repeatable)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=100, help="calls per repeat (flush: one per repeat)")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, args.calls, args.repeats)))
        return
    checkouts = [str(ROOT), *args.candidate]
    results: dict[str, list[dict[str, float]]] = {c: [] for c in checkouts}
    for round_, checkout in alternating(checkouts, args.rounds):
        results[checkout].append(measure_in_a_worker(checkout, args.db, args.pg_url, args.calls, args.repeats))
        print(f"round {round_ + 1}, {checkout}: " + ", ".join(f"{k} {v:.0f}" for k, v in results[checkout][-1].items()),
              file=sys.stderr)
    print(f"\n{args.db}, µs of thread CPU per call (median of {args.rounds} rounds)\n")
    print("| checkout | " + " | ".join(WORKS) + " |")
    print("|---|" + "---|" * len(WORKS))
    for checkout, rounds in results.items():
        print(f"| {checkout} | " + " | ".join(f"{statistics.median(r[w] for r in rounds):,.0f}" for w in WORKS) + " |")


if __name__ == "__main__":
    main()
