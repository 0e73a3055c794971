"""A tiny guardian process that cleans up after a session whose host died.

The session starts it with a pipe on its stdin and tells it, one line at a time,
what to clean up: ``pgid N`` (a process group), ``forget N``, ``path P`` (a
directory to remove), ``pod NAMESPACE NAME KUBECONFIG`` and ``unpod NAMESPACE
NAME``. ``bye`` means the session cleaned up itself. End of file without ``bye``
means the host died (a SIGKILL, a kernel restart): the watchdog then kills every
process group, deletes every pod and removes every path it was told about.

It imports only the standard library so that it starts quickly and cannot fail on
a half-installed environment.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys


def _kill_groups(groups: set[int]) -> None:
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


def _delete_pods(pods: dict[tuple[str, str], str]) -> None:
    if not pods:
        return
    try:
        from kubernetes import client, config
    except ImportError:
        return
    for (namespace, name), kubeconfig in pods.items():
        files = kubeconfig.split(os.pathsep)
        try:
            if not any(os.path.exists(f) for f in files):
                # A test double's, say, gone with the API server it named.
                raise FileNotFoundError(f"its kubeconfig {files[0]} is gone")
            api = client.CoreV1Api(
                api_client=config.new_client_from_config(config_file=kubeconfig)
            )
            api.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
        except Exception as exc:  # best effort: the host is gone, nobody to tell
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            print(
                f"spear_nb watchdog: could not delete pod {name} in namespace "
                f"{namespace} ({reason[:200]}); delete it with: kubectl delete pod "
                f"-n {namespace} {name}",
                file=sys.stderr,
            )


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    groups: set[int] = set()
    paths: list[str] = []
    pods: dict[tuple[str, str], str] = {}
    for raw in sys.stdin:
        words = raw.split()
        if not words:
            continue
        command, args = words[0], words[1:]
        if command == "bye":
            return 0
        if command == "pgid" and args:
            groups.add(int(args[0]))
        elif command == "forget" and args:
            groups.discard(int(args[0]))
        elif command == "path" and args:
            paths.append(" ".join(args))
        elif command == "pod" and len(args) >= 3:
            pods[(args[0], args[1])] = " ".join(args[2:])
        elif command == "unpod" and len(args) >= 2:
            pods.pop((args[0], args[1]), None)
    _kill_groups(groups)
    _delete_pods(pods)
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
