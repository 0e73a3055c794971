"""Pods on the local API server next to processes over gRPC, in one run.

    python benchmarks/bench_kubernetes.py [--calls N] [--rounds R] [--json PATH]

Measures, on this machine and in this one run:
- the first result of the first pod of a session (it includes loading the
  ``kubernetes`` client and the first list and watch);
- pod create -> first result with the client loaded: the instance is stopped,
  then one call creates a pod, waits for Running and Ready, dials the agent's
  gRPC server and runs the call;
- the same cold start for a process instance with ``channel="grpc"``;
- warm invoke of a trivial function on a pod (gRPC to 127.0.0.1) and on a
  process instance over gRPC, measured in alternating rounds so that drift on a
  shared machine hits both alike; the ratio of the medians is the figure the
  Kubernetes runtime is held to (warm within 1.2x: the pod path adds nothing to
  the hot path).

The pods of ``LocalKubeAPI`` are local processes: the cold figures show the cost
of the API round trips and the watch, not of scheduling or pulling images.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from _timing import durations, summarize

import spear_nb
from spear_nb.testing import LocalKubeAPI

IMAGE = "spear-nb-agent:latest"


def inc(x: int) -> int:
    return x + 1


def cold(session: spear_nb.Session, name: str, n: int) -> list[float]:
    """Stop the function's instances, then time the call that starts a new one."""
    samples = []
    for i in range(n):
        session.scale(name, 0)
        start = time.perf_counter()
        session.invoke(name, i)
        samples.append(time.perf_counter() - start)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500, help="warm calls per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--cold", type=int, default=10, help="cold starts of each")
    parser.add_argument("--json", default="")
    args = parser.parse_args()

    results: dict[str, Any] = {}
    with LocalKubeAPI() as kube, spear_nb.Session(kubeconfig=kube.kubeconfig) as s:
        s.register("pod", inc, image=IMAGE)
        s.register("proc", inc, channel="grpc")

        start = time.perf_counter()
        s.invoke("pod", 0)
        results["pod_first_of_session"] = summarize([time.perf_counter() - start])
        s.invoke("proc", 0)

        results["pod_create_to_first_result"] = summarize(cold(s, "pod", args.cold))
        results["process_grpc_cold"] = summarize(cold(s, "proc", args.cold))

        for name in ("pod", "proc"):  # warm up both instances
            durations(lambda name=name: s.invoke(name, 1), 200)
        pod: list[float] = []
        proc: list[float] = []
        for _ in range(args.rounds):
            pod += durations(lambda: s.invoke("pod", 1), args.calls)
            proc += durations(lambda: s.invoke("proc", 1), args.calls)
        results["pod_warm_grpc"] = summarize(pod)
        results["process_warm_grpc"] = summarize(proc)

    pod_median = results["pod_warm_grpc"]["median_us"]
    ratio = pod_median / results["process_warm_grpc"]["median_us"]
    results["ratios"] = {"pod_warm_vs_process_grpc_warm": ratio}

    print(f"{'path':<30}{'median':>12}{'p99':>12}{'n':>7}")
    for key, value in results.items():
        if key == "ratios":
            continue
        median, p99 = value["median_us"], value["p99_us"]
        if median > 10_000:
            line = f"{median / 1e3:>10.1f}ms{p99 / 1e3:>10.1f}ms"
        else:
            line = f"{median:>10.0f}us{p99:>10.0f}us"
        print(f"{key:<30}{line}{value['n']:>7}")
    verdict = "within" if ratio <= 1.2 else "outside"
    print(f"warm pod / warm process (grpc): {ratio:.2f}x ({verdict} the 1.2x target)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
