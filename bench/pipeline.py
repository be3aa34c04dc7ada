"""What a relayed token costs in the sidecar's own pipeline: event-loop CPU per token, no server, no database.

    python -m bench.pipeline                                   # this checkout
    python -m bench.pipeline --candidate /tmp/c3-base --rounds 5  # and another, interleaved

The real provider reads paced replies from the mock (`tests/fake_openai.py`, its own process)
through the SDK's aiohttp transport; the runtime's generation task appends each piece and a watcher
relays it through the SSE encoder into the sidecar's own response class, whose `send` drops the
bytes. What is left out is what every arm pays alike or what `bench.statements` measures: uvicorn
(the request's parsing, the socket write), the middlewares, and the database (the reply's end is
not stored, nothing is flushed). So the figure is the CPU of everything between the model's socket
and the browser's `send`, per token, which the end-to-end runs (`bench.run`) can only show inside a
±3 % A/A band.

Each checkout runs in its own process per round (rounds alternate between checkouts) against the
same mock, and reports process CPU time (time.process_time) per relayed token over `--replies`
concurrent replies of `--profile`; the table is the median over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.checkouts import ROOT, alternating, run_worker


def measure(checkout: str, base_url: str, replies: int, repeats: int) -> dict[str, float]:
    """Runs inside the worker process, with `checkout` first on sys.path."""
    sys.path.insert(0, checkout)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "c3_app.settings")
    import asyncio

    import uvloop

    import asgi_stream  # the sidecar's own response class (it sets Django up)
    from ai_features.streaming import runtime as runtime_module
    from ai_features.streaming.events import StartEvent
    from ai_features.streaming.providers import OpenAIProvider
    from ai_features.streaming.runtime import GenerationRuntime
    from ai_features.streaming.sse import sse_bytes

    assert Path(runtime_module.__file__).resolve().is_relative_to(Path(checkout).resolve()), runtime_module.__file__
    # What uvicorn (httptools) passes: its ASGI spec version decides how Starlette watches for a disconnect.
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "method": "POST"}

    async def run() -> dict[str, float]:
        provider = OpenAIProvider(api_key="bench", base_url=base_url, model="bench", timeout_seconds=60)
        runtime = GenerationRuntime()  # not started: no maintenance loop, no database

        async def stored(_finish) -> bool:
            return True

        runtime._store_finish = stored  # the reply's end is not written
        never = asyncio.Event()
        received = {"tokens": 0}

        async def receive():
            await never.wait()

        async def send(message) -> None:
            received["tokens"] += message.get("body", b"").count(b'"type": "content"')

        next_id = iter(range(1, 10**9))

        async def one_reply() -> None:
            message_id = next(next_id)
            runtime.launch(StartEvent(1, 1, message_id), [{"role": "user", "content": "hello"}], provider)
            body = sse_bytes(runtime.watch(message_id, after=-1))  # what the sidecar's stream endpoint returns
            await asgi_stream.sse_response(body)(scope, receive, send)

        await asyncio.gather(*(one_reply() for _ in range(min(replies, 8))))  # warm-up: connections, caches
        samples = []
        for _ in range(repeats):
            received["tokens"] = 0
            began = time.process_time()
            await asyncio.gather(*(one_reply() for _ in range(replies)))
            samples.append((time.process_time() - began) / received["tokens"] * 1e6)
        await provider.aclose()
        return {"µs per token": statistics.median(samples)}

    return uvloop.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--candidate", action="append", default=[], help="another checkout to measure (repeatable)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--replies", type=int, default=32, help="concurrent replies per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", default="bench-64x16", help="the mock's profile (tests/fake_openai.py)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, args.base_url, args.replies, args.repeats)))
        return
    mock = subprocess.Popen([sys.executable, "-m", "tests.fake_openai", "--profile", args.profile],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        port = int(mock.stdout.readline().split()[1])
        env = dict(os.environ, SECRET_KEY=os.environ.get("SECRET_KEY", "bench-" + "s" * 50))
        checkouts = [str(ROOT), *args.candidate]
        results: dict[str, list[float]] = {c: [] for c in checkouts}
        worker_args = ["--base-url", f"http://127.0.0.1:{port}/v1", "--replies", str(args.replies),
                       "--repeats", str(args.repeats)]
        for round_, checkout in alternating(checkouts, args.rounds):
            results[checkout].append(run_worker("bench.pipeline", checkout, worker_args, env)["µs per token"])
            print(f"round {round_ + 1}, {checkout}: {results[checkout][-1]:.1f} µs per token", file=sys.stderr)
    finally:
        mock.terminate()
        mock.wait()
    print(f"\n{args.profile}, {args.replies} concurrent replies: event-loop CPU per relayed token "
          f"(median of {args.rounds} rounds)\n")
    print("| checkout | µs per token | rounds |")
    print("|---|---|---|")
    for checkout, values in results.items():
        print(f"| {checkout} | {statistics.median(values):.1f} | {', '.join(f'{v:.1f}' for v in values)} |")


if __name__ == "__main__":
    main()
