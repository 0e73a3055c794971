"""Warm, cold and scale figures of the WASM runtime, next to direct wasmtime calls.

    python benchmarks/bench_wasm.py [--calls N] [--instances N] [--json PATH]

Measures, on this machine and in this one run, with the ``upper.wat`` reactor and
a 100-byte payload:
- a bare hop from the event loop to a thread and back (the floor of any call
  that runs off the loop);
- direct wasmtime calls through its public Python API on a warm instance: the
  ``spear_handle`` export alone (payload already in memory), and the whole ABI
  round (``spear_alloc``, write, ``spear_handle``, read, ``spear_reset``);
- ``Session.ainvoke``'s work awaited on the session's own loop, and the sync
  facade ``Session.invoke``, on a warm instance;
- cold: register -> first result of a module already in the disk cache (a new
  session each time, its start not counted), and of a module never seen before
  (compile included);
- scale: 1,000 warm reactor instances of one module alive at once in one
  session, with the RSS they add.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import queue
import tempfile
import threading
import time
from typing import Any

import psutil
import wasmtime
from _timing import summarize, timed

import spear_nb
from spear_nb import samples
from spear_nb._bridge import new_event_loop

PAYLOAD = b"spear_nb benchmark payload " * 3 + b"x" * 19  # 100 bytes
assert len(PAYLOAD) == 100


def upper_wat() -> str:
    with open(samples.path("wasm", "upper.wat"), encoding="utf-8") as f:
        return f.read()


def direct(n: int) -> dict[str, dict[str, float]]:
    """The same export called by hand through wasmtime's public API."""
    engine = wasmtime.Engine()
    module = wasmtime.Module(engine, upper_wat())
    linker = wasmtime.Linker(engine)
    logged: list[bytes] = []

    def log(caller: wasmtime.Caller, ptr: int, size: int) -> None:
        memory = caller.get("memory")
        assert isinstance(memory, wasmtime.Memory)
        logged.append(bytes(memory.read(caller, ptr, ptr + size)))

    i32 = wasmtime.ValType.i32()
    linker.define_func("spear", "log", wasmtime.FuncType([i32, i32], []), log, True)
    store = wasmtime.Store(engine)
    exports = linker.instantiate(store, module).exports(store)
    memory: Any = exports["memory"]
    alloc: Any = exports["spear_alloc"]
    handle: Any = exports["spear_handle"]
    reset: Any = exports["spear_reset"]

    ptr = alloc(store, len(PAYLOAD))
    memory.write(store, PAYLOAD, ptr)

    def handle_only() -> None:
        handle(store, ptr, len(PAYLOAD))
        logged.clear()

    def whole_round() -> bytes:
        reset(store)
        at = alloc(store, len(PAYLOAD))
        memory.write(store, PAYLOAD, at)
        packed = handle(store, at, len(PAYLOAD)) & 0xFFFFFFFFFFFFFFFF
        out, size = packed >> 32, packed & 0xFFFFFFFF
        result = bytes(memory.read(store, out, out + size))
        logged.clear()
        return result

    assert whole_round() == PAYLOAD.upper()
    results = {
        "direct_handle_only": timed(handle_only, n, warmup=200),
        "direct_whole_abi": timed(whole_round, n, warmup=200),
    }
    store.close()
    return results


def thread_hop(n: int) -> dict[str, float]:
    """The floor under any call that runs off the event loop: a coroutine hands a
    no-op to a waiting thread through a queue and awaits its answer."""
    loop = new_event_loop()
    inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def worker() -> None:
        while (item := inbox.get()) is not None:
            loop.call_soon_threadsafe(item.set_result, None)

    thread = threading.Thread(target=worker)
    thread.start()

    async def hops() -> dict[str, float]:
        samples_ = []
        for i in range(n + 200):
            start = time.perf_counter()
            future = loop.create_future()
            inbox.put(future)
            await future
            if i >= 200:
                samples_.append(time.perf_counter() - start)
        return summarize(samples_)

    try:
        return loop.run_until_complete(hops())
    finally:
        inbox.put(None)
        thread.join()
        loop.close()


def warm(session: spear_nb.Session, n: int) -> dict[str, dict[str, float]]:
    session.register("upper", wasm=samples.path("wasm", "upper.wat"))
    assert session.invoke("upper", PAYLOAD) == PAYLOAD.upper()

    async def on_loop() -> dict[str, float]:
        for _ in range(200):
            await session._invoke("upper", (PAYLOAD,), {})
        samples_ = []
        for _ in range(n):
            start = time.perf_counter()
            await session._invoke("upper", (PAYLOAD,), {})
            samples_.append(time.perf_counter() - start)
        return summarize(samples_)

    async_figures = session._loop.run(on_loop())
    sync_figures = timed(lambda: session.invoke("upper", PAYLOAD), n, warmup=200)
    return {"spear_async_on_loop": async_figures, "spear_sync_facade": sync_figures}


def cold_cached(cache: str, n: int = 15) -> dict[str, dict[str, float]]:
    """A module already in the disk cache, in a new session (its start not counted):
    register -> first result, and the first call alone."""
    wat = upper_wat()
    with spear_nb.Session(cache_dir=cache) as session:
        session.register("upper", wasm=wat)  # fills the cache
    both, first = [], []
    for _ in range(n):
        with spear_nb.Session(cache_dir=cache) as session:
            start = time.perf_counter()
            session.register("upper", wasm=wat)
            registered = time.perf_counter()
            session.invoke("upper", PAYLOAD)
            done = time.perf_counter()
            both.append(done - start)
            first.append(done - registered)
            loaded = session.events().query("phase == 'module_loaded'")
            assert len(loaded) == 1, "the module was not loaded from the cache"
    return {
        "cold_cached_register_and_first_call": summarize(both),
        "cold_cached_first_call": summarize(first),
    }


def cold_compiled(cache: str, n: int = 15) -> dict[str, float]:
    """register (compile included) -> first result of a module never seen before."""
    wat = upper_wat().rstrip()
    assert wat.endswith(")")
    samples_ = []
    with spear_nb.Session(cache_dir=cache) as session:
        for i in range(n):
            unique = wat[:-1] + f"  (global $nonce i64 (i64.const {time.time_ns()}))\n)"
            start = time.perf_counter()
            session.register(f"fresh{i}", wasm=unique)
            session.invoke(f"fresh{i}", PAYLOAD)
            samples_.append(time.perf_counter() - start)
            session.scale(f"fresh{i}", 0)
        compiled = session.events().query("phase == 'module_compiled'")
        assert len(compiled) == n, "a module came from a cache"
    return summarize(samples_)


def scale(cache: str, count: int) -> dict[str, float]:
    """``count`` warm instances of one reactor alive at once, and their RSS."""
    me = psutil.Process()
    with spear_nb.Session(cache_dir=cache, max_instances_per_task=count) as session:
        session.register("upper", wasm=samples.path("wasm", "upper.wat"))
        session.invoke("upper", PAYLOAD)
        session.scale("upper", 1)
        before = me.memory_info().rss
        start = time.perf_counter()
        session.scale("upper", count)
        seconds = time.perf_counter() - start
        after = me.memory_info().rss
        table = session.instances()
        ready = int((table["status"] == "ready").sum())
        assert ready == count, f"{ready} of {count} instances are ready"
    added = after - before
    return {
        "instances": count,
        "scale_up_s": seconds,
        "rss_added_mib": added / 2**20,
        "rss_per_instance_kib": added / (count - 1) / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    n = args.calls

    results: dict[str, Any] = {"wasmtime": importlib.metadata.version("wasmtime")}
    with tempfile.TemporaryDirectory(prefix="spear-nb-bench-cache-") as cache:
        results.update(direct(n))
        results["thread_hop_floor"] = thread_hop(n)
        with spear_nb.Session(cache_dir=cache) as session:
            results.update(warm(session, n))
        results.update(cold_cached(cache))
        results["cold_compile_register_and_first_call"] = cold_compiled(cache)
        results["scale"] = scale(cache, args.instances)

    handle_only = results["direct_handle_only"]["median_us"]
    whole = results["direct_whole_abi"]["median_us"]
    on_loop = results["spear_async_on_loop"]["median_us"]
    ratios = {
        "async_vs_direct_handle_only": on_loop / handle_only,
        "async_vs_direct_whole_abi": on_loop / whole,
        "sync_vs_direct_handle_only": results["spear_sync_facade"]["median_us"]
        / handle_only,
    }
    results["ratios"] = ratios

    print(f"{'path':<40}{'median':>12}{'p99':>12}")
    for key, value in results.items():
        if isinstance(value, dict) and "median_us" in value:
            print(f"{key:<40}{value['median_us']:>10.0f}us{value['p99_us']:>10.0f}us")
    sc = results["scale"]
    print(
        f"{sc['instances']} warm instances: +{sc['rss_added_mib']:.1f} MiB RSS "
        f"({sc['rss_per_instance_kib']:.0f} KiB each), started in "
        f"{sc['scale_up_s']:.2f} s"
    )
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
