"""Warm and cold invoke on the process runtime, next to the baselines, in one run.

    python benchmarks/bench_process.py [--calls N] [--json PATH]

Measures, on this machine and in this one run:
- a raw blocking Unix-socket echo of a 100-byte payload between two processes;
- ``ProcessPoolExecutor.submit(f, x).result()`` on a warm pool;
- ``Session.invoke`` of the same trivial function on a warm instance (the sync
  facade), and the same call awaited on the session's own loop (no thread hop);

The warm paths are timed in interleaved rounds so that they all see the same
machine load.
- cold start: ``python -c pass``; register -> first result of a new instance in a
  running session; and the first result of a brand-new session;
- the idle RSS of an agent instance.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import psutil

import spear_nb


def inc(x: int) -> int:
    return x + 1


def summarize(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_us": statistics.median(ordered) * 1e6,
        "p99_us": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e6,
        "n": len(ordered),
    }


def timed(call: Callable[[], Any], n: int, warmup: int = 50) -> dict[str, float]:
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return summarize(samples)


class RawEcho:
    """A blocking Unix-socket echo between this process and a forked child."""

    def __init__(self) -> None:
        self.ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.pid = os.fork()
        if self.pid == 0:
            self.ours.close()
            while data := theirs.recv(65536):
                theirs.sendall(data)
            os._exit(0)
        theirs.close()

    def call(self) -> None:
        self.ours.sendall(PAYLOAD)
        self.ours.recv(65536)

    def close(self) -> None:
        self.ours.close()
        os.waitpid(self.pid, 0)


PAYLOAD = b"x" * 100


def interleaved(
    paths: dict[str, Callable[[], Any]], rounds: int, per_round: int
) -> dict[str, dict[str, float]]:
    """Time each path in turn, round after round, so all see the same load."""
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for call in paths.values():
        for _ in range(50):
            call()
    for r in range(rounds):
        order = list(paths.items())
        order = order[r % len(order) :] + order[: r % len(order)]
        for name, call in order:
            for _ in range(per_round):
                start = time.perf_counter()
                call()
                samples[name].append(time.perf_counter() - start)
    return {name: summarize(values) for name, values in samples.items()}


def python_start(n: int = 15) -> dict[str, float]:
    return timed(lambda: subprocess.run([sys.executable, "-c", "pass"]), n, warmup=2)


def on_loop(session: spear_nb.Session, n: int) -> dict[str, float]:
    """The same call awaited on the session's own loop: no thread hop."""

    async def run() -> dict[str, float]:
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            await session._invoke("inc", (1,), {})
            samples.append(time.perf_counter() - start)
        return summarize(samples)

    return session._loop.run(run())


def spear_cold(session: spear_nb.Session, n: int = 15) -> dict[str, float]:
    """register -> first result of a new instance, the zygote already warm."""
    samples = []
    for i in range(n):

        def fresh(x: int, i: int = i) -> int:
            return x + i

        start = time.perf_counter()
        session.register(f"cold{i}", fresh)
        session.invoke(f"cold{i}", 1)
        samples.append(time.perf_counter() - start)
        session.scale(f"cold{i}", 0)
    return summarize(samples)


def fresh_session(n: int = 5) -> dict[str, float]:
    """Session() -> register -> first result -> close, all included."""
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        with spear_nb.Session() as session:
            session.invoke(inc, 1)
            samples.append(time.perf_counter() - start)
    return summarize(samples)


def agent_rss(session: spear_nb.Session) -> float:
    pids = session.instances().query("function == 'inc'")["pid"]
    return psutil.Process(int(pids.iloc[0])).memory_info().rss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    n = args.calls

    results: dict[str, Any] = {"python_c_pass": python_start()}
    echo = RawEcho()
    with (
        concurrent.futures.ProcessPoolExecutor(max_workers=1) as pool,
        spear_nb.Session() as session,
    ):
        session.register("inc", inc)
        warm = interleaved(
            {
                "raw_unix_echo": echo.call,
                "process_pool_executor": lambda: pool.submit(inc, 1).result(),
                "spear_sync_facade": lambda: session.invoke("inc", 1),
            },
            rounds=max(1, n // 200),
            per_round=200,
        )
        results.update(warm)
        results["spear_async_on_loop"] = on_loop(session, n)
        results["spear_agent_idle_rss_mib"] = agent_rss(session)
        results["spear_cold_new_instance"] = spear_cold(session)
    echo.close()
    results["spear_cold_new_session"] = fresh_session()

    warm = results["spear_sync_facade"]["median_us"]
    ratios = {
        "warm_vs_process_pool": warm / results["process_pool_executor"]["median_us"],
        "warm_vs_raw_echo": warm / results["raw_unix_echo"]["median_us"],
        "cold_vs_python_start": results["spear_cold_new_instance"]["median_us"]
        / results["python_c_pass"]["median_us"],
    }
    results["ratios"] = ratios

    print(f"{'path':<34}{'median':>12}{'p99':>12}")
    for key, value in results.items():
        if isinstance(value, dict) and "median_us" in value:
            print(f"{key:<34}{value['median_us']:>10.0f}us{value['p99_us']:>10.0f}us")
    print(f"agent idle RSS: {results['spear_agent_idle_rss_mib']:.1f} MiB")
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
