"""The kubelet of the local API server: runs each pod's containers as processes.

One supervisor thread per pod schedules it, "pulls" its images and starts one
thread per container; a container thread starts the process, probes readiness,
waits for the exit and applies the restart policy. Every change is written to the
pod's status through the store, so watches see it as a MODIFIED event.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Any

from spear_nb.testing._kubestore import Pod, Store, now_rfc3339

logger = logging.getLogger(__name__)

POD_IP = "127.0.0.1"
NODE_NAME = "spear-nb-local"
# What an image runs when the pod gives no command: the CMD of the Dockerfile.
DEFAULT_IMAGE_CMD = ("python", "-m", "spear_nb.agent")
DEFAULT_IMAGE_ENV = {"PYTHONUNBUFFERED": "1"}
# Host variables a local "container" keeps, so that programs can run at all.
PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ", "SYSTEMROOT")
PROBE_LIMIT = 0.05  # the longest pause between two readiness probes, in seconds
CRASH_BACKOFF = 10.0
MAX_BACKOFF = 300.0
UNSCHEDULABLE = (
    "0/1 nodes are available: 1 node(s) had untolerated taint "
    "{spear-nb/unschedulable: }. preemption: 0/1 nodes are available."
)
_PYTHON = re.compile(r"^python(3(\.\d+)?)?$")
_PACKAGE_ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)


@dataclasses.dataclass(eq=False)
class Container:
    """One container of a pod and the process that runs it now."""

    name: str
    image: str
    argv: list[str]
    env: dict[str, str]
    cwd: str
    probe_port: int | None
    log_path: str
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    ready: bool = False
    started_at: str = ""
    state: dict[str, Any] = dataclasses.field(
        default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}}
    )
    last_state: dict[str, Any] = dataclasses.field(default_factory=dict)
    thread: threading.Thread | None = None

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "image": self.image,
            "imageID": "",
            "containerID": f"local://{self.process.pid}" if self.process else "",
            "ready": self.ready,
            "started": "running" in self.state,
            "restartCount": self.restarts,
            "state": self.state,
            "lastState": self.last_state,
        }


@dataclasses.dataclass(eq=False)
class PodRun:
    """What the kubelet knows of one pod."""

    namespace: str
    name: str
    restart_policy: str
    containers: list[Container]
    deleting: threading.Event = dataclasses.field(default_factory=threading.Event)
    finished: threading.Event = dataclasses.field(default_factory=threading.Event)
    scheduled: bool = False
    unschedulable: bool = False
    started_at: str = ""
    supervisor: threading.Thread | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def processes(self) -> list[subprocess.Popen[bytes]]:
        return [
            c.process
            for c in self.containers
            if c.process is not None and c.process.poll() is None
        ]


class Kubelet:
    """Runs the pods of the store as local process groups."""

    def __init__(
        self,
        store: Store,
        directory: str,
        images: dict[str, list[str]],
        unpullable: set[str],
    ) -> None:
        self.store = store
        self.directory = directory
        self.images = images
        self.unpullable = unpullable
        self.unschedulable = False
        self.runs: dict[tuple[str, str], PodRun] = {}
        self._lock = threading.Lock()

    # -- admission ---------------------------------------------------------------

    def admit(self, pod: Pod) -> None:
        """Start running a pod the API server has just stored."""
        meta, spec = pod["metadata"], pod["spec"]
        containers = [
            self._container(pod, c, index) for index, c in enumerate(spec["containers"])
        ]
        run = PodRun(
            meta["namespace"],
            meta["name"],
            spec.get("restartPolicy", "Always"),
            containers,
        )
        with self._lock:
            self.runs[run.key] = run
        run.supervisor = threading.Thread(
            target=self._supervise,
            args=(run,),
            name=f"spear_nb-kubelet-{run.name}",
            daemon=True,
        )
        run.supervisor.start()

    def _container(self, pod: Pod, spec: dict[str, Any], index: int) -> Container:
        image = spec["image"]
        command = list(spec.get("command") or [])
        args = list(spec.get("args") or [])
        argv = (
            command + args
            if command
            else args or list(self.images.get(image, DEFAULT_IMAGE_CMD))
        )
        env = self._environment(pod, spec)
        argv = [_expand(a, env) for a in argv]
        if argv and _PYTHON.match(argv[0]):
            argv[0] = sys.executable  # the image's python is this one
        probe = spec.get("readinessProbe", {}).get("tcpSocket", {}).get("port")
        if probe is None:
            ports = spec.get("ports") or []
            probe = ports[0].get("containerPort") if ports else None
        meta = pod["metadata"]
        log_path = os.path.join(
            self.directory, f"{meta['namespace']}_{meta['name']}_{spec['name']}.log"
        )
        workdir = spec.get("workingDir") or ""
        if not workdir or not os.path.isdir(workdir):
            workdir = self.directory
        return Container(
            spec["name"],
            image,
            argv,
            env,
            workdir,
            probe if isinstance(probe, int) else None,
            log_path,
        )

    def _environment(self, pod: Pod, spec: dict[str, Any]) -> dict[str, str]:
        """The host basics, the image's env, then the container's env in order."""
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        env.update(DEFAULT_IMAGE_ENV)
        env["HOSTNAME"] = pod["metadata"]["name"]
        for item in spec.get("env") or []:
            name = item.get("name", "")
            if "value" in item:
                env[name] = _expand(str(item["value"]), env)
            elif "valueFrom" in item:
                path = item["valueFrom"].get("fieldRef", {}).get("fieldPath", "")
                env[name] = _field(pod, path)
        paths = [_PACKAGE_ROOT]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)  # spear_nb is "in the image"
        return env

    # -- the pod's life ----------------------------------------------------------

    def _supervise(self, run: PodRun) -> None:
        try:
            if not self._schedule(run):
                return
            for container in run.containers:
                if container.image in self.unpullable:
                    self._pull_fails(run, container)
                    return
            run.started_at = now_rfc3339()
            for container in run.containers:
                container.thread = threading.Thread(
                    target=self._run_container,
                    args=(run, container),
                    name=f"spear_nb-kubelet-{run.name}-{container.name}",
                    daemon=True,
                )
                container.thread.start()
            for container in run.containers:
                assert container.thread is not None
                container.thread.join()
            run.deleting.wait()  # a finished pod stays until it is deleted
        except Exception:
            logger.exception("the local kubelet failed on pod %s", run.name)
        finally:
            self._kill(run, signal.SIGKILL)
            for container in run.containers:
                if container.thread is not None:
                    container.thread.join(timeout=10)
            self._remove(run)

    def _schedule(self, run: PodRun) -> bool:
        """Wait while the node is unschedulable; False if deleted meanwhile."""
        with self.store.cond:
            while self.unschedulable and not run.deleting.is_set():
                if not run.unschedulable:
                    run.unschedulable = True
                    self._publish_locked(run)
                self.store.cond.wait()
            if run.deleting.is_set():
                return False
            run.scheduled = True
            run.unschedulable = False
            self._publish_locked(run)
        return True

    def _pull_fails(self, run: PodRun, container: Container) -> None:
        image = container.image
        container.state = {
            "waiting": {
                "reason": "ErrImagePull",
                "message": f'failed to pull and unpack image "{image}": not found '
                "(LocalKubeAPI was told this image cannot be pulled)",
            }
        }
        self._publish(run)
        if run.deleting.wait(0.05):
            return
        container.state = {
            "waiting": {
                "reason": "ImagePullBackOff",
                "message": f'Back-off pulling image "{image}"',
            }
        }
        self._publish(run)
        run.deleting.wait()

    def _run_container(self, run: PodRun, container: Container) -> None:
        while not run.deleting.is_set():
            code = self._run_once(run, container)
            if run.deleting.is_set() or code is None:
                return
            policy = run.restart_policy
            if policy == "Never" or (policy == "OnFailure" and code == 0):
                return
            container.restarts += 1
            container.last_state = container.state
            if container.restarts >= 2:
                delay = min(CRASH_BACKOFF * 2 ** (container.restarts - 2), MAX_BACKOFF)
                container.state = {
                    "waiting": {
                        "reason": "CrashLoopBackOff",
                        "message": f"back-off {delay:g}s restarting failed "
                        f"container={container.name} pod={run.name}",
                    }
                }
                self._publish(run)
                if run.deleting.wait(delay):
                    return

    def _run_once(self, run: PodRun, container: Container) -> int | None:
        """Run the container's process once; its exit code, None if never started."""
        try:
            with open(container.log_path, "ab") as log:
                process = self._start(container, log)
        except OSError as exc:
            container.state = {
                "terminated": {
                    "exitCode": 128,
                    "reason": "StartError",
                    "message": f"failed to start {container.argv[:1]}: {exc}",
                    "finishedAt": now_rfc3339(),
                }
            }
            self._publish(run)
            return 128
        container.process = process
        if run.deleting.is_set():
            # Deleted while the process was starting: delete() saw no process
            # to stop, so stop it here (it set the flag before it looked).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        container.started_at = now_rfc3339()
        container.state = {"running": {"startedAt": container.started_at}}
        container.ready = container.probe_port is None
        self._publish(run)
        if container.probe_port is not None and self._probe(run, container, process):
            container.ready = True
            self._publish(run)
        raw = process.wait()
        code = raw if raw >= 0 else 128 - raw
        terminated: dict[str, Any] = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": container.started_at,
            "finishedAt": now_rfc3339(),
        }
        if raw < 0:
            terminated["signal"] = -raw
        container.ready = False
        container.state = {"terminated": terminated}
        self._publish(run)
        return code

    def _start(self, container: Container, log: IO[bytes]) -> subprocess.Popen[bytes]:
        if not container.argv:
            raise OSError("the container has no command and its image none")
        return subprocess.Popen(
            container.argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=container.env,
            cwd=container.cwd,
            start_new_session=True,
        )

    def _probe(
        self, run: PodRun, container: Container, process: subprocess.Popen[bytes]
    ) -> bool:
        """Probe the container's port until it accepts a connection."""
        port = container.probe_port
        assert port is not None
        pause = 0.002
        while process.poll() is None and not run.deleting.is_set():
            try:
                with socket.create_connection((POD_IP, port), 1.0):
                    return True
            except OSError:
                run.deleting.wait(pause)
                pause = min(pause * 2, PROBE_LIMIT)
        return False

    # -- status ------------------------------------------------------------------

    def _publish(self, run: PodRun) -> None:
        with self.store.cond:
            self._publish_locked(run)

    def _publish_locked(self, run: PodRun) -> None:
        pod = self.store.pods.get(run.key)
        if pod is None:
            return
        pod["status"] = self._status(run, pod)
        self.store.record("MODIFIED", pod)

    def _status(self, run: PodRun, pod: Pod) -> dict[str, Any]:
        status: dict[str, Any] = {
            "phase": "Pending",
            "qosClass": pod["status"].get("qosClass", "BestEffort"),
        }
        stamp = now_rfc3339()
        if run.unschedulable:
            status["conditions"] = [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": UNSCHEDULABLE,
                    "lastTransitionTime": stamp,
                }
            ]
            return status
        if not run.scheduled:
            return status
        pod["spec"]["nodeName"] = NODE_NAME
        containers = run.containers
        status.update(
            {
                "hostIP": POD_IP,
                "podIP": POD_IP,
                "podIPs": [{"ip": POD_IP}],
                "containerStatuses": [c.status() for c in containers],
            }
        )
        if run.started_at:
            status["startTime"] = run.started_at
        states = [next(iter(c.state)) for c in containers]
        restarting = run.restart_policy == "Always" or (
            run.restart_policy == "OnFailure"
            and any(
                c.state.get("terminated", {}).get("exitCode", 0) != 0
                for c in containers
            )
        )
        if all(s == "terminated" for s in states) and not restarting:
            codes = [c.state["terminated"]["exitCode"] for c in containers]
            status["phase"] = "Succeeded" if not any(codes) else "Failed"
        elif "running" in states or any(c.restarts for c in containers):
            status["phase"] = "Running"
        ready = all(c.ready for c in containers)
        flag = "True" if ready else "False"
        status["conditions"] = [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": stamp},
            {"type": "Initialized", "status": "True", "lastTransitionTime": stamp},
            {"type": "ContainersReady", "status": flag, "lastTransitionTime": stamp},
            {"type": "Ready", "status": flag, "lastTransitionTime": stamp},
        ]
        return status

    # -- deletion ----------------------------------------------------------------

    def delete(self, key: tuple[str, str], grace: float) -> None:
        """Stop a pod: SIGTERM, then SIGKILL after ``grace`` seconds.

        With a grace of 0 the pod is killed and removed before this returns.
        """
        with self._lock:
            run = self.runs.get(key)
        if run is None:
            return
        run.deleting.set()
        with self.store.cond:
            self.store.cond.notify_all()  # wake a pod waiting to be scheduled
        if grace <= 0 or not run.processes():
            # Like a forced deletion: the object goes first, the processes after
            # (here before the API answers, so that nothing outlives the call).
            self._remove(run, finished=False)
            self._kill(run, signal.SIGKILL)
            run.finished.wait(timeout=10)
            return
        self._kill(run, signal.SIGTERM)
        threading.Thread(
            target=self._kill_after,
            args=(run, grace),
            name=f"spear_nb-kubelet-{run.name}-grace",
            daemon=True,
        ).start()

    def _kill_after(self, run: PodRun, grace: float) -> None:
        if not run.finished.wait(grace):
            self._kill(run, signal.SIGKILL)

    def _kill(self, run: PodRun, sig: signal.Signals) -> None:
        for process in run.processes():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, sig)

    def _remove(self, run: PodRun, finished: bool = True) -> None:
        with self.store.cond:
            pod = self.store.pods.get(run.key)
            if pod is not None and self.runs.get(run.key) is run:
                del self.store.pods[run.key]
                self.store.record("DELETED", pod)
        if not finished:
            return
        with self._lock:
            if self.runs.get(run.key) is run:
                del self.runs[run.key]
        run.finished.set()

    def stop(self) -> None:
        """Kill every pod process and wait for the supervisors to end."""
        with self._lock:
            runs = list(self.runs.values())
        for run in runs:
            run.deleting.set()
            self._kill(run, signal.SIGKILL)
        with self.store.cond:
            self.store.cond.notify_all()
        deadline = time.monotonic() + 10
        for run in runs:
            if run.supervisor is not None:
                run.supervisor.join(max(0.0, deadline - time.monotonic()))

    def pids(self) -> list[int]:
        """The process ids of every container process alive now."""
        with self._lock:
            runs = list(self.runs.values())
        return [p.pid for run in runs for p in run.processes()]


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` references to earlier variables; ``$$`` escapes."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", replace, text)


def _field(pod: Pod, path: str) -> str:
    values = {
        "metadata.name": pod["metadata"].get("name", ""),
        "metadata.namespace": pod["metadata"].get("namespace", ""),
        "metadata.uid": pod["metadata"].get("uid", ""),
        "spec.nodeName": NODE_NAME,
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
        "status.podIP": POD_IP,
        "status.hostIP": POD_IP,
    }
    return values.get(path, "")
