"""The same trivial function over every channel type, next to raw baselines.

    python benchmarks/bench_channels.py [--calls N] [--json PATH]

In one run:
- warm invoke latency (median, p99) over unix, tcp and grpc (process runtime,
  ``channel=`` override) and memory (a WASM reactor, the runtime that uses it);
- the raw baselines: a blocking Unix-socket echo, the same echo called from an
  asyncio client (streams, on the session's kind of loop) and a grpc.aio
  bidirectional-stream ping-pong, in one process and with the server in a second
  process as an agent is, all with a 100-byte payload;
- throughput of the async API with 64 calls in flight on one unix channel (64
  callers in a closed loop), with the calls pipelined in the instance and with a
  thread pool there, and pipelined with one task per call gathered;
- bytes per second for 1 MiB and 16 MiB payloads per channel type.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import time
from typing import Any

import grpc
import grpc.aio
from _timing import ForkedEcho, timed, timed_async

import spear_nb
from spear_nb import samples
from spear_nb._bridge import new_event_loop
from spear_nb.communication._grpc import spear_pb2, spear_pb2_grpc

PAYLOAD = b"x" * 100


def echo(x: Any) -> Any:
    return x


def blocking_echo(n: int) -> dict[str, float]:
    with ForkedEcho() as echo:
        return timed(lambda: echo.call(PAYLOAD), n)


def asyncio_echo(n: int) -> dict[str, float]:
    """An asyncio client, on the kind of loop a session runs, against the same
    blocking echo in a forked child: the floor for an agent call from the loop."""

    async def main() -> dict[str, float]:
        with ForkedEcho() as echo:
            reader, writer = await asyncio.open_unix_connection(sock=echo.sock.dup())

            async def once() -> None:
                writer.write(PAYLOAD)
                await reader.readexactly(len(PAYLOAD))

            try:
                return await timed_async(once, n)
            finally:
                writer.close()
                await writer.wait_closed()

    loop = new_event_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


class _Echo(spear_pb2_grpc.AgentServicer):
    async def Connect(self, request_iterator: Any, context: Any) -> Any:
        async for frame in request_iterator:
            yield frame


async def _pingpong(address: str, n: int) -> dict[str, float]:
    """Time ``n`` round trips of one frame on one bidirectional stream."""
    channel = grpc.aio.insecure_channel(address)
    call = spear_pb2_grpc.AgentStub(channel).Connect()

    async def once() -> None:
        await call.write(spear_pb2.Frame(body=PAYLOAD))
        await call.read()

    result = await timed_async(once, n)
    await call.done_writing()
    await channel.close()
    return result


def grpc_pingpong(n: int) -> dict[str, float]:
    async def main() -> dict[str, float]:
        server = grpc.aio.server()
        spear_pb2_grpc.add_AgentServicer_to_server(_Echo(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        result = await _pingpong(f"127.0.0.1:{port}", n)
        await server.stop(None)
        return result

    return asyncio.run(main())


def _serve_grpc_echo(ports: Any) -> None:
    """The child of :func:`grpc_pingpong_two_processes`: echo until killed."""

    async def main() -> None:
        server = grpc.aio.server()
        spear_pb2_grpc.add_AgentServicer_to_server(_Echo(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ports.put(port)
        await server.wait_for_termination()

    asyncio.run(main())


def grpc_pingpong_two_processes(n: int) -> dict[str, float]:
    """The same ping-pong with the server in another process, as an agent is."""
    context = multiprocessing.get_context("spawn")
    ports = context.Queue()
    child = context.Process(target=_serve_grpc_echo, args=(ports,), daemon=True)
    child.start()
    try:
        port = ports.get(timeout=60)

        loop = new_event_loop()
        try:
            return loop.run_until_complete(_pingpong(f"127.0.0.1:{port}", n))
        finally:
            loop.close()
    finally:
        child.kill()
        child.join(10)


def spear_latency(session: spear_nb.Session, name: str, n: int) -> dict[str, float]:
    session.invoke(name, PAYLOAD)

    async def on_loop() -> dict[str, float]:
        return await timed_async(lambda: session._invoke(name, (PAYLOAD,), {}), n)

    return session._loop.run(on_loop())


def spear_sync(session: spear_nb.Session, name: str, n: int) -> dict[str, float]:
    return timed(lambda: session.invoke(name, PAYLOAD), n)


def throughput(session: spear_nb.Session, name: str, n: int = 20000) -> float:
    """Calls per second with 64 in flight: 64 callers on the session's loop, each
    making its next call as soon as its last one returns (a closed loop)."""

    async def run() -> float:
        async def caller(count: int) -> None:
            for i in range(count):
                await session._invoke(name, (i,), {})

        start = time.perf_counter()
        await asyncio.gather(*(caller(n // 64) for _ in range(64)))
        return 64 * (n // 64) / (time.perf_counter() - start)

    session.invoke(name, 0)
    return session._loop.run(run())


def throughput_gathered(session: spear_nb.Session, name: str, n: int = 20000) -> float:
    """The same with every call a task of its own, 64 let through at a time by a
    semaphore: what ``asyncio.gather`` over all the calls costs on top."""

    async def run() -> float:
        limit = asyncio.Semaphore(64)

        async def one(i: int) -> Any:
            async with limit:
                return await session._invoke(name, (i,), {})

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return n / (time.perf_counter() - start)

    session.invoke(name, 0)
    return session._loop.run(run())


def bandwidth(
    session: spear_nb.Session, name: str, size: int, rounds: int = 5
) -> float:
    payload = os.urandom(size)
    session.invoke(name, payload)
    start = time.perf_counter()
    for _ in range(rounds):
        session.invoke(name, payload)
    # Each call moves the payload there and back.
    return 2 * size * rounds / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    n = args.calls
    results: dict[str, Any] = {
        "raw_blocking_unix_echo": blocking_echo(n),
        "raw_asyncio_unix_echo": asyncio_echo(n),
        "raw_grpc_bidi_pingpong": grpc_pingpong(n),
        "raw_grpc_bidi_pingpong_two_processes": grpc_pingpong_two_processes(n),
    }
    with spear_nb.Session() as s:
        for kind in ("unix", "tcp", "grpc"):
            s.register(f"echo_{kind}", echo, channel=kind)
            results[f"spear_{kind}_async"] = spear_latency(s, f"echo_{kind}", n)
            results[f"spear_{kind}_sync"] = spear_sync(s, f"echo_{kind}", n)
        try:
            s.register("echo_memory", wasm=samples.path("wasm", "upper.wat"))
        except (spear_nb.SpearError, FileNotFoundError) as exc:
            results["spear_memory_async"] = {"error": str(exc)}
        else:
            results["spear_memory_async"] = spear_latency(s, "echo_memory", n)
            results["spear_memory_sync"] = spear_sync(s, "echo_memory", n)
        s.register("tput_pipelined", echo, max_concurrency=64, pipeline=True)
        s.register("tput_threads", echo, max_concurrency=64)
        results["throughput_64_pipelined_per_s"] = throughput(s, "tput_pipelined")
        results["throughput_64_threads_per_s"] = throughput(s, "tput_threads")
        results["throughput_64_pipelined_gathered_per_s"] = throughput_gathered(
            s, "tput_pipelined"
        )
        for kind in ("unix", "tcp", "grpc"):
            for size in (1 << 20, 16 << 20):
                key = f"bandwidth_{kind}_{size >> 20}MiB_MB_per_s"
                results[key] = bandwidth(s, f"echo_{kind}", size) / 1e6

    print(f"{'path':<28}{'median':>10}{'p99':>10}")
    for key, value in results.items():
        if isinstance(value, dict) and "median_us" in value:
            print(f"{key:<28}{value['median_us']:>8.0f}us{value['p99_us']:>8.0f}us")
        elif isinstance(value, float):
            print(f"{key:<40}{value:>12.0f}")
    blocking = results["raw_blocking_unix_echo"]["median_us"]
    grpc_ours = results["spear_grpc_async"]["median_us"]
    ratios = {
        "unix_sync_vs_blocking_echo": results["spear_unix_sync"]["median_us"]
        / blocking,
        "unix_async_vs_blocking_echo": results["spear_unix_async"]["median_us"]
        / blocking,
        "grpc_vs_raw_pingpong_one_process": grpc_ours
        / results["raw_grpc_bidi_pingpong"]["median_us"],
        "grpc_vs_raw_pingpong_two_processes": grpc_ours
        / results["raw_grpc_bidi_pingpong_two_processes"]["median_us"],
    }
    results["ratios"] = ratios
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
