"""A sampler in its own process (so it never holds the load client's GIL): every `interval` it
reads the sidecar's RSS and database connections, and for PostgreSQL
`SELECT count(*) FROM pg_stat_activity WHERE datname = <the stack's db>`."""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass

from . import procstat


@dataclass
class MonitorConfig:
    pids: dict[str, list[int]]  # name -> process tree (fixed for a step)
    pg_dsn: str | None = None  # connects to the stack's own database (its own backend is excluded)
    pg_dbname: str | None = None
    pg_port: int = 5432
    sqlite_path: str | None = None
    sidecars: tuple[str, ...] = ("sidecar",)  # whose database connections to count
    interval: float = 0.2


def _rss_kib(pids: list[int]) -> int:
    return sum(procstat.status_kib(p, "VmRSS") for p in pids)


def _loop(conn) -> None:
    pg = None
    config: MonitorConfig | None = None
    samples: list[dict] = []
    cpu_before: dict[str, tuple[float, float]] = {}  # name -> (monotonic time, CPU seconds) at the last sample
    while True:
        timeout = config.interval if config else None
        if conn.poll(timeout):
            command, payload = conn.recv()
            if command == "begin":
                config, samples, cpu_before = payload, [], {}
                if config.pg_dsn and pg is None:
                    import psycopg

                    pg = psycopg.connect(config.pg_dsn, autocommit=True)
            elif command == "end":
                conn.send(_summary(samples))
                config = None
            elif command == "quit":
                if pg is not None:
                    pg.close()
                return
            continue
        if config is None:
            continue
        sample = {"t": time.monotonic()}
        for name, pids in config.pids.items():
            sample[f"rss_kib.{name}"] = _rss_kib(pids)
            # Cores this process tree kept busy since the last sample: a step's average hides the
            # moments its event loop is saturated (the ramp and the tail of a step run lighter).
            cpu = sum(procstat.cpu_seconds(p, tree=False) for p in pids)
            if name in cpu_before:
                then, cpu_then = cpu_before[name]
                # A process of the tree that exited takes its CPU time with it: never below zero.
                sample[f"cores.{name}"] = max(0.0, round((cpu - cpu_then) / (sample["t"] - then), 3))
            cpu_before[name] = (sample["t"], cpu)
        for name in config.sidecars:
            pids = config.pids.get(name, [])
            if not pids:
                continue
            if config.sqlite_path:
                # Each SQLite connection holds one descriptor on the database file.
                sample[f"db_conns.{name}"] = sum(procstat.open_files_named(p, config.sqlite_path) for p in pids)
            else:
                sample[f"db_conns.{name}"] = sum(
                    procstat.tcp_connections(p, remote_port=config.pg_port) for p in pids
                )
        if pg is not None:
            try:
                row = pg.execute(
                    "SELECT count(*), count(*) FILTER (WHERE state = 'active') FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()",
                    (config.pg_dbname,),
                ).fetchone()
                sample["pg_conns"], sample["pg_active"] = row
            except Exception:  # noqa: BLE001 - a sampling failure only loses one sample
                pass
        samples.append(sample)


def _summary(samples: list[dict]) -> dict:
    out: dict = {"samples": len(samples)}
    keys = sorted({k for s in samples for k in s if k != "t"})
    for key in keys:
        values = [s[key] for s in samples if key in s]
        if values:
            ranked = sorted(values)
            out[key] = {"max": ranked[-1], "mean": round(sum(values) / len(values), 2),
                        "p90": ranked[min(len(ranked) - 1, int(0.9 * len(ranked)))]}
    return out


class Monitor:
    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_loop, args=(child,), daemon=True, name="bench-monitor")
        self._process.start()

    @property
    def pid(self) -> int:
        return self._process.pid

    def begin(self, config: MonitorConfig) -> None:
        self._conn.send(("begin", config))

    def end(self) -> dict:
        self._conn.send(("end", None))
        return self._conn.recv()

    def close(self) -> None:
        try:
            self._conn.send(("quit", None))
        except OSError:
            pass
        self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
