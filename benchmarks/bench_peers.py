"""spear_nb next to what a notebook user would use instead, in one run.

    python benchmarks/bench_peers.py [--quick] [--json PATH]

The same trivial function (``inc(x) = x + 1``, or an echo of bytes) runs on:
spear_nb instances per runtime and channel (process over unix, tcp and grpc; a
WASM reactor over the memory channel; a pod of ``LocalKubeAPI`` over gRPC),
``concurrent.futures.ProcessPoolExecutor``, ``dask.distributed`` (a
``LocalCluster`` with worker processes) and ``ipyparallel``. Measured:

- warm invoke, one call in flight, in interleaved rounds so that every path sees
  the same machine load;
- cold start: create -> first result, in interleaved rounds;
- throughput with 1, 8 and 64 calls in flight, two workers or instances each;
- latency as the payload grows from 1 B to 16 MiB;
- the cost of 1, 10 and 100 instances or workers: start time and memory (USS:
  the memory a process does not share; RSS summed would count shared pages once
  per process).

Every figure is a median with its p99 (and n). The WASM "trivial function" is
the ``upper`` sample on a 1-byte payload: WASM functions take bytes.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib.util
import itertools
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

# gRPC's C core notes every fork (ProcessPoolExecutor forks) at info level.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
warnings.filterwarnings("ignore", module="distributed")  # "large graph" advice

import cloudpickle  # noqa: E402
import psutil  # noqa: E402
from _timing import Batch, each, interleaved, on_loop, summarize  # noqa: E402

import spear_nb  # noqa: E402
from spear_nb import samples  # noqa: E402

IMAGE = "spear-nb-agent:latest"
KiB, MiB = 1 << 10, 1 << 20
PAYLOAD_SIZES = [1, KiB, 64 * KiB, MiB, 16 * MiB]
IN_FLIGHT = [1, 8, 64]
INSTANCE_COUNTS = [1, 10, 100]
HAVE_KUBE = importlib.util.find_spec("kubernetes") is not None
DEFAULT_PATH = "spear process/unix (sync)"


def inc(x: int) -> int:
    return x + 1


def echo(data: bytes) -> bytes:
    return data


# dask and ipyparallel workers cannot import this file: ship it by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def descendants() -> dict[int, psutil.Process]:
    return {p.pid: p for p in psutil.Process().children(recursive=True)}


def memory_of(processes: list[psutil.Process]) -> dict[str, float]:
    uss = rss = 0
    for p in processes:
        with contextlib.suppress(psutil.Error):
            info = p.memory_full_info()
            uss += info.uss
            rss += info.rss
    return {"uss_mib": uss / MiB, "rss_mib": rss / MiB, "processes": len(processes)}


# -- the systems ---------------------------------------------------------------------


class Peer:
    """One system under test: how to start it, call it and stop it."""

    name = ""

    def start(self, workers: int = 1) -> None:
        raise NotImplementedError

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        raise NotImplementedError

    def in_flight(self, fn: Callable[..., Any], args: list[Any], k: int) -> None:
        """Run ``fn`` on every item of ``args`` with at most ``k`` in flight."""
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class Pool(Peer):
    name = "ProcessPoolExecutor"

    def start(self, workers: int = 1) -> None:
        self.pool = concurrent.futures.ProcessPoolExecutor(max_workers=workers)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.pool.submit(fn, *args).result()

    def in_flight(self, fn: Callable[..., Any], args: list[Any], k: int) -> None:
        pending: set[concurrent.futures.Future[Any]] = set()
        for a in args:
            if len(pending) >= k:
                done, pending = concurrent.futures.wait(
                    pending, return_when=concurrent.futures.FIRST_COMPLETED
                )
                for f in done:
                    f.result()
            pending.add(self.pool.submit(fn, a))
        for f in concurrent.futures.as_completed(pending):
            f.result()

    def stop(self) -> None:
        self.pool.shutdown()


class Dask(Peer):
    name = "dask.distributed"

    def start(self, workers: int = 1) -> None:
        from distributed import Client, LocalCluster

        self.cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
        self.client = Client(self.cluster)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.client.submit(fn, *args, pure=False).result()

    def in_flight(self, fn: Callable[..., Any], args: list[Any], k: int) -> None:
        from distributed import as_completed

        it = iter(args)
        first = [self.client.submit(fn, a, pure=False) for a in itertools.islice(it, k)]
        queue = as_completed(first)
        for future in queue:
            future.result()
            nxt = next(it, None)
            if nxt is not None:
                queue.add(self.client.submit(fn, nxt, pure=False))

    def stop(self) -> None:
        self.client.close()
        self.cluster.close()


class IPyParallel(Peer):
    name = "ipyparallel"

    def start(self, workers: int = 1) -> None:
        import ipyparallel as ipp

        self.cluster = ipp.Cluster(n=workers, log_level=logging.ERROR)
        self.rc = self.cluster.start_and_connect_sync()
        self.rc.wait_for_engines(workers, timeout=120)
        self.view = self.rc[0]
        self.balanced = self.rc.load_balanced_view()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.view.apply_sync(fn, *args)

    def in_flight(self, fn: Callable[..., Any], args: list[Any], k: int) -> None:
        pending: list[Any] = []
        for a in args:
            if len(pending) >= k:
                pending.pop(0).get()
            pending.append(self.balanced.apply_async(fn, a))
        for p in pending:
            p.get()

    def stop(self) -> None:
        self.rc.close()
        self.cluster.stop_cluster_sync()


PEERS: list[type[Peer]] = [Pool, Dask, IPyParallel]


class Spear:
    """One session with a function per runtime and channel."""

    def __init__(self, kube: Any, cache_dir: str) -> None:
        settings: dict[str, Any] = {"cache_dir": cache_dir}
        if kube is not None:
            settings["kubeconfig"] = kube.kubeconfig
        self.session = spear_nb.Session(**settings)
        s = self.session
        self.upper = samples.path("wasm", "upper.wat")
        with open(self.upper) as f:
            self.upper_text = f.read()
        s.register("inc_unix", inc)
        s.register("inc_tcp", inc, channel="tcp")
        s.register("inc_grpc", inc, channel="grpc")
        s.register("upper", wasm=self.upper)
        self.paths: dict[str, Callable[[], Any]] = {
            "spear process/unix (sync)": lambda: s.invoke("inc_unix", 1),
            "spear process/tcp (sync)": lambda: s.invoke("inc_tcp", 1),
            "spear process/grpc (sync)": lambda: s.invoke("inc_grpc", 1),
            "spear wasm/memory (sync)": lambda: s.invoke("upper", b"x"),
        }
        if kube is not None:
            s.register("inc_pod", inc, image=IMAGE)
            self.paths["spear kubernetes/grpc (sync)"] = lambda: s.invoke("inc_pod", 1)
        for call in self.paths.values():
            call()

    def close(self) -> None:
        self.session.close()


# -- warm --------------------------------------------------------------------------


def warm(
    spear: Spear, peers: dict[str, Peer], rounds: int, every_path: bool
) -> dict[str, Any]:
    """Warm calls in interleaved rounds: spear_nb's paths (all of them, or only
    the default one) and the peers'."""
    paths: dict[str, tuple[Batch, int]] = {
        name: (each(call), 100)
        for name, call in spear.paths.items()
        if every_path or name == DEFAULT_PATH
    }
    if every_path:
        batch = on_loop(spear.session, "inc_unix", 1)
        paths["spear process/unix (async, on the session loop)"] = (batch, 100)
    slow = {"dask.distributed": 10, "ipyparallel": 10, "ProcessPoolExecutor": 100}
    for name, peer in peers.items():
        paths[name] = (each(lambda p=peer: p.call(inc, 1)), slow[name])
    return interleaved(paths, rounds)


# -- cold --------------------------------------------------------------------------


def cold(spear: Spear, kube: Any, rounds: int, cache_dir: str) -> dict[str, Any]:
    s = spear.session
    counter = iter(range(1_000_000))
    samples_: dict[str, list[float]] = {}

    def fresh_fn() -> Callable[[int], int]:
        i = next(counter)

        def fresh(x: int, i: int = i) -> int:
            return x + i

        return fresh

    def spear_process() -> None:
        # register -> first result of a new instance; the session is running.
        name = f"cold{next(counter)}"
        s.register(name, fresh_fn())
        s.invoke(name, 1)

    def spear_process_spawn() -> None:
        name = f"cold{next(counter)}"
        spawn.register(name, fresh_fn())
        spawn.invoke(name, 1)

    def spear_session() -> None:
        with spear_nb.Session(cache_dir=cache_dir) as fresh:
            fresh.invoke(inc, 1)

    def spear_wasm() -> None:
        # A module never seen: compiled (no disk cache hit), then instantiated.
        name = f"cold{next(counter)}"
        text = spear.upper_text + f"\n;; {name}\n"
        s.register(name, wasm=text)
        s.invoke(name, b"x")

    def spear_pod() -> None:
        name = f"cold{next(counter)}"
        s.register(name, fresh_fn(), image=IMAGE)
        s.invoke(name, 1)

    def peer(cls: type[Peer]) -> Callable[[], None]:
        def run() -> None:
            p = cls()
            start = time.perf_counter()
            p.start(1)
            p.call(inc, 1)
            samples_.setdefault(cls.name, []).append(time.perf_counter() - start)
            p.stop()

        return run

    spawn = spear_nb.Session(start_method="spawn", cache_dir=cache_dir)
    timed: dict[str, Callable[[], None]] = {
        "spear process instance (fork from the zygote)": spear_process,
        "spear process instance (spawn a python)": spear_process_spawn,
        "spear new session + first result": spear_session,
        "spear wasm instance (compile + instantiate)": spear_wasm,
    }
    if kube is not None:
        timed["spear kubernetes pod (LocalKubeAPI)"] = spear_pod
    try:
        for r in range(rounds):
            order = list(timed.items())
            order = order[r % len(order) :] + order[: r % len(order)]
            for name, fn in order:
                start = time.perf_counter()
                fn()
                samples_.setdefault(name, []).append(time.perf_counter() - start)
            for cls in PEERS:  # timed inside: start -> first result, not stop
                peer(cls)()
    finally:
        spawn.close()
    for name in list(s.functions):
        if name.startswith("cold"):
            s.scale(name, 0)
    results: dict[str, Any] = {n: summarize(v) for n, v in samples_.items()}
    results["import distributed (new python)"] = import_time("distributed")
    results["import ipyparallel (new python)"] = import_time("ipyparallel")
    results["import spear_nb (new python)"] = import_time("spear_nb")
    return results


def import_time(module: str, n: int = 3) -> dict[str, float]:
    samples_ = []
    for _ in range(n):
        code = f"import time; t = time.perf_counter(); import {module}; "
        code += "print(time.perf_counter() - t)"
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        samples_.append(float(out.stdout.strip().splitlines()[-1]))
    return summarize(samples_)


# -- throughput ----------------------------------------------------------------------


def throughput(cache_dir: str, quick: bool) -> dict[str, Any]:
    """Calls per second with k in flight; two workers or instances each."""
    calls = {"spear": 4000, "ProcessPoolExecutor": 2000}
    calls |= {"dask.distributed": 300, "ipyparallel": 300}
    if quick:
        calls = {k: max(50, v // 10) for k, v in calls.items()}
    results: dict[str, Any] = {}
    with spear_nb.Session(cache_dir=cache_dir) as s:
        # Two instances, each taking up to 32 calls at once (run in order on its
        # main thread): up to 64 in flight without waiting in the session.
        s.register("inc", inc, max_instances=2, max_concurrency=32, pipeline=True)
        s.scale("inc", 2)

        def spear_run(args: list[int], k: int) -> None:
            s.map("inc", args, progress=False, max_in_flight=k)

        def measure(name: str, run: Callable[[list[int], int], None], n: int) -> None:
            for k in IN_FLIGHT:
                rates = []
                for _ in range(3):
                    start = time.perf_counter()
                    run(list(range(n)), k)
                    rates.append(n / (time.perf_counter() - start))
                results.setdefault(name, {})[str(k)] = {
                    "median_per_s": statistics.median(rates),
                    "min_per_s": min(rates),
                    "n": n,
                }

        measure("spear (Session.map, 2 instances)", spear_run, calls["spear"])
    # One system at a time: a peer's client threads would slow the others.
    for cls in PEERS:
        p = cls()
        p.start(2)
        try:
            measure(
                f"{cls.name} (2 workers)",
                lambda args, k, p=p: p.in_flight(inc, args, k),
                calls[cls.name],
            )
        finally:
            p.stop()
    return results


# -- payload sizes -------------------------------------------------------------------


def payloads(
    spear: Spear, peers: dict[str, Peer], quick: bool, every_path: bool
) -> dict[str, Any]:
    s = spear.session
    if "echo_unix" not in s.functions:
        s.register("echo_unix", echo)
        s.register("echo_tcp", echo, channel="tcp")
        s.register("echo_grpc", echo, channel="grpc")
    results: dict[str, Any] = {}
    for size in PAYLOAD_SIZES:
        data = os.urandom(size)
        n = 200 if size <= 64 * KiB else (30 if size <= MiB else 5)
        if quick:
            n = max(3, n // 10)
        slow_n = max(3, n // 4)
        paths: dict[str, tuple[Batch, int]] = {
            "spear process/unix": (each(lambda d=data: s.invoke("echo_unix", d)), n),
            "spear process/tcp": (each(lambda d=data: s.invoke("echo_tcp", d)), n),
            "spear process/grpc": (each(lambda d=data: s.invoke("echo_grpc", d)), n),
            "spear wasm/memory": (each(lambda d=data: s.invoke("upper", d)), n),
        }
        if not every_path:
            paths = {k: v for k, v in paths.items() if k == "spear process/unix"}
        for name, peer in peers.items():
            count = n if name == "ProcessPoolExecutor" else slow_n
            paths[name] = (each(lambda p=peer, d=data: p.call(echo, d)), count)
        for name, figure in interleaved(paths, rounds=1).items():
            results.setdefault(name, {})[str(size)] = figure
    return results


# -- the cost of many instances ------------------------------------------------------


def instances(cache_dir: str, quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    counts = [1, 10] if quick else INSTANCE_COUNTS
    for n in counts:
        before = descendants()
        start = time.perf_counter()
        with spear_nb.Session(max_instances_per_task=n, cache_dir=cache_dir) as s:
            s.register("inc", inc, max_instances=n)
            s.scale("inc", n)
            elapsed = time.perf_counter() - start
            started = [p for pid, p in descendants().items() if pid not in before]
            figure = {"start_s": elapsed, **memory_of(started)}
            pids = [int(p) for p in s.instances()["pid"]]
            figure["per_instance_uss_mib"] = (
                memory_of([psutil.Process(p) for p in pids])["uss_mib"] / n
            )
        key = "spear process instances (session included)"
        results.setdefault(key, {})[str(n)] = figure
    limits = {"ProcessPoolExecutor": counts, "dask.distributed": [1, 10]}
    limits["ipyparallel"] = [1, 10]
    for cls in PEERS:
        for n in limits[cls.name]:
            before = descendants()
            p = cls()
            start = time.perf_counter()
            p.start(n)
            if isinstance(p, Pool):  # workers start on demand: make all n start
                for f in [p.pool.submit(inc, i) for i in range(n)]:
                    f.result()
            else:
                p.call(inc, 1)
            elapsed = time.perf_counter() - start
            started = [q for pid, q in descendants().items() if pid not in before]
            results.setdefault(cls.name, {})[str(n)] = {
                "start_s": elapsed,
                **memory_of(started),
            }
            p.stop()
    return results


# -- all of it -------------------------------------------------------------------------


@contextlib.contextmanager
def local_kube() -> Iterator[Any]:
    if not HAVE_KUBE:
        yield None
        return
    from spear_nb.testing import LocalKubeAPI

    with LocalKubeAPI() as kube:
        yield kube


def run(quick: bool, cache_dir: str) -> dict[str, Any]:
    results: dict[str, Any] = {"load_before": os.getloadavg()}
    rounds = 4 if quick else 20
    with local_kube() as kube:
        spear = Spear(kube, cache_dir)
        pool = Pool()
        pool.start(1)
        try:
            # First spear_nb's paths next to ProcessPoolExecutor alone: the dask
            # and ipyparallel clients keep threads busy in this process (dask's
            # scheduler runs here), which slows every other path measured here.
            print("warm ...", flush=True)
            first: dict[str, Peer] = {Pool.name: pool}
            results["warm"] = warm(spear, first, rounds, every_path=True)
            print("payloads ...", flush=True)
            results["payload"] = payloads(spear, first, quick, every_path=True)
            # Then the default path again, next to dask and ipyparallel.
            threaded: dict[str, Peer] = {}
            try:
                for cls in (Dask, IPyParallel):
                    threaded[cls.name] = cls()
                    threaded[cls.name].start(1)
                print("warm, threaded peers ...", flush=True)
                results["warm_threaded"] = warm(
                    spear, threaded, rounds, every_path=False
                )
                print("payloads, threaded peers ...", flush=True)
                results["payload_threaded"] = payloads(
                    spear, threaded, quick, every_path=False
                )
            finally:
                for peer in threaded.values():
                    peer.stop()
        finally:
            pool.stop()
        try:
            print("cold ...", flush=True)
            results["cold"] = cold(spear, kube, 2 if quick else 3, cache_dir)
        finally:
            spear.close()
    print("throughput ...", flush=True)
    results["throughput"] = throughput(cache_dir, quick)
    print("instances ...", flush=True)
    results["instances"] = instances(cache_dir, quick)
    results["load_after"] = os.getloadavg()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few samples (a check)")
    parser.add_argument("--json", default="")
    parser.add_argument("--cache-dir", default="")
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        results = run(args.quick, args.cache_dir or tmp)
    text = json.dumps(results, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
