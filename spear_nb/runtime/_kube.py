"""The ``kubernetes`` client side of the Kubernetes runtime.

Loading the configuration, translating the client's errors into spear_nb's, the
watcher thread that follows a session's pods, port-forwarding through the API
server, and reading a pod's status in the cluster's own words. Everything that
blocks runs in threads; the results are handed to the session's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from spear_nb.config import SessionConfig
from spear_nb.errors import (
    ClusterError,
    ConfigurationError,
    SpearError,
    describe,
    did_you_mean,
)

logger = logging.getLogger(__name__)

# Waiting reasons after which a container will not start without a change.
FATAL_WAITING = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CrashLoopBackOff",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)
WATCH_SECONDS = 300  # the server ends each watch after this; the watcher re-lists
REQUEST_TIMEOUT = (5.0, 30.0)  # connect and read timeouts of ordinary API calls
GONE_WAIT = 30.0  # how long stop and close wait for a deleted pod to disappear


@dataclasses.dataclass
class Cluster:
    """The API client of a session and what was chosen with it."""

    api_client: Any
    core: Any  # kubernetes.client.CoreV1Api
    namespace: str
    server: str
    source: str  # where the configuration came from, for messages
    watchdog_config: str  # a kubeconfig the watchdog can use; "" if none
    forward_client: Any  # a second ApiClient, only for port-forward streams


class PodWatcher:
    """One thread that lists and watches this session's pods.

    Each round lists the pods (giving a resource version), then watches from that
    version until the server ends the watch; after 410 Gone, a timeout or an error
    it lists again. Every change is handed to ``on_pod`` on the session's loop.
    """

    def __init__(
        self,
        cluster: Cluster,
        loop: asyncio.AbstractEventLoop,
        selector: str,
        on_pod: Callable[[str, dict[str, Any]], None],
        on_listed: Callable[[set[str]], None],
    ) -> None:
        self.cluster = cluster
        self.loop = loop
        self.selector = selector
        self.on_pod = on_pod
        self.on_listed = on_listed
        self.error = ""  # the last failure, while the watch is failing
        self.lists = 0
        self.expired = 0  # 410 Gone answers
        self._stopping = threading.Event()
        self._watch: Any = None
        self._thread = threading.Thread(
            target=self._run, name="spear_nb-kube-watch", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the watch and wait for the thread (called from a pool thread)."""
        self._stopping.set()
        for _ in range(100):
            watch = self._watch
            if watch is not None:
                watch.stop()
            self._thread.join(0.05)
            if not self._thread.is_alive():
                return
        logger.warning("the pod watch thread did not stop")

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed
            self.loop.call_soon_threadsafe(fn, *args)

    def _run(self) -> None:
        from kubernetes.client.exceptions import ApiException

        pause = 0.1
        while not self._stopping.is_set():
            try:
                version = self._list()
                self.error = ""
                pause = 0.1
                self._follow(version)
            except ApiException as exc:
                if self._stopping.is_set():
                    return
                if exc.status == 410:
                    self.expired += 1
                    logger.info("the pod watch expired (410 Gone); listing again")
                    continue
                self._failed(api_error(exc, "watch pods", self.cluster))
            except Exception as exc:
                if self._stopping.is_set():
                    return
                self._failed(api_error(exc, "watch pods", self.cluster))
            else:
                logger.debug("the pod watch ended; listing again")
                continue
            if self._stopping.wait(pause):
                return
            pause = min(pause * 2, 5.0)

    def _failed(self, error: SpearError) -> None:
        if not self.error:
            logger.warning("the pod watch failed, retrying: %s", error)
        self.error = str(error)

    def _list(self) -> str:
        response = self.cluster.core.list_namespaced_pod(
            self.cluster.namespace,
            label_selector=self.selector,
            _preload_content=False,
            _request_timeout=REQUEST_TIMEOUT,
        )
        try:
            listed = json.loads(response.data)
        finally:
            response.release_conn()
        self.lists += 1
        items = listed.get("items") or []
        for pod in items:
            self._post(self.on_pod, "MODIFIED", pod)
        self._post(self.on_listed, {p["metadata"]["name"] for p in items})
        return str(listed["metadata"]["resourceVersion"])

    def _follow(self, version: str) -> None:
        from kubernetes import watch

        self._watch = stream = watch.Watch()
        if self._stopping.is_set():
            return
        try:
            for event in stream.stream(
                self.cluster.core.list_namespaced_pod,
                self.cluster.namespace,
                label_selector=self.selector,
                resource_version=version,
                timeout_seconds=WATCH_SECONDS,
                _request_timeout=(REQUEST_TIMEOUT[0], WATCH_SECONDS + 30),
            ):
                if self._stopping.is_set():
                    return
                kind = event.get("type")
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self._post(self.on_pod, kind, event["raw_object"])
        finally:
            self._watch = None


class PortForward:
    """A loopback listener whose connections reach a pod port via the API server.

    Each accepted connection opens one port-forward stream (the client's
    ``portforward``, a WebSocket to the API server) and the bytes are relayed both
    ways on the session's loop.
    """

    def __init__(
        self,
        cluster: Cluster,
        name: str,
        namespace: str,
        port: int,
        run: Callable[[Callable[[], socket.socket]], Awaitable[socket.socket]],
        lock: threading.Lock,
    ) -> None:
        self.cluster = cluster
        self.name = name
        self.namespace = namespace
        self.port = port
        self._run = run
        self._lock = lock  # portforward patches its ApiClient for a moment
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._writers.add(writer)
        try:
            sock = await self._open()
        except SpearError as exc:
            logger.warning("port-forward to pod %s failed: %s", self.name, exc)
            self._writers.discard(writer)
            writer.close()
            return
        pod_reader, pod_writer = await asyncio.open_connection(sock=sock)
        self._writers.add(pod_writer)
        try:
            await asyncio.gather(relay(reader, pod_writer), relay(pod_reader, writer))
        finally:
            for w in (writer, pod_writer):
                self._writers.discard(w)
                w.close()

    async def _open(self) -> socket.socket:
        cluster = self.cluster
        core = type(cluster.core)(cluster.forward_client)

        def connect() -> socket.socket:
            from kubernetes.stream import portforward

            with self._lock:
                forward = portforward(
                    core.connect_get_namespaced_pod_portforward,
                    self.name,
                    self.namespace,
                    ports=str(self.port),
                )
            end = forward.socket(self.port)
            # Our own descriptor: asyncio wants a plain socket object.
            sock = socket.socket(fileno=os.dup(end.fileno()))
            end.close()
            sock.setblocking(False)
            return sock

        try:
            return await self._run(connect)
        except Exception as exc:
            raise api_error(exc, f"port-forward to pod {self.name}", cluster) from exc

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for writer in list(self._writers):
            writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5)


async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(1 << 16)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()


def api_error(exc: BaseException, action: str, cluster: Cluster) -> SpearError:
    """Translate an error of the kubernetes client or urllib3 into ours."""
    if isinstance(exc, SpearError):
        return exc
    status = getattr(exc, "status", None)
    if isinstance(status, int) and status and hasattr(exc, "body"):
        message, reason, details = _status_fields(exc)
        ns = cluster.namespace
        if status == 403:
            text = (
                f"cannot {action}: the cluster forbids it (403 Forbidden: {message}). "
                f"The account of this session needs RBAC permission to create, get, "
                f"list, watch and delete pods (and pods/log, pods/portforward) in "
                f"namespace {ns!r}"
            )
        elif status == 401:
            text = (
                f"cannot {action}: the cluster did not accept the credentials of "
                f"{cluster.source} (401 Unauthorized)"
            )
        elif status == 404 and details.get("kind") == "namespaces":
            text = (
                f"cannot {action}: namespace {ns!r} does not exist on the cluster at "
                f"{cluster.server} (404 NotFound); create it or choose another with "
                "Session(kube_namespace=...)"
            )
        else:
            text = f"cannot {action}: {status} {reason}: {message}"
        return ClusterError(text, status, reason)
    if status == 0 and hasattr(exc, "reason"):  # the websocket layer's failures
        return ClusterError(f"cannot {action}: {getattr(exc, 'reason', exc)}", 0, "")
    return ClusterError(
        f"cannot {action}: the Kubernetes API server at {cluster.server} cannot be "
        f"reached ({describe(exc)})",
        0,
        "Unreachable",
    )


def _status_fields(exc: BaseException) -> tuple[str, str, dict[str, Any]]:
    """Message, reason and details of the Status body of an ApiException."""
    reason = str(getattr(exc, "reason", "") or "")
    body = getattr(exc, "body", None)
    try:
        parsed = json.loads(body) if body else {}
    except (TypeError, ValueError):
        parsed = {}
    if not isinstance(parsed, dict):
        parsed = {}
    message = str(parsed.get("message") or body or reason)
    return message, str(parsed.get("reason") or reason), parsed.get("details") or {}


def pod_ready(pod: dict[str, Any]) -> bool:
    status = pod.get("status") or {}
    if status.get("phase") != "Running" or not status.get("podIP"):
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )


def pod_problem(pod: dict[str, Any]) -> str:
    """Why a pod will not (or no longer) serve, in the cluster's words; '' if none."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    phase = status.get("phase", "")
    statuses = status.get("containerStatuses") or []
    if phase in ("Succeeded", "Failed"):
        text = f"ended ({phase})"
        for cs in statuses:
            ended = (cs.get("state") or {}).get("terminated")
            if ended:
                text += f": container {cs.get('name')} {_terminated(ended)}"
                break
        if status.get("reason"):
            text += f"; {status['reason']}: {status.get('message', '')}".rstrip(": ")
        return text
    for cs in statuses:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason", "")
        if reason in FATAL_WAITING:
            text = f"cannot run container {cs.get('name')}: {reason}"
            if waiting.get("message"):
                text += f": {waiting['message']}"
            last = (cs.get("lastState") or {}).get("terminated")
            if last:
                text += (
                    f" (it {_terminated(last)}, restarted "
                    f"{cs.get('restartCount', 0)} times)"
                )
            return text
    for condition in status.get("conditions") or []:
        if (
            condition.get("type") == "PodScheduled"
            and condition.get("status") == "False"
            and condition.get("reason") == "Unschedulable"
        ):
            return f"is Unschedulable: {condition.get('message', '')}".rstrip(": ")
    if meta.get("deletionTimestamp"):
        return "is being deleted"
    return ""


def _terminated(state: dict[str, Any]) -> str:
    text = f"terminated with exit code {state.get('exitCode')}"
    if state.get("reason"):
        text += f" ({state['reason']})"
    if state.get("signal"):
        text += f", signal {state['signal']}"
    if state.get("message"):
        text += f": {state['message']}"
    return text


def pod_status_text(pod: dict[str, Any]) -> str:
    """A short description like ``Running, Ready`` or ``Pending (ErrImagePull)``."""
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    reasons = []
    for cs in status.get("containerStatuses") or []:
        state = cs.get("state") or {}
        for kind in ("waiting", "terminated"):
            if state.get(kind, {}).get("reason"):
                reasons.append(state[kind]["reason"])
    for condition in status.get("conditions") or []:
        if condition.get("status") == "False" and condition.get("reason"):
            reasons.append(condition["reason"])
    if pod_ready(pod):
        return "Running, Ready"
    text = phase + (f" ({', '.join(dict.fromkeys(reasons))})" if reasons else "")
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        text += ", terminating"
    return text


def _context_namespace(path: str, context: str) -> str:
    from kubernetes import config as kube_config

    contexts, active = kube_config.list_kube_config_contexts(config_file=path)
    chosen = next((c for c in contexts if c.get("name") == context), active)
    return str(((chosen or {}).get("context") or {}).get("namespace") or "default")


def _incluster_namespace() -> str:
    path = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    try:
        with open(path) as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"


def delete_call(core: Any, grace: int) -> Callable[..., Any]:
    def call(name: str, namespace: str, **kwargs: Any) -> Any:
        return core.delete_namespaced_pod(
            name, namespace, grace_period_seconds=grace, **kwargs
        )

    return call


def log_call(core: Any, container: str, lines: int) -> Callable[..., Any]:
    def call(name: str, namespace: str, **kwargs: Any) -> Any:
        return core.read_namespaced_pod_log(
            name, namespace, container=container, tail_lines=lines, **kwargs
        )

    return call


def list_call(core: Any, selector: str) -> Callable[..., Any]:
    def call(namespace: str, **kwargs: Any) -> Any:
        return core.list_namespaced_pod(namespace, label_selector=selector, **kwargs)

    return call


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def in_thread(fn: Callable[..., None], *args: Any) -> None:
    """Run ``fn`` in a thread of its own and wait for it without blocking."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def run() -> None:
        try:
            fn(*args)
        finally:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, done)

    threading.Thread(target=run, name="spear_nb-kube-close", daemon=True).start()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(done), GONE_WAIT)


def kubeconfig_path(cfg: SessionConfig) -> str:
    """The kubeconfig the session uses: its setting, $KUBECONFIG or
    ~/.kube/config if there is one; "" if none."""
    path = cfg.kubeconfig or os.environ.get("KUBECONFIG", "")
    default = os.path.expanduser("~/.kube/config")
    if not path and os.path.exists(default):
        path = default
    return path


def check_kube_settings(cfg: SessionConfig) -> None:
    """Refuse, when the session is made, a kubeconfig that is not there or a
    context it does not have (reading the file only, without the network)."""
    if cfg.kubeconfig:
        for part in cfg.kubeconfig.split(os.pathsep):
            if part and not os.path.exists(os.path.expanduser(part)):
                raise ConfigurationError(
                    f"the kubeconfig {part!r} does not exist; pass the path of a "
                    "kubeconfig file, or leave kubeconfig unset to use $KUBECONFIG "
                    "or ~/.kube/config"
                )
    path = kubeconfig_path(cfg)
    if cfg.kube_context and not path:
        raise ConfigurationError(
            f"kube_context={cfg.kube_context!r} names a context of a kubeconfig, "
            "and none was found: pass kubeconfig='path' or set KUBECONFIG"
        )
    if path:
        check_context(path, cfg.kube_context)


def check_context(path: str, context: str) -> None:
    """Read the kubeconfig at ``path``; refuse it if it cannot be read, or if it
    does not define ``context`` (when one is named)."""
    try:
        from kubernetes import config as kube_config
    except ImportError:
        raise ConfigurationError(
            "kubeconfig= and kube_context= are settings of the kubernetes runtime, "
            "which needs the kubernetes client: pip install 'spear_nb[kubernetes]'"
        ) from None
    try:
        contexts, _ = kube_config.list_kube_config_contexts(config_file=path)
    except Exception as exc:  # the client and its YAML parser raise many types
        text = " ".join(str(exc).split())  # YAML errors span several lines
        raise ConfigurationError(f"cannot read the kubeconfig {path}: {text}") from exc
    names = [str(c.get("name")) for c in contexts or []]
    if context and context not in names:
        raise ConfigurationError(
            f"the kubeconfig {path} has no context {context!r}"
            f"{did_you_mean(context, names)}; its contexts: "
            + (", ".join(names) or "none")
        )


def load_cluster(cfg: SessionConfig, workdir: str) -> Cluster:
    """Load the configuration the usual way (in a thread: it may run a plugin)."""
    from kubernetes import client
    from kubernetes import config as kube_config

    configuration = client.Configuration()
    path = kubeconfig_path(cfg)
    try:
        if path:  # Session() has read it already (check_kube_settings)
            kube_config.load_kube_config(
                config_file=path,
                context=cfg.kube_context or None,
                client_configuration=configuration,
                persist_config=False,
            )
            namespace = cfg.kube_namespace or _context_namespace(path, cfg.kube_context)
            source = f"kubeconfig {path}" + (
                f", context {cfg.kube_context}" if cfg.kube_context else ""
            )
            watchdog = _watchdog_kubeconfig(path, cfg.kube_context, workdir)
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            kube_config.load_incluster_config(client_configuration=configuration)
            namespace = cfg.kube_namespace or _incluster_namespace()
            source = "in-cluster service account"
            watchdog = _incluster_kubeconfig(configuration.host, workdir)
        else:
            raise ConfigurationError(
                "no Kubernetes configuration found: pass "
                "Session(kubeconfig='path'), set KUBECONFIG, or run the session "
                "inside a cluster"
            )
    except ConfigurationError:
        raise
    except Exception as exc:  # ConfigException, and its YAML parser's errors
        text = " ".join(str(exc).split())
        raise ConfigurationError(
            f"cannot load the Kubernetes configuration"
            f"{' from ' + path if path else ''}: {text}"
        ) from exc
    api_client = client.ApiClient(configuration=configuration)
    forward_client = client.ApiClient(configuration=configuration)
    return Cluster(
        api_client,
        client.CoreV1Api(api_client),
        namespace,
        configuration.host,
        source,
        watchdog,
        forward_client,
    )


def _watchdog_kubeconfig(path: str, context: str, workdir: str) -> str:
    """A kubeconfig (list) with which the watchdog reaches the same cluster."""
    paths = os.pathsep.join(os.path.abspath(p) for p in path.split(os.pathsep))
    if not context:
        return paths
    # A later file's current-context wins when the client merges the list.
    override = os.path.join(workdir, "kube-context.json")
    with open(override, "w") as f:
        json.dump({"current-context": context}, f)
    return f"{paths}{os.pathsep}{override}"


def _incluster_kubeconfig(host: str, workdir: str) -> str:
    """A kubeconfig naming the service account's files (not copying them)."""
    account = "/var/run/secrets/kubernetes.io/serviceaccount"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "in-cluster",
                "cluster": {
                    "server": host,
                    "certificate-authority": f"{account}/ca.crt",
                },
            }
        ],
        "users": [{"name": "sa", "user": {"tokenFile": f"{account}/token"}}],
        "contexts": [
            {
                "name": "in-cluster",
                "context": {"cluster": "in-cluster", "user": "sa"},
            }
        ],
        "current-context": "in-cluster",
    }
    path = os.path.join(workdir, "kube-incluster.json")
    with open(path, "w") as f:
        json.dump(config, f)
    return path
