"""Run every benchmark and write docs/performance.md with its plots.

    python benchmarks/run_all.py [--quick] [--max-load L] [--from-json PATH]

Runs ``bench_peers.py`` (spear_nb next to ProcessPoolExecutor, dask.distributed
and ipyparallel) and the component benchmarks (``bench_process``,
``bench_channels``, ``bench_wasm``, ``bench_kubernetes``), each in a fresh
Python, then writes ``docs/performance.md``, its figures as PNG under
``docs/performance/`` and every number in ``docs/performance/results.json``.
``--from-json`` redraws the document from a results file without measuring.
The peers come from the ``bench`` extra: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DOCS = os.path.join(ROOT, "docs")
FIGURES = os.path.join(DOCS, "performance")
PEERS = ("ProcessPoolExecutor", "dask.distributed", "ipyparallel")
WARM_SPEAR = "spear process/unix (sync)"
COLD_SPEAR = "spear process instance (fork from the zygote)"
COMPONENTS = {
    "bench_process": ["--calls", "2000"],
    "bench_channels": ["--calls", "1000"],
    "bench_wasm": ["--calls", "2000", "--instances", "1000"],
    "bench_kubernetes": ["--calls", "300", "--rounds", "4", "--cold", "5"],
}
QUICK = {
    "bench_process": ["--calls", "300"],
    "bench_channels": ["--calls", "200"],
    "bench_wasm": ["--calls", "300", "--instances", "50"],
    "bench_kubernetes": ["--calls", "50", "--rounds", "2", "--cold", "2"],
}


# -- measuring -------------------------------------------------------------------------


def wait_for_quiet(max_load: float, patience: float) -> None:
    """Wait (at most ``patience`` seconds) until the 1-minute load is below
    ``max_load``: other work on a shared machine skews every figure."""
    deadline = time.monotonic() + patience
    pause = threading.Event()
    while os.getloadavg()[0] > max_load and time.monotonic() < deadline:
        print(f"load {os.getloadavg()[0]:.2f} > {max_load}: waiting", flush=True)
        pause.wait(15)


def leftovers(token: str) -> list[Any]:
    """Processes still alive that a script started (they carry its token in
    their environment), however far from it they were reparented."""
    import psutil

    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("SPEAR_BENCH_RUN") == token:
                found.append(process)
        except (psutil.Error, OSError):
            continue
    return found


def wait_for_leftovers(name: str, token: str, patience: float = 60.0) -> None:
    """Let what a script started finish before the next one is timed (the
    peers' workers linger for seconds after their clusters close); kill what is
    still there after ``patience`` seconds."""
    import psutil

    deadline = time.monotonic() + patience
    while (alive := leftovers(token)) and time.monotonic() < deadline:
        psutil.wait_procs(alive, timeout=1)
    for process in leftovers(token):
        print(f"{name} left pid {process.pid} behind: killing it", flush=True)
        with contextlib.suppress(psutil.Error):
            process.kill()


def run_script(name: str, args: list[str], out_dir: str) -> dict[str, Any]:
    path = os.path.join(out_dir, f"{name}.json")
    started = time.perf_counter()
    token = f"{os.getpid()}-{name}-{time.time_ns()}"
    env = dict(os.environ, GRPC_VERBOSITY="ERROR", SPEAR_BENCH_RUN=token)
    done = subprocess.run(
        [sys.executable, os.path.join(HERE, f"{name}.py"), *args, "--json", path],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    seconds = time.perf_counter() - started
    print(f"{name}: {seconds:.0f} s (exit {done.returncode})", flush=True)
    wait_for_leftovers(name, token)
    if done.returncode != 0 or not os.path.exists(path):
        return {"error": done.stderr.strip().splitlines()[-5:], "seconds": seconds}
    with open(path) as f:
        result: dict[str, Any] = json.load(f)
    result["seconds"] = seconds
    return result


def measure(quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "machine": machine(),
        "load_start": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        args = ["--quick"] if quick else []
        results["peers"] = run_script("bench_peers", args, tmp)
        for name, extra in (QUICK if quick else COMPONENTS).items():
            results[name] = run_script(name, extra, tmp)
    results["load_end"] = os.getloadavg()
    return results


def machine() -> dict[str, Any]:
    import psutil

    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for package in ("spear_nb", "distributed", "ipyparallel", "wasmtime", "grpcio"):
        try:
            from importlib.metadata import version

            versions[package] = version(package)
        except Exception:
            versions[package] = "not installed"
    return {
        "cpus": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "versions": versions,
    }


# -- figures ---------------------------------------------------------------------------


BESIDE = "spear process/unix (sync), beside dask + ipyparallel"


def merged(peers: dict[str, Any]) -> dict[str, Any]:
    """The sections with the dask and ipyparallel blocks folded in (for plots)."""
    out = dict(peers)
    warm = dict(peers["warm"])
    threaded = peers["warm_threaded"]
    warm[BESIDE] = threaded[WARM_SPEAR]
    warm.update({k: v for k, v in threaded.items() if k != WARM_SPEAR})
    out["warm"] = warm
    payload = dict(peers["payload"])
    payload.update(
        {
            k: v
            for k, v in peers["payload_threaded"].items()
            if not k.startswith("spear")
        }
    )
    out["payload"] = payload
    return out


def plots(results: dict[str, Any]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(FIGURES, exist_ok=True)
    peers = merged(results["peers"])
    made: dict[str, str] = {}

    def bars(section: str, title: str, file: str, unit: float, label: str) -> None:
        data = peers[section]
        names = [n for n in data if "median_us" in data[n] and "import" not in n]
        medians = [data[n]["median_us"] / unit for n in names]
        p99 = [data[n]["p99_us"] / unit for n in names]
        colors = ["tab:blue" if n.startswith("spear") else "tab:gray" for n in names]
        fig, ax = plt.subplots(figsize=(9, 0.42 * len(names) + 1.2))
        y = range(len(names))
        ax.barh(y, medians, color=colors)
        ax.scatter(p99, y, marker="|", color="black", s=120, label="p99", zorder=3)
        ax.set_yticks(list(y), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        fig.savefig(os.path.join(FIGURES, file), dpi=80, bbox_inches="tight")
        plt.close(fig)
        made[section] = file

    bars("warm", "Warm invoke, one call in flight", "warm.png", 1.0, "µs (log)")
    bars("cold", "Cold start: create -> first result", "cold.png", 1e3, "ms (log)")

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for name, by_k in peers["throughput"].items():
        ks = sorted(by_k, key=int)
        style = "-o" if name.startswith("spear") else "--s"
        ax.plot(
            [int(k) for k in ks],
            [by_k[k]["median_per_s"] for k in ks],
            style,
            label=name,
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("calls in flight")
    ax.set_ylabel("calls per second (log)")
    ax.set_title("Throughput of a trivial function", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(FIGURES, "throughput.png"), dpi=80, bbox_inches="tight")
    plt.close(fig)
    made["throughput"] = "throughput.png"

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for name, by_size in peers["payload"].items():
        sizes = sorted(by_size, key=int)
        style = "-o" if name.startswith("spear") else "--s"
        ax.plot(
            [int(s) for s in sizes],
            [by_size[s]["median_us"] / 1e3 for s in sizes],
            style,
            label=name,
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("payload bytes (echoed back)")
    ax.set_ylabel("ms per call (log)")
    ax.set_title("Latency as the payload grows", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(FIGURES, "payload.png"), dpi=80, bbox_inches="tight")
    plt.close(fig)
    made["payload"] = "payload.png"

    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.4))
    for name, by_n in peers["instances"].items():
        ns = sorted(by_n, key=int)
        style = "-o" if name.startswith("spear") else "--s"
        xs = [int(n) for n in ns]
        left.plot(xs, [by_n[n]["start_s"] for n in ns], style, label=name)
        right.plot(xs, [by_n[n]["uss_mib"] for n in ns], style, label=name)
    for ax, label in ((left, "start seconds"), (right, "USS MiB, all processes")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("instances / workers")
        ax.set_ylabel(label)
    left.legend(fontsize=7)
    fig.suptitle("The cost of 1, 10 and 100 instances", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(FIGURES, "instances.png"), dpi=80, bbox_inches="tight")
    plt.close(fig)
    made["instances"] = "instances.png"
    return made


# -- the document ----------------------------------------------------------------------


def table(section: dict[str, Any], spear_key: str, unit: str) -> list[str]:
    scale = 1.0 if unit == "µs" else 1e3
    ours = section[spear_key]["median_us"]
    lines = [
        f"| path | median ({unit}) | p99 ({unit}) | n | x {spear_key} |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, figure in section.items():
        if "median_us" not in figure:
            continue
        lines.append(
            f"| {name} | {figure['median_us'] / scale:,.1f} | "
            f"{figure['p99_us'] / scale:,.1f} | {figure['n']} | "
            f"{figure['median_us'] / ours:.2f} |"
        )
    return lines


def check(value: float, target: float) -> str:
    verdict = "met" if value >= target else "NOT met"
    return f"{value:.2f}x (target ≥ {target:g}x: {verdict})"


def _get(data: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


# Every target an issue names that a component benchmark measures:
# (issue, what, benchmark, figure, kind, limit, unit). kind "max": the figure
# must be at most the limit; "min": at least.
ISSUE_TARGETS = [
    (
        2,
        "warm sync invoke / ProcessPoolExecutor",
        "bench_process",
        "ratios.warm_vs_process_pool",
        "max",
        0.5,
        "x",
    ),
    (
        2,
        "warm sync invoke / raw blocking Unix echo",
        "bench_process",
        "ratios.warm_vs_raw_echo",
        "max",
        3,
        "x",
    ),
    (
        2,
        "cold start / python -c pass",
        "bench_process",
        "ratios.cold_vs_python_start",
        "max",
        2,
        "x",
    ),
    (
        2,
        "agent idle RSS (MiB; 30 MB = 28.6 MiB)",
        "bench_process",
        "spear_agent_idle_rss_mib",
        "max",
        28.6,
        "",
    ),
    (
        3,
        "unix (sync, direct lane) / blocking echo",
        "bench_channels",
        "ratios.unix_sync_vs_blocking_echo",
        "max",
        3,
        "x",
    ),
    (
        3,
        "unix (async, on the loop) / blocking echo",
        "bench_channels",
        "ratios.unix_async_vs_blocking_echo",
        "max",
        3,
        "x",
    ),
    (
        3,
        "grpc / raw grpc.aio ping-pong, server in a second process",
        "bench_channels",
        "ratios.grpc_vs_raw_pingpong_two_processes",
        "max",
        1.5,
        "x",
    ),
    (
        3,
        "grpc / raw grpc.aio ping-pong, both ends in one process",
        "bench_channels",
        "ratios.grpc_vs_raw_pingpong_one_process",
        "max",
        1.5,
        "x",
    ),
    (
        3,
        "async API, 64 in flight on one unix channel (calls/s, pipelined)",
        "bench_channels",
        "throughput_64_pipelined_per_s",
        "min",
        30000,
        "",
    ),
    (
        4,
        "warm reactor, async API / direct wasmtime call (alloc, write, handle, read)",
        "bench_wasm",
        "ratios.async_vs_direct_whole_abi",
        "max",
        2,
        "x",
    ),
    (
        4,
        "warm reactor, async API / the handle export alone, payload already "
        "in memory (stricter than the issue's direct call)",
        "bench_wasm",
        "ratios.async_vs_direct_handle_only",
        "max",
        2,
        "x",
    ),
    (
        4,
        "cached module, first call (µs)",
        "bench_wasm",
        "cold_cached_first_call.median_us",
        "max",
        2000,
        "",
    ),
    (
        5,
        "pod warm invoke / process instance over grpc",
        "bench_kubernetes",
        "ratios.pod_warm_vs_process_grpc_warm",
        "max",
        1.2,
        "x",
    ),
]


def issue_targets(results: dict[str, Any]) -> list[str]:
    """The table of every target the issues name, from the component runs."""
    lines = [
        "| issue | target | figure | limit | |",
        "|---:|---|---:|---:|---|",
    ]
    for issue, what, bench, path, kind, limit, unit in ISSUE_TARGETS:
        value = _get(results.get(bench, {}), path)
        if not isinstance(value, (int, float)):
            lines.append(f"| {issue} | {what} | (not measured) | | |")
            continue
        met = value <= limit if kind == "max" else value >= limit
        sign = "≤" if kind == "max" else "≥"
        lines.append(
            f"| {issue} | {what} | {value:,.2f}{unit} | {sign} {limit:,g}{unit} | "
            f"{'met' if met else 'NOT met'} |"
        )
    return lines


def echo_note(results: dict[str, Any]) -> list[str]:
    """Say what the blocking echo, the baseline of the unix ratios, measured in
    each benchmark of this run: a slow echo makes a ratio look better."""
    here = _get(results.get("bench_process", {}), "raw_unix_echo.median_us")
    there = _get(results.get("bench_channels", {}), "raw_blocking_unix_echo.median_us")
    if not isinstance(here, (int, float)) or not isinstance(there, (int, float)):
        return []
    line = (
        f"The raw blocking echo measured {here:,.0f} µs in `bench_process` and "
        f"{there:,.0f} µs in `bench_channels` in this run."
    )
    if max(here, there) > 1.5 * min(here, there):
        line += (
            " The slower one most likely had its two processes on two CPUs, where "
            "each message wakes a halted CPU: the ratios against it look better "
            "than they are."
        )
    return ["", line]


def document(results: dict[str, Any], figures: dict[str, str]) -> str:
    peers = results["peers"]
    m = results["machine"]
    warm, cold = peers["warm"], peers["cold"]
    c = cold[COLD_SPEAR]["median_us"]
    dask_cold = cold["dask.distributed"]["median_us"]
    dask_import = cold["import distributed (new python)"]["median_us"]
    load = results["load_start"]
    lines = [
        "# Performance",
        "",
        "Written by `python benchmarks/run_all.py` (do not edit by hand; run it "
        "again). Every figure is a median with its p99, measured in one run on one "
        "machine; compare ratios, not absolute times, across runs.",
        "",
        f"- run: {results['date']}, {m['cpus']} CPUs ({m['cpu']}), "
        f"{m['memory_gib']} GiB, Python {m['python']}, {m['os']}",
        f"- load average (1, 5, 15 min) at the start: "
        f"{load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}; at the end: "
        + ", ".join(f"{x:.2f}" for x in results["load_end"])
        + " (the benchmarks' own processes count in the second figure; each "
        "benchmark starts once everything the one before it started is gone)",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        "",
        "## Targets",
        "",
        "| target | spear_nb | peer | ratio |",
        "|---|---:|---:|---|",
    ]
    threaded = peers["warm_threaded"]
    for peer, target, block in (
        ("ProcessPoolExecutor", 2, warm),
        ("dask.distributed", 20, threaded),
        ("ipyparallel", 20, threaded),
    ):
        p = block[peer]["median_us"]
        ours = block[WARM_SPEAR]["median_us"]
        lines.append(
            f"| warm invoke vs {peer} | {ours:,.0f} µs | {p:,.0f} µs | "
            f"{check(p / ours, target)} |"
        )
    lines.append(
        f"| cold start of a process instance vs a dask LocalCluster | "
        f"{c / 1e3:,.1f} ms | {dask_cold / 1e3:,.0f} ms | {check(dask_cold / c, 5)}; "
        f"{(dask_cold + dask_import) / c:.0f}x with `import distributed` |"
    )
    on_loop = warm.get("spear process/unix (async, on the session loop)")
    lines += [
        "",
        "The other targets the issues name, from the component benchmarks below "
        "(same run):",
        "",
        *issue_targets(results),
        *echo_note(results),
        "",
        f"Warm invoke is `Session.invoke` (the blocking facade, which talks to an "
        f"idle instance over its direct lane, without crossing to the session's "
        f"loop) on a warm process instance over its Unix "
        f"socket. The same call awaited on the session's loop takes "
        f"{on_loop['median_us']:,.0f} µs"
        + (
            f" ({warm['ProcessPoolExecutor']['median_us'] / on_loop['median_us']:.1f}x"
            " faster than ProcessPoolExecutor): the path of `ainvoke`, `submit` "
            "and `map`."
            if on_loop
            else "."
        ),
        "",
        "The ratios to the raw blocking echo depend on where the kernel puts the "
        "two processes. The echo is fastest when both ends share one CPU (nothing "
        "has to wake a halted CPU), about 10-15 µs here. A direct call is fastest "
        "with its two ends on two CPUs, both polling (23-35 µs on this machine). "
        "The kernel wakes a socket's reader on the writer's CPU, which puts the "
        "two together from time to time, where a call took 50-120 µs; so the "
        "instance moves itself off the CPU its polling caller says it runs on "
        "(every 8th call says).",
        "",
        "## Warm invoke",
        "",
        "One call in flight; every path timed in interleaved rounds so that all "
        "see the same load. Trivial function `inc(x) = x + 1` (the WASM path: "
        "the `upper` sample on 1 byte).",
        "",
        *table(warm, WARM_SPEAR, "µs"),
        "",
        "dask.distributed and ipyparallel in a second block: their clients keep "
        "threads running in the measuring process (dask's scheduler runs there), "
        "which slows every path timed beside them, spear_nb's default path "
        "included (timed again here, interleaved with them):",
        "",
        *table(threaded, WARM_SPEAR, "µs"),
        "",
        f"![warm invoke](performance/{figures['warm']})",
        "",
        "## Cold start",
        "",
        "Create -> first result. spear_nb process instances fork from the "
        "session's warm zygote; `spawn` starts a new interpreter. Peers: a new "
        "ProcessPoolExecutor (fork), `LocalCluster(processes=True)` + `Client`, "
        "`ipyparallel.Cluster(n=1)`, each with one worker and their modules "
        "already imported (import times listed separately, in a new Python).",
        "",
        *table(cold, COLD_SPEAR, "ms"),
        "",
        f"![cold start](performance/{figures['cold']})",
        "",
        "## Throughput with 1, 8 and 64 calls in flight",
        "",
        "Two workers or instances each. spear_nb: `Session.map(..., "
        "max_in_flight=k)` on 2 instances with `max_concurrency=32, pipeline=True`.",
        "",
        "| system | 1 in flight | 8 in flight | 64 in flight |",
        "|---|---:|---:|---:|",
    ]
    spear_tp = next(v for k, v in peers["throughput"].items() if k.startswith("spear"))
    for name, by_k in peers["throughput"].items():
        cells = []
        for k in ("1", "8", "64"):
            rate = by_k[k]["median_per_s"]
            mark = ""
            if not name.startswith("spear"):
                mark = f" ({spear_tp[k]['median_per_s'] / rate:.1f}x less)"
            cells.append(f"{rate:,.0f}/s{mark}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "(median of 3 runs, one system at a time; 'x less' is spear_nb's rate "
        "divided by the peer's)",
        "",
        f"![throughput](performance/{figures['throughput']})",
        "",
        "## Latency as the payload grows",
        "",
        "An echo of random bytes; ms per call, median (p99).",
        "",
    ]
    sizes = sorted(next(iter(peers["payload"].values())), key=int)
    lines.append("| path | " + " | ".join(_bytes(int(s)) for s in sizes) + " |")
    lines.append("|---|" + "---:|" * len(sizes))
    for block, suffix in (
        (peers["payload"], ""),
        (peers["payload_threaded"], " (dask, ipyparallel block)"),
    ):
        for name, by_size in block.items():
            cells = [
                f"{by_size[s]['median_us'] / 1e3:,.2f} "
                f"({by_size[s]['p99_us'] / 1e3:,.1f})"
                for s in sizes
            ]
            label = name + (suffix if name.startswith("spear") else "")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"![payload](performance/{figures['payload']})",
        "",
        "## The cost of 1, 10 and 100 instances",
        "",
        "Start: create -> every instance or worker ready (spear_nb: a new session "
        "and `scale(n)`; ProcessPoolExecutor: n calls at once so that n workers "
        "start). Memory: USS (not shared) and RSS summed over every process the "
        "system started (spear_nb: instances, zygote, watchdog). dask and "
        "ipyparallel are not run with 100 workers on this machine.",
        "",
        "| system | n | start (s) | USS (MiB) | RSS (MiB) | processes |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, by_n in peers["instances"].items():
        for n, f in sorted(by_n.items(), key=lambda kv: int(kv[0])):
            lines.append(
                f"| {name} | {n} | {f['start_s']:.2f} | {f['uss_mib']:,.0f} | "
                f"{f['rss_mib']:,.0f} | {f['processes']} |"
            )
    lines += [
        "",
        f"![instances](performance/{figures['instances']})",
        "",
        "## Component benchmarks",
        "",
        "Run by the same command, each in a new Python; all numbers are in "
        "`docs/performance/results.json`.",
        "",
    ]
    lines += components(results)
    return "\n".join(lines) + "\n"


def _bytes(n: int) -> str:
    if n >= 2**20:
        return f"{n >> 20} MiB"
    if n >= 2**10:
        return f"{n >> 10} KiB"
    return f"{n} B"


def components(results: dict[str, Any]) -> list[str]:
    lines = []
    for name in COMPONENTS:
        data = results.get(name, {})
        lines.append(f"**{name}** ({data.get('seconds', 0):.0f} s)")
        lines.append("")
        if "error" in data:
            lines.append("failed: " + " / ".join(data["error"]))
            lines.append("")
            continue
        figures = {
            k: v for k, v in data.items() if isinstance(v, dict) and "median_us" in v
        }
        if figures:
            lines += ["| path | median (µs) | p99 (µs) |", "|---|---:|---:|"]
            for k, v in figures.items():
                lines.append(f"| {k} | {v['median_us']:,.0f} | {v['p99_us']:,.0f} |")
        scalars = {
            k: v
            for k, v in _flatten(data).items()
            if k not in figures and not k.startswith(tuple(figures)) and k != "seconds"
        }
        if scalars:
            lines.append("")
            lines.append(
                "; ".join(
                    f"{k}: {v:,.2f}" if isinstance(v, float) else f"{k}: {v}"
                    for k, v in scalars.items()
                )
            )
        lines.append("")
    return lines


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}."))
        elif isinstance(v, (int, float, str)):
            out[key] = v
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few samples: a check")
    parser.add_argument("--max-load", type=float, default=0.0)
    parser.add_argument("--patience", type=float, default=600.0)
    parser.add_argument("--from-json", default="")
    parser.add_argument("--out", default=os.path.join(DOCS, "performance.md"))
    args = parser.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            results = json.load(f)
    else:
        if args.max_load:
            wait_for_quiet(args.max_load, args.patience)
        results = measure(args.quick)
        os.makedirs(FIGURES, exist_ok=True)
        with open(os.path.join(FIGURES, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    if "error" in results["peers"]:
        sys.exit("bench_peers failed: " + " / ".join(results["peers"]["error"]))
    text = document(results, plots(results))
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
