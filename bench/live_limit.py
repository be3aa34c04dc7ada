"""What a send's limit check costs when the service holds many live replies (PostgreSQL).

    python -m bench.live_limit                                  # this checkout
    python -m bench.live_limit --checkout /tmp/c3-base          # another one

On a fresh database: `--users` users with `--history` finished messages each (one user with
`--heavy-history`), then one live (streaming) reply per user but the first. It prints the plan and
the server's execution time of the limit check (the live replies and the last minute's messages of
one user, as every send runs it) for the first user and for another. Before message_user_live, the
live count read every live reply of every user or the user's whole history.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from urllib.parse import urlsplit, urlunsplit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser.add_argument("--pg-url", default=os.environ.get("BENCH_PG_URL", "postgres://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--users", type=int, default=2000, help="users with a live reply each (at least 1)")
    parser.add_argument("--history", type=int, default=100)
    parser.add_argument("--heavy-history", type=int, default=5000)
    args = parser.parse_args()

    import psycopg

    name = f"c3_live_limit_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.pg_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        run(args, urlunsplit(urlsplit(args.pg_url)._replace(path=f"/{name}")))
    finally:
        from django.db import connections

        connections.close_all()
        with psycopg.connect(args.pg_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}"')


def run(args, database_url: str) -> None:
    sys.path.insert(0, args.checkout)
    os.environ["DATABASE_URL"] = database_url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "c3_app.settings")
    os.environ.setdefault("SECRET_KEY", "bench-" + "s" * 50)
    import django

    django.setup()
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connection
    from django.utils import timezone

    from ai_features import services
    from ai_features.models import Message
    from ai_features.sql import statement
    from ai_features.streaming.validation import parse_reply_request

    call_command("migrate", verbosity=0)
    user_model = get_user_model()
    users = user_model.objects.bulk_create(
        [user_model(username=f"bench{n}", password="!") for n in range(args.users + 1)])
    message = connection.ops.quote_name(Message._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(statement(
            "INSERT INTO {conversation} (user_id, title, created_at, updated_at)"
            " SELECT id, 'bench', now() - interval '30 days', now() - interval '30 days' FROM {user}"))
        cursor.execute(statement(
            "INSERT INTO {message} (conversation_id, user_id, role, content, status, model, error_code,"
            " error_message, stop_requested, created_at, updated_at)"
            " SELECT c.id, c.user_id, CASE WHEN g %% 2 = 0 THEN 'user' ELSE 'assistant' END, 'x', 'completed',"
            " '', '', '', false, now() - interval '30 days' + g * interval '1 second', now()"
            " FROM {conversation} c, generate_series(1, %s) g"
            " WHERE g <= CASE WHEN c.user_id = %s THEN %s ELSE %s END"),
            [max(args.history, args.heavy_history), users[0].pk, args.heavy_history, args.history])
    settings.MAX_CONCURRENT_REPLIES_PER_USER, settings.RATE_LIMIT_MESSAGES_PER_MINUTE = 3, 20
    body = json.dumps({"message": "hello"}).encode()
    for user in users[1:]:  # one live reply each, but the first user
        request = parse_reply_request(body, "application/json", max_chars=10_000, max_bytes=100_000)
        services.reply_start(user=user, request=request, model="bench")
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
        cursor.execute(f"SELECT count(*), count(*) FILTER (WHERE status = 'streaming') FROM {message}")
        total, live = cursor.fetchone()
        print(f"{total:,} messages, {live:,} live replies; checkout {args.checkout}")
        for label, user in ((f"a user with {args.heavy_history:,} messages", users[0]),
                            (f"a user with {args.history:,} messages and a live reply", users[-1])):
            cursor.execute(statement("EXPLAIN ANALYZE SELECT " + services._LIMITED_COUNTS),
                           services._limited_counts_params(user.pk, timezone.now()))
            plan = [row[0] for row in cursor.fetchall()]
            print(f"\n{label}:")
            print("\n".join(line for line in plan if "Scan" in line or "Removed" in line or "Execution" in line))


if __name__ == "__main__":
    main()
