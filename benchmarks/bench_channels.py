"""The same trivial function over every channel type, next to raw baselines.

    python benchmarks/bench_channels.py [--calls N] [--json PATH]

In one run, the latencies timed in interleaved rounds so that all see the same load:
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
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
from _timing import Batch, ForkedEcho, each, interleaved, on_loop

import spear_nb
from spear_nb import samples
from spear_nb._bridge import LoopThread
from spear_nb.communication._grpc import spear_pb2, spear_pb2_grpc

PAYLOAD = b"x" * 100


def echo(x: Any) -> Any:
    return x


class Baselines:
    """Raw clients kept open across rounds, so that they can be timed in turn
    with spear_nb's paths; the async ones run on a loop thread of their own, of
    the kind a session runs."""

    def __init__(self) -> None:
        self.loop = LoopThread("raw-baselines")

    def batch(self, once: Callable[[], Awaitable[Any]]) -> Batch:
        async def run(k: int) -> list[float]:
            samples = []
            for _ in range(k):
                start = time.perf_counter()
                await once()
                samples.append(time.perf_counter() - start)
            return samples

        return lambda k: self.loop.run(run(k))

    async def _close(self) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        """Stop what the baselines started besides their loop."""

    def close(self) -> None:
        try:
            self.loop.run(self._close())
        finally:
            self.loop.stop()
            self._release()


class SocketBaselines(Baselines):
    """A blocking Unix-socket echo served by a forked child, and an asyncio
    (streams) client of a second such echo."""

    def __init__(self) -> None:
        super().__init__()
        self.blocking = ForkedEcho()
        self._echo = ForkedEcho()
        self.loop.run(self._open())

    async def _open(self) -> None:
        sock = self._echo.sock.dup()
        self._reader, self._writer = await asyncio.open_unix_connection(sock=sock)

    async def _once(self) -> None:
        self._writer.write(PAYLOAD)
        await self._reader.readexactly(len(PAYLOAD))

    def paths(self) -> dict[str, Batch]:
        return {
            "raw_blocking_unix_echo": each(lambda: self.blocking.call(PAYLOAD)),
            "raw_asyncio_unix_echo": self.batch(self._once),
        }

    async def _close(self) -> None:
        self._writer.close()
        await self._writer.wait_closed()

    def _release(self) -> None:
        self._echo.close()
        self.blocking.close()


class GrpcBaselines(Baselines):
    """grpc.aio ping-pong on one bidirectional stream, against a server on the
    same loop and against one in a second process (as an agent is)."""

    def __init__(self) -> None:
        super().__init__()
        context = multiprocessing.get_context("spawn")
        ports = context.Queue()
        self._child = context.Process(
            target=_serve_grpc_echo, args=(ports,), daemon=True
        )
        self._child.start()
        self._remote_port = ports.get(timeout=60)
        self.loop.run(self._open())

    async def _open(self) -> None:
        self._server = grpc.aio.server()
        spear_pb2_grpc.add_AgentServicer_to_server(_Echo(), self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        self._local = _PingPong(f"127.0.0.1:{port}")
        self._remote = _PingPong(f"127.0.0.1:{self._remote_port}")

    def paths(self) -> dict[str, Batch]:
        return {
            "raw_grpc_bidi_pingpong": self.batch(self._local.once),
            "raw_grpc_bidi_pingpong_two_processes": self.batch(self._remote.once),
        }

    async def _close(self) -> None:
        await self._local.close()
        await self._remote.close()
        await self._server.stop(None)

    def _release(self) -> None:
        self._child.kill()
        self._child.join(10)


class _Echo(spear_pb2_grpc.AgentServicer):
    async def Connect(self, request_iterator: Any, context: Any) -> Any:
        async for frame in request_iterator:
            yield frame


class _PingPong:
    """One bidirectional stream on which a frame goes there and back."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._call = spear_pb2_grpc.AgentStub(self._channel).Connect()

    async def once(self) -> None:
        await self._call.write(spear_pb2.Frame(body=PAYLOAD))
        await self._call.read()

    async def close(self) -> None:
        await self._call.done_writing()
        await self._channel.close()


def _serve_grpc_echo(ports: Any) -> None:
    """The second process of the two-process ping-pong: echo until killed."""

    async def main() -> None:
        server = grpc.aio.server()
        spear_pb2_grpc.add_AgentServicer_to_server(_Echo(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ports.put(port)
        await server.wait_for_termination()

    asyncio.run(main())


def spear_paths(s: spear_nb.Session, kinds: tuple[str, ...]) -> dict[str, Batch]:
    """spear_nb's echo over each channel kind, awaited on the session's loop and
    called through the blocking facade."""
    paths: dict[str, Batch] = {}
    for kind in kinds:
        name = f"echo_{kind}"
        if kind == "memory":  # the runtime that uses it: a WASM reactor
            try:
                s.register(name, wasm=samples.path("wasm", "upper.wat"))
            except (spear_nb.SpearError, FileNotFoundError) as exc:
                print(f"memory channel skipped: {exc}")
                continue
        else:
            s.register(name, echo, channel=kind)
        s.invoke(name, PAYLOAD)
        paths[f"spear_{kind}_async"] = on_loop(s, name, PAYLOAD)
        paths[f"spear_{kind}_sync"] = each(lambda name=name: s.invoke(name, PAYLOAD))
    return paths


def latencies(s: spear_nb.Session, n: int) -> dict[str, dict[str, float]]:
    """Each path timed in interleaved rounds with its baselines, so that they
    all see the same load: a baseline timed alone, on idle CPUs, is slower (a
    halted virtual CPU is slow to wake). The gRPC group comes second, as gRPC's
    own threads, once started, slow every other path in the process."""
    results: dict[str, dict[str, float]] = {}
    per_round = 100
    for baselines, kinds in (
        (SocketBaselines, ("unix", "tcp", "memory")),
        (GrpcBaselines, ("grpc",)),
    ):
        raw = baselines()
        try:
            paths = {**raw.paths(), **spear_paths(s, kinds)}
            results.update(
                interleaved(
                    {name: (batch, per_round) for name, batch in paths.items()},
                    rounds=max(1, n // per_round),
                )
            )
        finally:
            raw.close()
    return results


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
    results: dict[str, Any] = {}
    with spear_nb.Session() as s:
        results.update(latencies(s, n))
        s.register("tput_pipelined", echo, max_concurrency=64, pipeline=True)
        s.register("tput_threads", echo, max_concurrency=64)
        results["throughput_64_pipelined_per_s"] = throughput(s, "tput_pipelined")
        results["throughput_64_threads_per_s"] = throughput(s, "tput_threads")
        results["throughput_64_pipelined_gathered_per_s"] = throughput_gathered(
            s, "tput_pipelined"
        )
        kinds = [
            k for k in ("unix", "tcp", "grpc", "memory") if f"spear_{k}_sync" in results
        ]
        for kind in kinds:
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
