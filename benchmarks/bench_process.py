"""Warm and cold invoke on the process runtime, next to the baselines, in one run.

    python benchmarks/bench_process.py [--calls N] [--json PATH]

Measures, on this machine and in this one run:
- a raw blocking Unix-socket echo of a 100-byte payload between two processes;
- ``ProcessPoolExecutor.submit(f, x).result()`` on a warm pool;
- ``Session.invoke`` of the same trivial function on a warm instance (the sync
  facade), and the same call awaited on the session's own loop (no thread hop);
- cold start: ``python -c pass``; register -> first result of a new instance in a
  running session; and the first result of a brand-new session;
- the idle RSS of an agent instance.

The warm paths are timed in interleaved rounds so that they all see the same
machine load.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import subprocess
import sys
import time
from typing import Any

import psutil
from _timing import ForkedEcho, each, interleaved, on_loop, summarize, timed

import spear_nb


def inc(x: int) -> int:
    return x + 1


PAYLOAD = b"x" * 100


def python_start(n: int = 15) -> dict[str, float]:
    return timed(lambda: subprocess.run([sys.executable, "-c", "pass"]), n, warmup=2)


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
    with (
        ForkedEcho() as echo,
        concurrent.futures.ProcessPoolExecutor(max_workers=1) as pool,
        spear_nb.Session() as session,
    ):
        session.register("inc", inc)
        paths = {
            "raw_unix_echo": each(lambda: echo.call(PAYLOAD)),
            "process_pool_executor": each(lambda: pool.submit(inc, 1).result()),
            "spear_sync_facade": each(lambda: session.invoke("inc", 1)),
            "spear_async_on_loop": on_loop(session, "inc", 1),
        }
        warm = interleaved(
            {name: (batch, 200) for name, batch in paths.items()},
            rounds=max(1, n // 200),
        )
        results.update(warm)
        results["spear_agent_idle_rss_mib"] = agent_rss(session)
        results["spear_cold_new_instance"] = spear_cold(session)
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
