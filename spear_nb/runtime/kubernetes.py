"""The Kubernetes runtime: each instance is a pod, reached over gRPC.

A pod runs the agent (``python -m spear_nb.agent``) in a container image that has
spear_nb installed (see the Dockerfile at the root of the repository). The agent
serves gRPC on the pod's port; the host creates the pod through the API server,
watches it until it is Running and Ready, then dials the pod IP (or a local
port-forward through the API server, ``Session(kube_port_forward=True)``), sends
the instance secret and the function, and keeps the stream for every call.

The ``kubernetes`` client is synchronous: every call to it runs in a small thread
pool owned by the runtime, and one watcher thread per session follows the pods
(list, then watch from the list's resource version; list again after 410 Gone, a
watch timeout or an error) and hands their changes to the session's loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import msgpack

from spear_nb.communication.channel import Channel
from spear_nb.communication.protocol import Message, MessageType
from spear_nb.errors import (
    ChannelError,
    ClusterError,
    InstanceCrashed,
    InstanceStartFailed,
    InvalidSpec,
    SpearError,
    describe,
)
from spear_nb.execution.model import (
    ArtifactKind,
    ArtifactSpec,
    Execution,
    InstanceStatus,
    InvokeFunctionRequest,
    RuntimeType,
    TaskInstance,
)
from spear_nb.execution.spec import KUBERNETES_OPTIONS, unknown_keywords
from spear_nb.runtime._agentcall import call_agent
from spear_nb.runtime._kube import (
    GONE_WAIT,
    REQUEST_TIMEOUT,
    Cluster,
    PodWatcher,
    PortForward,
    api_error,
    delete_call,
    in_thread,
    list_call,
    load_cluster,
    log_call,
    pod_problem,
    pod_ready,
    pod_status_text,
)
from spear_nb.runtime.base import Runtime, RuntimeContext

logger = logging.getLogger(__name__)

T = TypeVar("T")

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_SESSION = "spear-nb/session"
LABEL_TASK = "spear-nb/task"
LABEL_INSTANCE = "spear-nb/instance"
CONTAINER = "agent"
AGENT_COMMAND = ("python", "-m", "spear_nb.agent")
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
LOG_TAIL_LINES = 200
CLIENT_THREADS = 4


def pod_name(session_id: str, instance_id: str) -> str:
    """The pod name of an instance: ``spear-<session>-<instance>``, DNS-safe."""
    text = re.sub(r"[^a-z0-9-]+", "-", f"spear-{session_id}-{instance_id}".lower())
    return re.sub(r"-+", "-", text).strip("-")[:57].rstrip("-")


def label_value(text: str) -> str:
    """``text`` made into a valid label value (63 characters, alphanumeric ends)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:63]
    return cleaned.strip("-_.")


@dataclasses.dataclass(eq=False)
class PodHandle:
    """The pod of an instance and what the host knows of it."""

    instance: TaskInstance
    name: str
    namespace: str
    port: int
    image: str
    ready: asyncio.Future[None]
    failed: asyncio.Future[str]
    gone: asyncio.Future[None]
    uid: str = ""
    created: bool = False
    stopping: bool = False
    phase: str = ""
    status: str = "not created"
    pod_ip: str = ""
    node: str = ""
    address: str = ""
    forward: PortForward | None = None
    logs: str = ""
    logs_at: float | None = None


def _future(loop: asyncio.AbstractEventLoop) -> asyncio.Future[Any]:
    future: asyncio.Future[Any] = loop.create_future()
    # A failure nobody awaited is reported elsewhere; do not log it at exit.
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
    return future


class KubernetesRuntime(Runtime):
    """Runs instances as pods through the Kubernetes API."""

    type = RuntimeType.KUBERNETES

    def __init__(self, context: RuntimeContext) -> None:
        super().__init__(context)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            CLIENT_THREADS, thread_name_prefix="spear_nb-kube"
        )
        self._cluster: Cluster | None = None
        self._cluster_lock = asyncio.Lock()
        self._pods: dict[str, PodHandle] = {}
        self._watcher: PodWatcher | None = None
        self._background: set[asyncio.Task[Any]] = set()
        # Pods of this session carry this label; the sweep at close relies on it.
        self.session_label = label_value(f"{context.session_id}-{secrets.token_hex(3)}")
        self._closed = False
        self.forward_lock = threading.Lock()  # portforward patches its ApiClient

    # -- registration ------------------------------------------------------------

    def validate(self, spec: ArtifactSpec) -> None:
        # Only look: importing the client takes half a second, done in a thread.
        if importlib.util.find_spec("kubernetes") is None:
            raise InvalidSpec(
                "the kubernetes runtime needs the kubernetes client: "
                "pip install 'spear_nb[kubernetes]'"
            )
        options = dict(spec.options)
        unknown = sorted(set(options) - KUBERNETES_OPTIONS)
        if unknown:
            raise unknown_keywords(unknown, "kubernetes", sorted(KUBERNETES_OPTIONS))
        if spec.kind not in (
            ArtifactKind.CALLABLE,
            ArtifactKind.HANDLER,
            ArtifactKind.IMAGE,
        ):
            raise InvalidSpec(
                f"the kubernetes runtime runs Python callables, handlers and "
                f"images, not a {spec.kind.value}"
            )
        if spec.kind is ArtifactKind.HANDLER and ":" not in spec.target:
            raise InvalidSpec(
                f"a handler is 'package.module:function', got {spec.target!r}"
            )
        if not _image(spec):
            raise InvalidSpec(
                "a function on the kubernetes runtime needs image=: a container "
                "image with spear_nb installed (build one from the Dockerfile)"
            )
        if spec.channel not in ("", "grpc"):
            raise InvalidSpec(
                f"pods are reached over gRPC; channel={spec.channel!r} is not "
                "available on the kubernetes runtime"
            )
        _check_options(options)

    # -- the cluster -------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking client call in the runtime's threads."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    async def _api(self, action: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Call the API in a thread; return the JSON body; translate its errors."""
        cluster = self._cluster
        assert cluster is not None

        def call() -> Any:
            response = fn(
                *args, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
            )
            try:
                data = response.data
            finally:
                response.release_conn()
            if isinstance(data, bytes) and data[:1] in (b"{", b"["):
                return json.loads(data)
            return data

        try:
            return await self._run(call)
        except Exception as exc:
            raise api_error(exc, action, cluster) from exc

    async def _ensure_cluster(self) -> Cluster:
        if self._cluster is not None:
            return self._cluster
        async with self._cluster_lock:
            if self._cluster is None:
                cluster = await self._run(
                    load_cluster, self.context.config, self.context.workdir
                )
                self._cluster = cluster
                loop = asyncio.get_running_loop()
                self._watcher = PodWatcher(
                    cluster,
                    loop,
                    f"{LABEL_SESSION}={self.session_label}",
                    self.on_pod,
                    self.on_listed,
                )
                self._watcher.start()
                logger.info(
                    "kubernetes runtime: namespace %s on %s (%s)",
                    cluster.namespace,
                    cluster.server,
                    cluster.source,
                )
        assert self._cluster is not None
        return self._cluster

    # -- start -------------------------------------------------------------------

    async def start_instance(self, instance: TaskInstance) -> None:
        spec = instance.task.artifact.spec
        cluster = await self._ensure_cluster()
        loop = asyncio.get_running_loop()
        timeout = instance.task.settings.start_timeout
        deadline = loop.time() + timeout
        handle = PodHandle(
            instance,
            pod_name(self.context.session_id, instance.instance_id),
            cluster.namespace,
            int(spec.option("port") or 0) or free_port(),
            _image(spec),
            _future(loop),
            _future(loop),
            _future(loop),
        )
        instance.handle = handle
        instance.channel_type = "grpc"
        try:
            await self._create_pod(handle, spec)
            await self._until_ready(handle, deadline, timeout)
            channel = await self._connect(handle, spec, deadline, timeout)
        except SpearError as exc:
            error = await self._start_failure(handle, exc)
            await self._discard(handle)
            if error is exc:
                raise
            raise error from exc
        except asyncio.CancelledError:
            self._spawn(self._discard(handle))
            raise
        channel.on_lost(
            lambda lost: self.context.on_instance_lost(
                instance, f"its channel was lost: {lost.close_reason}"
            )
        )

    async def _create_pod(self, handle: PodHandle, spec: ArtifactSpec) -> None:
        cluster = self._cluster
        assert cluster is not None
        base = handle.name
        for _ in range(5):
            manifest = self._manifest(handle, spec)
            self._pods[handle.name] = handle
            try:
                created = await self._api(
                    f"create pod {handle.name}",
                    cluster.core.create_namespaced_pod,
                    handle.namespace,
                    manifest,
                )
            except ClusterError as exc:
                del self._pods[handle.name]
                if exc.status != 409:
                    raise
                taken = handle.name
                handle.name = f"{base}-{secrets.token_hex(3)[:5]}"
                logger.warning("pod %s already exists; using %s", taken, handle.name)
                self.context.events.note(
                    "pod_renamed",
                    f"{taken} already exists; creating {handle.name}",
                    instance_id=handle.instance.instance_id,
                )
                continue
            handle.created = True
            if cluster.watchdog_config:
                self.context.watchdog.tell(
                    f"pod {handle.namespace} {handle.name} {cluster.watchdog_config}"
                )
            self.context.events.note(
                "pod_created",
                f"{handle.namespace}/{handle.name} image {handle.image}",
                instance_id=handle.instance.instance_id,
                task_id=handle.instance.task.task_id,
            )
            self.on_pod("ADDED", created)
            return
        raise ClusterError(
            f"could not find a free pod name for instance "
            f"{handle.instance.instance_id} after 5 tries (last: {handle.name})",
            409,
            "AlreadyExists",
        )

    def _manifest(self, handle: PodHandle, spec: ArtifactSpec) -> dict[str, Any]:
        """The pod: the template if one was given, filled in with the agent."""
        instance = handle.instance
        task = instance.task
        config = self.context.config
        pod: dict[str, Any] = copy.deepcopy(spec.option("pod_template") or {})
        pod["apiVersion"] = "v1"
        pod["kind"] = "Pod"
        meta = pod.setdefault("metadata", {})
        meta.pop("generateName", None)
        meta["name"] = handle.name
        meta["namespace"] = handle.namespace
        labels = meta.setdefault("labels", {})
        labels.update(dict(spec.option("labels") or {}))
        labels.update(
            {
                LABEL_MANAGED_BY: "spear_nb",
                LABEL_SESSION: self.session_label,
                LABEL_TASK: label_value(task.task_id),
                LABEL_INSTANCE: label_value(instance.instance_id),
            }
        )
        annotations = meta.setdefault("annotations", {})
        annotations.update(dict(spec.option("annotations") or {}))
        annotations.update(
            {
                "spear-nb/session": self.context.session_id,
                "spear-nb/task": task.task_id,
                "spear-nb/instance": instance.instance_id,
                "spear-nb/artifact": task.artifact.artifact_id,
                "spear-nb/host": socket.gethostname(),
            }
        )
        body = pod.setdefault("spec", {})
        body.setdefault("restartPolicy", "Never")
        body.setdefault("terminationGracePeriodSeconds", _grace(config.stop_grace))
        body.setdefault("automountServiceAccountToken", False)
        body.setdefault("enableServiceLinks", False)
        containers = body.setdefault("containers", [])
        container = next((c for c in containers if c.get("name") == CONTAINER), None)
        if container is None:
            container = {"name": CONTAINER}
            containers.insert(0, container)
        container["image"] = handle.image
        if spec.option("image_pull_policy"):
            container["imagePullPolicy"] = spec.option("image_pull_policy")
        if spec.kind is not ArtifactKind.IMAGE:
            container.setdefault("command", list(AGENT_COMMAND))
        if spec.cwd:
            container["workingDir"] = spec.cwd
        ours = {
            "SPEAR_INSTANCE_ID": instance.instance_id,
            # Only a digest: anyone who may read the pod may read its spec.
            "SPEAR_SECRET_SHA256": hashlib.sha256(instance.secret.encode()).hexdigest(),
            "SPEAR_GRPC_ADDRESS": f"0.0.0.0:{handle.port}",
            "SPEAR_HEARTBEAT": str(config.heartbeat_interval),
            "SPEAR_MAX_FRAME": str(config.max_frame_size),
            "SPEAR_CONCURRENCY": str(instance.capacity),
            "PYTHONUNBUFFERED": "1",
            **dict(spec.env),
        }
        env = [e for e in container.get("env") or [] if e.get("name") not in ours]
        env.extend({"name": k, "value": v} for k, v in ours.items())
        container["env"] = env
        ports = [p for p in container.get("ports") or [] if p.get("name") != "grpc"]
        ports.insert(0, {"name": "grpc", "containerPort": handle.port})
        container["ports"] = ports
        container.setdefault(
            "readinessProbe",
            {"tcpSocket": {"port": handle.port}, "periodSeconds": 1},
        )
        resources = _resources(dict(spec.options))
        if resources:
            container["resources"] = resources
        return pod

    async def _until_ready(
        self, handle: PodHandle, deadline: float, timeout: float
    ) -> None:
        """Wait until the pod is Running and Ready, fails, or the time is up."""
        loop = asyncio.get_running_loop()
        waiters: set[asyncio.Future[Any]] = {handle.ready, handle.failed}
        await asyncio.wait(
            waiters,
            timeout=max(0.0, deadline - loop.time()),
            return_when=asyncio.FIRST_COMPLETED,
        )
        if handle.failed.done():
            raise InstanceStartFailed(f"pod {handle.name} {handle.failed.result()}")
        if handle.ready.done():
            return
        watcher = self._watcher
        trouble = ""
        if watcher is not None and watcher.error:
            trouble = f"; the pod watch is failing: {watcher.error}"
        raise InstanceStartFailed(
            f"pod {handle.name} was not Running and Ready within the start timeout "
            f"of {timeout:g} s (last seen: {handle.status}){trouble}; it was deleted"
        )

    async def _connect(
        self, handle: PodHandle, spec: ArtifactSpec, deadline: float, timeout: float
    ) -> Channel:
        """Dial the agent's gRPC server, authenticate, wait for its function."""
        from spear_nb.communication.grpc_channel import GrpcChannel

        instance = handle.instance
        loop = asyncio.get_running_loop()
        cluster = self._cluster
        assert cluster is not None
        if self.context.config.kube_port_forward:
            handle.forward = PortForward(
                cluster,
                handle.name,
                handle.namespace,
                handle.port,
                self._run,
                self.forward_lock,
            )
            handle.address = await handle.forward.start()
        else:
            host = handle.pod_ip
            handle.address = (
                f"[{host}]:{handle.port}" if ":" in host else (f"{host}:{handle.port}")
            )
        channel = GrpcChannel(
            instance.instance_id, handle.address, self.context.config.max_frame_size
        )
        dialing = loop.create_task(
            channel.connect(
                instance.secret, _bootstrap(spec), max(0.001, deadline - loop.time())
            )
        )
        waiters: set[asyncio.Future[Any]] = {dialing, handle.failed}
        await asyncio.wait(
            waiters,
            timeout=max(0.0, deadline - loop.time()),
            return_when=asyncio.FIRST_COMPLETED,
        )
        if not dialing.done() or dialing.exception() is not None:
            dialing.cancel()
            with contextlib.suppress(BaseException):
                await dialing
            if handle.failed.done():
                raise InstanceStartFailed(f"pod {handle.name} {handle.failed.result()}")
            reason = (
                describe(dialing.exception())  # type: ignore[arg-type]
                if dialing.done() and not dialing.cancelled()
                else f"no answer within {timeout:g} s"
            )
            hint = ""
            if not self.context.config.kube_port_forward:
                hint = (
                    "; if this session runs outside the cluster, pod IPs are not "
                    "reachable: use Session(kube_port_forward=True)"
                )
            raise InstanceStartFailed(
                f"pod {handle.name} is ready but its agent at {handle.address} could "
                f"not be reached over gRPC: {reason}{hint}"
            )
        self.context.factory.adopt(instance.instance_id, channel)
        ready = channel.expect_ready()
        waiters = {ready, handle.failed}
        await asyncio.wait(
            waiters,
            timeout=max(0.0, deadline - loop.time()),
            return_when=asyncio.FIRST_COMPLETED,
        )
        if ready.done():
            ready.result()  # raises RemoteError if the function did not load
            return channel
        if handle.failed.done():
            raise InstanceStartFailed(f"pod {handle.name} {handle.failed.result()}")
        raise InstanceStartFailed(
            f"the agent in pod {handle.name} did not load its function within "
            f"{timeout:g} s"
        )

    async def _start_failure(self, handle: PodHandle, exc: SpearError) -> SpearError:
        """The error to raise, with the end of the pod's log when it has one."""
        if isinstance(exc, ClusterError):
            return exc
        detail = str(exc)
        if not isinstance(exc, InstanceStartFailed):
            detail = (
                f"instance {handle.instance.instance_id} (pod {handle.name}) "
                f"could not start: {detail}"
            )
        if handle.created and handle.phase and handle.phase != "Pending":
            tail = await self._fetch_logs(handle, 40)
            if tail.strip():
                detail += f"\n--- the pod's log ends with ---\n{tail.rstrip()}"
        if isinstance(exc, InstanceStartFailed):
            exc.args = (detail,)
            return exc
        return InstanceStartFailed(detail)

    # -- pod events (on the loop) ------------------------------------------------

    def on_pod(self, kind: str, pod: dict[str, Any]) -> None:
        """A pod of this session was added, changed or deleted."""
        meta = pod.get("metadata") or {}
        handle = self._pods.get(meta.get("name", ""))
        if handle is None:
            return
        uid = meta.get("uid", "")
        if handle.uid and uid and uid != handle.uid:
            return  # an older pod of the same name
        handle.uid = handle.uid or uid
        if kind == "DELETED":
            self._gone(handle, "was deleted")
            return
        status = pod.get("status") or {}
        handle.phase = status.get("phase", "") or handle.phase
        handle.pod_ip = status.get("podIP") or handle.pod_ip
        handle.node = (pod.get("spec") or {}).get("nodeName") or handle.node
        handle.status = pod_status_text(pod)
        if handle.stopping:
            return
        problem = pod_problem(pod)
        if problem:
            self._fail(handle, problem)
        elif pod_ready(pod) and not handle.ready.done():
            handle.ready.set_result(None)

    def on_listed(self, names: set[str]) -> None:
        """A fresh list: pods we created that it lacks may have been deleted."""
        for handle in list(self._pods.values()):
            if handle.created and not handle.gone.done() and handle.name not in names:
                self._spawn(self._confirm_gone(handle))

    async def _confirm_gone(self, handle: PodHandle) -> None:
        cluster = self._cluster
        assert cluster is not None
        try:
            await self._api(
                f"read pod {handle.name}",
                cluster.core.read_namespaced_pod,
                handle.name,
                handle.namespace,
            )
        except ClusterError as exc:
            if exc.status == 404:
                self._gone(handle, "was deleted")

    def _fail(self, handle: PodHandle, reason: str) -> None:
        if not handle.failed.done():
            handle.failed.set_result(reason)
        instance = handle.instance
        if instance.status is InstanceStatus.READY and not handle.stopping:
            self.context.on_instance_lost(instance, f"pod {handle.name} {reason}")

    def _gone(self, handle: PodHandle, reason: str) -> None:
        handle.status = "deleted"
        if not handle.gone.done():
            handle.gone.set_result(None)
        if not handle.stopping:
            self._fail(handle, reason)
        if self._pods.get(handle.name) is handle:
            del self._pods[handle.name]
        cluster = self._cluster
        if cluster is not None and cluster.watchdog_config:
            self.context.watchdog.tell(f"unpod {handle.namespace} {handle.name}")

    # -- execute -----------------------------------------------------------------

    async def execute(
        self,
        instance: TaskInstance,
        channel: Channel | None,
        request: InvokeFunctionRequest,
        execution: Execution,
        timeout: float,
    ) -> Any:
        assert channel is not None

        def give_up(reason: str) -> None:
            self.context.on_instance_lost(instance, reason)

        async def explain(exc: ChannelError) -> SpearError:
            return self._lost_during_call(instance, exc)

        return await call_agent(
            instance,
            channel,
            request,
            execution,
            timeout,
            self.context.config.stop_grace,
            explain,
            give_up,
        )

    def _lost_during_call(
        self, instance: TaskInstance, exc: ChannelError
    ) -> SpearError:
        handle = instance.handle
        if isinstance(handle, PodHandle) and handle.failed.done():
            return InstanceCrashed(
                f"instance {instance.instance_id}: pod {handle.name} "
                f"{handle.failed.result()} during the call; the next call gets a "
                "new instance"
            )
        return exc

    # -- stop --------------------------------------------------------------------

    async def stop_instance(self, instance: TaskInstance) -> None:
        handle = instance.handle
        factory = self.context.factory
        if not isinstance(handle, PodHandle):
            factory.release(instance.instance_id)
            return
        handle.stopping = True
        channel = factory.pooled(instance.instance_id)
        if channel is not None and channel.connected:
            with contextlib.suppress(ChannelError):
                channel.send(Message(MessageType.CLOSE, 0))
        factory.release(instance.instance_id)
        try:
            await self._delete(handle, _grace(self.context.config.stop_grace))
        except SpearError as exc:
            logger.warning("could not delete pod %s: %s", handle.name, exc)
        finally:
            if handle.forward is not None:
                await handle.forward.close()

    async def _discard(self, handle: PodHandle) -> None:
        """Delete the pod of an instance that failed to start; never raise."""
        handle.stopping = True
        self.context.factory.release(handle.instance.instance_id)
        try:
            await self._delete(handle, 0)
        except SpearError as exc:
            logger.warning("could not delete pod %s: %s", handle.name, exc)
        finally:
            if handle.forward is not None:
                await handle.forward.close()

    async def _delete(self, handle: PodHandle, grace: int) -> None:
        """Delete the pod and wait until the API server no longer has it."""
        cluster = self._cluster
        if cluster is None or not handle.created or handle.gone.done():
            return
        try:
            await self._api(
                f"delete pod {handle.name}",
                delete_call(cluster.core, grace),
                handle.name,
                handle.namespace,
            )
        except ClusterError as exc:
            if exc.status != 404:
                raise
            self._gone(handle, "was deleted")
            return
        self.context.events.note(
            "pod_deleted",
            f"{handle.namespace}/{handle.name} grace {grace} s",
            instance_id=handle.instance.instance_id,
        )
        try:
            await asyncio.wait_for(asyncio.shield(handle.gone), grace + GONE_WAIT)
        except asyncio.TimeoutError:
            logger.warning(
                "pod %s is still there %g s after it was deleted",
                handle.name,
                grace + GONE_WAIT,
            )

    # -- health and display ------------------------------------------------------

    async def health_check(self, instance: TaskInstance) -> bool:
        handle = instance.handle
        if not isinstance(handle, PodHandle) or handle.failed.done():
            return False
        channel = self.context.factory.pooled(instance.instance_id)
        return channel is not None and channel.connected

    def describe_instance(self, instance: TaskInstance) -> dict[str, Any]:
        return {"pid": None}

    def inspect_instance(self, instance: TaskInstance) -> dict[str, Any]:
        handle = instance.handle
        if not isinstance(handle, PodHandle):
            return {}
        info: dict[str, Any] = {
            "pod": handle.name,
            "namespace": handle.namespace,
            "pod_status": handle.status,
            "pod_ip": handle.pod_ip,
            "node": handle.node,
            "image": handle.image,
            "port": handle.port,
            "address": handle.address,
        }
        if handle.failed.done():
            info["pod_failure"] = handle.failed.result()
        info["log_tail"] = handle.logs
        return info

    async def refresh_instance(self, instance: TaskInstance) -> None:
        """Fetch the pod's log for ``Session.inspect``."""
        handle = instance.handle
        if isinstance(handle, PodHandle) and not handle.gone.done():
            await self._fetch_logs(handle, LOG_TAIL_LINES)

    async def _fetch_logs(self, handle: PodHandle, lines: int) -> str:
        """The last lines of the pod's log (kept on the handle); '' on failure."""
        cluster = self._cluster
        if cluster is None or not handle.created:
            return handle.logs
        try:
            text = await self._api(
                f"read the log of pod {handle.name}",
                log_call(cluster.core, CONTAINER, lines),
                handle.name,
                handle.namespace,
            )
        except ClusterError as exc:
            logger.debug("no log for pod %s: %s", handle.name, exc)
            return handle.logs
        handle.logs = (
            text.decode("utf-8", "replace") if isinstance(text, bytes) else (str(text))
        )
        handle.logs_at = time.time()
        return handle.logs

    # -- close -------------------------------------------------------------------

    async def close(self) -> None:
        """Delete every pod of this session still on the cluster, then let go."""
        if self._closed:
            return
        self._closed = True
        cluster = self._cluster
        try:
            if cluster is not None:
                await self._sweep(cluster)
        finally:
            if self._background:
                await asyncio.wait(list(self._background), timeout=GONE_WAIT)
            watcher, self._watcher = self._watcher, None
            if watcher is not None:
                await self._run(watcher.stop)
            for handle in list(self._pods.values()):
                if handle.forward is not None:
                    await handle.forward.close()
            await in_thread(self._release, cluster)

    def _release(self, cluster: Cluster | None) -> None:
        """Close the clients and the threads (blocking, so not on the loop)."""
        if cluster is not None:
            cluster.api_client.close()
            cluster.forward_client.close()
        self._pool.shutdown(wait=True)

    async def _sweep(self, cluster: Cluster) -> None:
        """Delete the pods carrying this session's label (after errors too)."""
        selector = f"{LABEL_SESSION}={self.session_label}"
        try:
            listed = await self._api(
                f"list the pods of session {self.context.session_id}",
                list_call(cluster.core, selector),
                cluster.namespace,
            )
        except ClusterError as exc:
            logger.warning("could not list this session's pods to delete them: %s", exc)
            return
        names = [p["metadata"]["name"] for p in listed.get("items", [])]
        if names:
            logger.info("deleting %d pod(s) left by this session", len(names))
        await asyncio.gather(
            *(self._sweep_one(cluster, name) for name in names),
            return_exceptions=True,
        )

    async def _sweep_one(self, cluster: Cluster, name: str) -> None:
        handle = self._pods.get(name)
        if handle is not None:
            handle.stopping = True
            with contextlib.suppress(SpearError):
                await self._delete(handle, 0)
            return
        with contextlib.suppress(ClusterError):
            await self._api(
                f"delete pod {name}",
                delete_call(cluster.core, 0),
                name,
                cluster.namespace,
            )
        if cluster.watchdog_config:
            self.context.watchdog.tell(f"unpod {cluster.namespace} {name}")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


# -- helpers -------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nobody listens on now.

    Pods of a real cluster each have their own network namespace and could all use
    one fixed port (``register(..., port=...)``); the local API server runs every
    pod on 127.0.0.1, so each instance gets a port of its own.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _image(spec: ArtifactSpec) -> str:
    if spec.kind is ArtifactKind.IMAGE:
        return spec.target
    return str(spec.option("image") or "")


def _bootstrap(spec: ArtifactSpec) -> bytes:
    if spec.kind is ArtifactKind.CALLABLE:
        body: dict[str, Any] = {"kind": "callable", "code": spec.code}
    elif spec.kind is ArtifactKind.HANDLER:
        body = {"kind": "handler", "target": spec.target}
    else:
        body = {"kind": "script"}  # the image's own program calls serve(fn)
    return msgpack.packb(body, use_bin_type=True)


def _grace(seconds: float) -> int:
    return max(1, math.ceil(seconds))


def _check_options(options: dict[str, Any]) -> None:
    policy = options.get("image_pull_policy")
    if policy is not None and policy not in PULL_POLICIES:
        raise InvalidSpec(
            f"image_pull_policy must be one of {', '.join(PULL_POLICIES)}, "
            f"got {policy!r}"
        )
    for key in ("cpu", "memory", "cpu_limit", "memory_limit"):
        value = options.get(key)
        if value is not None and not isinstance(value, (str, int, float)):
            raise InvalidSpec(f"{key} must be a quantity like '500m' or '1Gi'")
    for key in ("resources", "pod_template", "labels", "annotations"):
        value = options.get(key)
        if value is not None and not isinstance(value, dict):
            raise InvalidSpec(f"{key} must be a dict, got {type(value).__name__}")
    port = options.get("port")
    if port is not None and (not isinstance(port, int) or not 0 < port < 65536):
        raise InvalidSpec(f"port must be a TCP port number, got {port!r}")
    template = options.get("pod_template") or {}
    try:
        json.dumps(template)
    except (TypeError, ValueError) as exc:
        raise InvalidSpec(f"pod_template must be plain JSON data: {exc}") from exc


def _resources(options: dict[str, Any]) -> dict[str, Any]:
    if options.get("resources") is not None:
        return dict(options["resources"])
    requests = {
        k: str(options[o])
        for k, o in (("cpu", "cpu"), ("memory", "memory"))
        if options.get(o) is not None
    }
    limits = {
        k: str(options[o])
        for k, o in (("cpu", "cpu_limit"), ("memory", "memory_limit"))
        if options.get(o) is not None
    }
    resources: dict[str, Any] = {}
    if requests:
        resources["requests"] = requests
    if limits:
        resources["limits"] = limits
    return resources
