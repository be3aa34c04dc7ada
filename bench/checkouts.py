"""Checkouts measured against each other: each in a worker process of its own per round, rounds
alternating (A B, B A, A B…) so that a slower stretch of the machine weighs on both alike.

Used by `bench.statements` and `bench.pipeline`; their workers print one JSON object as their last
line of output.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def alternating(checkouts: list[str], rounds: int) -> Iterator[tuple[int, str]]:
    """(round, checkout) in the order to measure them."""
    for round_ in range(rounds):
        for checkout in checkouts if round_ % 2 == 0 else reversed(checkouts):
            yield round_, checkout


def run_worker(module: str, checkout: str, args: list[str], env: dict[str, str]) -> dict:
    """Run `python -m <module> --worker <checkout> <args>` from this checkout; its last line, parsed."""
    out = subprocess.run([sys.executable, "-m", module, "--worker", checkout, *args],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"worker for {checkout} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
