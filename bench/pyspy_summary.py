"""Summarise a py-spy `--format raw` (collapsed stacks) file: where the sidecar's CPU goes.

    python -m bench.pyspy_summary bench/results/<file>.txt [--top 25]

Prints the share of samples per thread group (event loop vs database threads), the top functions
by self time, and by inclusive time, collapsing site-packages paths to the package name.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    file = m["file"]
    if "site-packages/" in file:
        file = file.split("site-packages/", 1)[1]
    elif "/lib/python3" in file:
        file = "stdlib/" + file.split("/lib/python3", 1)[1].split("/", 1)[-1]
    elif "/work/" in file or "/tmp/" in file:
        file = file.split("/", 3)[-1] if file.startswith("/tmp/") else file.split("/work/main/", 1)[-1]
    return f"{m['func']} ({file})"


def package(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    file = m["file"] if m else frame
    if "site-packages/" in file:
        return file.split("site-packages/", 1)[1].split("/", 1)[0]
    if "/lib/python3" in file:
        return "stdlib:" + file.split("/lib/python3", 1)[1].split("/", 2)[1].removesuffix(".py")
    if "ai_features" in file or "asgi_stream" in file:
        return "c3 (ai_features)"
    return "other"


def load(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        stacks.append((stack.split(";"), n))
    return stacks


def summarise(path: Path, top: int = 25) -> str:
    stacks = load(path)
    total = sum(n for _, n in stacks)
    threads: Counter = Counter()
    selfs: Counter = Counter()
    incl: Counter = Counter()
    packages: Counter = Counter()
    for frames, n in stacks:
        thread = frames[0] if frames and frames[0].startswith(("thread", "process")) else "?"
        body = frames[1:] if thread != "?" else frames
        # Thread names are not in raw output; the event loop thread runs uvloop/asyncio frames.
        kind = "database threads (c3-db executor)" if any("_unit_of_work" in f or "concurrent/futures/thread" in f
                                                          for f in body) else "event loop / other"
        threads[kind] += n
        if body:
            selfs[short(body[-1])] += n
            packages[package(body[-1])] += n
        for frame in set(short(f) for f in body):
            incl[frame] += n
    out = [f"{path.name}: {total} samples"]
    out.append("\nby thread group:")
    for k, n in threads.most_common():
        out.append(f"  {100 * n / total:5.1f}%  {k}")
    out.append("\nself time by package (leaf frame):")
    for k, n in packages.most_common(12):
        out.append(f"  {100 * n / total:5.1f}%  {k}")
    out.append(f"\ntop {top} functions by self time:")
    for k, n in selfs.most_common(top):
        out.append(f"  {100 * n / total:5.1f}%  {k}")
    out.append(f"\ntop {top} functions by inclusive time:")
    for k, n in incl.most_common(top):
        out.append(f"  {100 * n / total:5.1f}%  {k}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    print(summarise(args.path, args.top))


if __name__ == "__main__":
    main()
