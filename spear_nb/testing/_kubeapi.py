"""The HTTP side of the local API server, and :class:`LocalKubeAPI` itself."""

from __future__ import annotations

import contextlib
import copy
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from spear_nb._cleanup import Watchdog
from spear_nb.testing import _websocket as ws
from spear_nb.testing._kubelet import POD_IP, Kubelet
from spear_nb.testing._kubestore import (
    ApiError,
    Pod,
    Store,
    default_pull_policy,
    field_selector,
    label_selector,
    now_rfc3339,
    pod_fields,
    qos_class,
    status_body,
    validate_pod,
)

logger = logging.getLogger(__name__)

CONTEXT = "spear-nb-local"
USER = "system:serviceaccount:spear-nb:local"
VERSION = {
    "major": "1",
    "minor": "31",
    "gitVersion": "v1.31.0-spear-nb-local",
    "platform": "linux/amd64",
}
DEFAULT_WATCH_SECONDS = 1800
_ROUTES = [
    (re.compile(r"^/version/?$"), "version"),
    (re.compile(r"^/api/?$"), "api"),
    (re.compile(r"^/api/v1/namespaces/?$"), "namespaces"),
    (re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/?$"), "namespace"),
    (re.compile(r"^/api/v1/pods/?$"), "pods"),
    (re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods/?$"), "pods"),
    (re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods/(?P<name>[^/]+)/?$"), "pod"),
    (
        re.compile(
            r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods/(?P<name>[^/]+)/"
            r"(?P<sub>status|log|portforward)/?$"
        ),
        "subresource",
    ),
]


class LocalKubeAPI:
    """A loopback Kubernetes API server whose pods run as local processes.

    It serves, over real HTTP on 127.0.0.1, the part of the core/v1 API that the
    ``kubernetes`` client needs for pods, and writes a kubeconfig pointing at
    itself (``.kubeconfig``, a path; ``.url``)::

        with spear_nb.testing.LocalKubeAPI() as kube:
            with spear_nb.Session(kubeconfig=kube.kubeconfig) as s:
                s.register("inc", inc, image="spear-nb-agent:latest")

    **Emulated.** Pods under ``/api/v1/namespaces/{ns}/pods``: create (201;
    ``generateName``; 409 ``AlreadyExists``; 422 ``Invalid`` with causes for bad
    names, labels, containers, ports, quantities and restart policies; 404 when the
    namespace is missing), get, list and watch with ``labelSelector`` (``=``,
    ``==``, ``!=``, ``in``, ``notin``, existence) and ``fieldSelector``
    (``metadata.name``, ``metadata.namespace``, ``status.phase``,
    ``spec.nodeName``), ``/api/v1/pods`` across namespaces, delete with
    ``gracePeriodSeconds`` (``deletionTimestamp`` set, SIGTERM, SIGKILL after the
    grace period, then removal; 0 removes at once), the ``status`` and ``log``
    subresources (``tailLines``, ``limitBytes``) and ``portforward`` (the
    WebSocket ``v4.channel.k8s.io`` protocol the client's ``portforward`` speaks).
    Watches stream ADDED/MODIFIED/DELETED JSON lines with resource versions, start
    with ADDED events when no version is given, honour ``timeoutSeconds``, and send
    an ERROR event with a 410 ``Expired`` Status for a version older than the
    event history (``history`` events are kept; :meth:`compact` forgets them).
    ``GET /api/v1/namespaces/{ns}`` (404 for missing namespaces), ``/version`` and
    ``/api``. Errors are ``Status`` objects like the real server's. Requests need
    the bearer token of the kubeconfig (401 otherwise).

    The kubelet part runs each container's command (``command`` + ``args``; with
    neither, the image's command from ``images``, by default ``python -m
    spear_nb.agent``, the Dockerfile's CMD) as a local process in its own process
    group, with the container's ``env`` (``value``, ``$(VAR)`` references and
    ``fieldRef`` for pod name, namespace, uid, node and IPs), ``PYTHONPATH`` set so
    that this spear_nb imports, and stdout and stderr going to the pod log.
    ``python``/``python3`` run as this interpreter. Every pod gets IP 127.0.0.1, so
    pods share the host's ports (and a pod listening on 0.0.0.0, as the agent does,
    listens on every interface of this machine). A pod moves Pending
    (ContainerCreating) → Running → Ready once its readiness ``tcpSocket`` port (or
    its first ``containerPort``) accepts connections, or at once if it declares none
    → Succeeded or Failed with each container's ``terminated`` state (exit code,
    reason, signal). The restart
    policy is applied (``Always``/``OnFailure`` restart once at once, then with
    CrashLoopBackOff waits of 10 s doubling). Test switches: images named in
    ``unpullable_images`` go ErrImagePull → ImagePullBackOff and stay Pending;
    ``unschedulable`` keeps new pods Pending with an ``Unschedulable`` PodScheduled
    condition; namespaces in ``forbidden_namespaces`` answer 403 ``Forbidden`` to
    every pod request; :meth:`expire_watches` ends open watches like a timeout, or
    with 410 Gone.

    **Not emulated.** Images are never pulled and their content is ignored: the
    command runs on this machine, with this Python and this spear_nb. No container
    isolation: no network or PID namespaces, no resource limits (requests and
    limits are validated and shown in ``qosClass`` only), no volumes, probes other
    than tcpSocket readiness, init containers, lifecycle hooks, security contexts,
    service accounts or RBAC beyond the forbidden switch. No other resources
    (services, deployments, events, ...), no PUT/PATCH, no ``limit``/``continue``
    paging, no bookmarks, no ``follow`` or ``previous`` logs, no TLS, one node.
    Stopping the server kills every pod process it started.
    """

    def __init__(
        self,
        *,
        namespaces: Iterable[str] = ("default",),
        unpullable_images: Iterable[str] = (),
        forbidden_namespaces: Iterable[str] = (),
        unschedulable: bool = False,
        images: dict[str, list[str]] | None = None,
        history: int = 1000,
    ) -> None:
        self.store = Store(history)
        for name in namespaces:
            self.store.add_namespace(name)
        self.forbidden = set(forbidden_namespaces)
        self.token = secrets.token_hex(16)
        self.context = CONTEXT
        self.directory = tempfile.mkdtemp(prefix="spear-nb-kube-")
        self.kubelet = Kubelet(
            self.store,
            self.directory,
            dict(images or {}),
            set(unpullable_images),
        )
        self.kubelet.unschedulable = unschedulable
        self.requests: deque[str] = deque(maxlen=10_000)
        self.kubeconfig = os.path.join(self.directory, "kubeconfig")
        self.url = ""
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._connections_lock = threading.Lock()
        # Removes the directory (kubeconfig, pod logs) should this process die
        # without stop(): a SIGKILL, a kernel restart.
        self._watchdog: Watchdog | None = None

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> LocalKubeAPI:
        """Start serving and write the kubeconfig; returns self."""
        if self._server is not None:
            return self
        server = _Server(("127.0.0.1", 0), _Handler)
        server.api = self
        self._server = server
        host, port = server.server_address[:2]
        self.url = f"http://{host!s}:{port}"
        self._write_kubeconfig()
        self._watchdog = Watchdog()
        self._watchdog.start()
        self._watchdog.tell(f"path {self.directory}")
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="spear_nb-kubeapi",
            daemon=True,
        )
        self._thread.start()
        logger.info("local Kubernetes API server listening at %s", self.url)
        return self

    def stop(self) -> None:
        """Kill every pod process, end every connection and stop serving."""
        server, self._server = self._server, None
        if server is None:
            return
        self.kubelet.stop()
        with self.store.cond:
            self.store.closed = True
            self.store.cond.notify_all()
        server.shutdown()
        server.server_close()
        with self._connections_lock:
            connections = list(self._connections.items())
        for conn, _ in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for _, thread in connections:
            thread.join(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=5)
        shutil.rmtree(self.directory, ignore_errors=True)
        if self._watchdog is not None:
            self._watchdog.close()
            self._watchdog = None
        logger.info("local Kubernetes API server at %s stopped", self.url)

    def __enter__(self) -> LocalKubeAPI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "serving" if self._server is not None else "stopped"
        return f"<LocalKubeAPI {self.url or '-'} {state} pods={len(self.store.pods)}>"

    def _write_kubeconfig(self) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": CONTEXT, "cluster": {"server": self.url}}],
            "users": [{"name": CONTEXT, "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": CONTEXT,
                    "context": {
                        "cluster": CONTEXT,
                        "user": CONTEXT,
                        "namespace": "default",
                    },
                }
            ],
            "current-context": CONTEXT,
        }
        with open(self.kubeconfig, "w") as f:
            json.dump(config, f, indent=2)

    # -- test switches -------------------------------------------------------------

    def add_namespace(self, name: str) -> None:
        """Create a namespace (``default`` exists from the start)."""
        self.store.add_namespace(name)

    def forbid_namespace(self, name: str) -> None:
        """Answer every pod request in ``name`` with 403 Forbidden from now on."""
        self.forbidden.add(name)

    @property
    def unschedulable(self) -> bool:
        """While True, new pods stay Pending with an Unschedulable condition."""
        return self.kubelet.unschedulable

    @unschedulable.setter
    def unschedulable(self, value: bool) -> None:
        with self.store.cond:
            self.kubelet.unschedulable = value
            self.store.cond.notify_all()

    def compact(self) -> None:
        """Forget the event history, as etcd compaction does."""
        self.store.compact()

    def expire_watches(self, gone: bool = False) -> None:
        """End every open watch now: cleanly (a timeout) or with 410 Gone."""
        with self.store.cond:
            if gone:
                self.store.gone_epoch += 1
            self.store.epoch += 1
            self.store.cond.notify_all()

    # -- looking inside --------------------------------------------------------------

    def pods(self, namespace: str | None = None) -> list[Pod]:
        """Copies of the pods stored now, optionally of one namespace."""
        with self.store.cond:
            return [
                copy.deepcopy(pod)
                for (ns, _), pod in self.store.pods.items()
                if namespace is None or ns == namespace
            ]

    @property
    def open_watches(self) -> int:
        """How many watch requests are being served now."""
        with self.store.cond:
            return self.store.watches

    def pod_pids(self) -> list[int]:
        """The process ids of the pod processes alive now."""
        return self.kubelet.pids()

    # -- connections (called by the handler) ---------------------------------------

    def _track(self, conn: socket.socket) -> None:
        with self._connections_lock:
            self._connections[conn] = threading.current_thread()

    def _untrack(self, conn: socket.socket) -> None:
        with self._connections_lock:
            self._connections.pop(conn, None)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    api: LocalKubeAPI


class _Handler(BaseHTTPRequestHandler):
    """One connection; each request is routed to a method below."""

    protocol_version = "HTTP/1.1"
    server: _Server
    server_version = "spear-nb-local-kube-apiserver"

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.api._track(self.connection)

    def finish(self) -> None:
        self.server.api._untrack(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    # -- plumbing ------------------------------------------------------------------

    @property
    def api(self) -> LocalKubeAPI:
        return self.server.api

    @property
    def store(self) -> Store:
        return self.server.api.store

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.api.requests.append(f"{method} {self.path}")
        body = self._read_body()
        try:
            self._check_token()
            for pattern, route in _ROUTES:
                match = pattern.match(parts.path)
                if match:
                    getattr(self, f"_{route}")(method, query, body, **match.groupdict())
                    return
            raise ApiError(
                404, "NotFound", "the server could not find the requested resource"
            )
        except ApiError as exc:
            self._send_json(exc.code, exc.body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # a bug here: answer like the real server would
            logger.exception("LocalKubeAPI failed on %s %s", method, self.path)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._send_json(500, status_body(500, "InternalError", repr(exc)))

    def _read_body(self) -> dict[str, Any] | None:
        length = int(self.headers.get("Content-Length") or 0)
        if not length:
            return None
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except ValueError:
            raise ApiError(400, "BadRequest", "the request body is not JSON") from None
        return body if isinstance(body, dict) else None

    def _check_token(self) -> None:
        given = self.headers.get("Authorization", "")
        expected = f"Bearer {self.api.token}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise ApiError(401, "Unauthorized", "Unauthorized")

    def _send_json(self, code: int, body: Any) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_text(self, code: int, text: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)

    def _allowed(self, method: str, allowed: tuple[str, ...]) -> None:
        if method not in allowed:
            raise ApiError(
                405,
                "MethodNotAllowed",
                f"the server does not allow this method on "
                f"the requested resource (LocalKubeAPI supports {', '.join(allowed)})",
            )

    def _check_namespace(self, ns: str, verb: str, resource: str = "pods") -> None:
        if ns in self.api.forbidden:
            raise ApiError(
                403,
                "Forbidden",
                f'{resource} is forbidden: User "{USER}" cannot {verb} resource '
                f'"{resource}" in API group "" in the namespace "{ns}"',
                {"kind": resource},
            )

    # -- simple routes ---------------------------------------------------------------

    def _version(self, method: str, query: dict[str, str], body: Any) -> None:
        self._send_json(200, VERSION)

    def _api(self, method: str, query: dict[str, str], body: Any) -> None:
        self._send_json(200, {"kind": "APIVersions", "versions": ["v1"]})

    def _namespaces(self, method: str, query: dict[str, str], body: Any) -> None:
        self._allowed(method, ("GET",))
        with self.store.cond:
            items = list(self.store.namespaces.values())
            data = json.dumps(
                {
                    "kind": "NamespaceList",
                    "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(self.store.rv)},
                    "items": items,
                }
            ).encode()
        self._send_json(200, data)

    def _namespace(
        self, method: str, query: dict[str, str], body: Any, ns: str
    ) -> None:
        self._allowed(method, ("GET",))
        with self.store.cond:
            namespace = self.store.namespaces.get(ns)
            data = json.dumps(namespace).encode() if namespace else b""
        if not data:
            raise _missing_namespace(ns)
        self._send_json(200, data)

    # -- pods ------------------------------------------------------------------------

    def _pods(
        self, method: str, query: dict[str, str], body: Any, ns: str | None = None
    ) -> None:
        if method == "POST" and ns is not None:
            self._create(ns, body)
            return
        self._allowed(method, ("GET", "POST") if ns else ("GET",))
        if query.get("watch") in ("1", "true", "True"):
            self._watch(ns, query)
            return
        labels = label_selector(query.get("labelSelector", ""))
        fields = field_selector(query.get("fieldSelector", ""))
        with self.store.cond:
            if ns is not None:
                self._check_namespace(ns, "list")
            items = [
                pod
                for (pod_ns, _), pod in self.store.pods.items()
                if (ns is None or pod_ns == ns)
                and labels(pod["metadata"].get("labels") or {})
                and fields(pod_fields(pod))
            ]
            data = json.dumps(
                {
                    "kind": "PodList",
                    "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(self.store.rv)},
                    "items": items,
                }
            ).encode()
        self._send_json(200, data)

    def _create(self, ns: str, pod: Any) -> None:
        if not isinstance(pod, dict):
            raise ApiError(400, "BadRequest", "the request body must be a Pod")
        pod = copy.deepcopy(pod)
        meta = pod.setdefault("metadata", {})
        if meta.get("namespace") not in (None, "", ns):
            raise ApiError(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace "
                "sent on the request",
            )
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        with self.store.cond:
            self._check_namespace(ns, "create")
            if ns not in self.store.namespaces:
                raise _missing_namespace(ns)
            validate_pod(pod, ns)
            name = meta["name"]
            if (ns, name) in self.store.pods:
                raise ApiError(
                    409,
                    "AlreadyExists",
                    f'pods "{name}" already exists',
                    {"name": name, "kind": "pods"},
                )
            _defaults(pod, ns)
            self.store.pods[(ns, name)] = pod
            self.store.record("ADDED", pod)
            data = json.dumps(pod).encode()
            admitted = copy.deepcopy(pod)
        self.api.kubelet.admit(admitted)
        self._send_json(201, data)

    def _pod(
        self, method: str, query: dict[str, str], body: Any, ns: str, name: str
    ) -> None:
        self._allowed(method, ("GET", "DELETE"))
        if method == "DELETE":
            self._delete(ns, name, query, body)
            return
        self._send_json(200, self._get(ns, name, "get"))

    def _get(self, ns: str, name: str, verb: str) -> bytes:
        with self.store.cond:
            self._check_namespace(ns, verb)
            pod = self.store.pods.get((ns, name))
            if pod is None:
                raise _missing_pod(name)
            return json.dumps(pod).encode()

    def _delete(
        self, ns: str, name: str, query: dict[str, str], body: dict[str, Any] | None
    ) -> None:
        with self.store.cond:
            self._check_namespace(ns, "delete")
            pod = self.store.pods.get((ns, name))
            if pod is None:
                raise _missing_pod(name)
            grace = _grace(pod, query, body)
            run = self.api.kubelet.runs.get((ns, name))
            graceful = grace > 0 and run is not None and bool(run.processes())
            if graceful and "deletionTimestamp" not in pod["metadata"]:
                pod["metadata"]["deletionTimestamp"] = now_rfc3339()
                pod["metadata"]["deletionGracePeriodSeconds"] = grace
                self.store.record("MODIFIED", pod)
            data = json.dumps(pod).encode()
        self.api.kubelet.delete((ns, name), grace if graceful else 0)
        self._send_json(200, data)

    def _subresource(
        self,
        method: str,
        query: dict[str, str],
        body: Any,
        ns: str,
        name: str,
        sub: str,
    ) -> None:
        self._allowed(method, ("GET",))
        if sub == "status":
            self._send_json(200, self._get(ns, name, "get"))
        elif sub == "log":
            self._log(ns, name, query)
        else:
            self._port_forward(ns, name, query)

    def _log(self, ns: str, name: str, query: dict[str, str]) -> None:
        if query.get("follow") in ("1", "true", "True"):
            raise ApiError(400, "BadRequest", "LocalKubeAPI does not support follow")
        with self.store.cond:
            self._check_namespace(ns, "get", "pods/log")
            pod = self.store.pods.get((ns, name))
            if pod is None:
                raise _missing_pod(name)
            names = [c["name"] for c in pod["spec"]["containers"]]
            container = query.get("container") or (names[0] if len(names) == 1 else "")
            if not container:
                raise ApiError(
                    400,
                    "BadRequest",
                    f"a container name must be specified for pod {name}, choose one "
                    f"of: [{' '.join(names)}]",
                )
            if container not in names:
                raise ApiError(
                    400,
                    "BadRequest",
                    f"container {container} is not valid for pod {name}",
                )
            statuses = {
                c["name"]: c for c in pod.get("status", {}).get("containerStatuses", [])
            }
            state = statuses.get(container, {}).get("state", {})
        run = self.api.kubelet.runs.get((ns, name))
        path = ""
        if run is not None:
            path = next(c.log_path for c in run.containers if c.name == container)
        if not path or not os.path.exists(path):
            reason = state.get("waiting", {}).get("reason", "ContainerCreating")
            raise ApiError(
                400,
                "BadRequest",
                f'container "{container}" in pod "{name}" is waiting to start: '
                f"{reason}",
            )
        with open(path, "rb") as f:
            text = f.read()
        if query.get("tailLines"):
            lines = text.splitlines(keepends=True)
            text = b"".join(lines[-int(query["tailLines"]) :])
        if query.get("limitBytes"):
            text = text[: int(query["limitBytes"])]
        self._send_text(200, text)

    # -- watch -----------------------------------------------------------------------

    def _watch(self, ns: str | None, query: dict[str, str]) -> None:
        store = self.store
        labels = label_selector(query.get("labelSelector", ""))
        fields = field_selector(query.get("fieldSelector", ""))
        seconds = int(query.get("timeoutSeconds") or DEFAULT_WATCH_SECONDS)
        deadline = time.monotonic() + seconds
        version = query.get("resourceVersion", "")

        def matches(
            ev_ns: str, ev_labels: dict[str, str], ev_fields: dict[str, str]
        ) -> bool:
            return (
                (ns is None or ev_ns == ns) and labels(ev_labels) and fields(ev_fields)
            )

        initial: list[bytes] = []
        expired = ""
        with store.cond:
            if ns is not None:
                self._check_namespace(ns, "watch")
            epoch, gone_epoch = store.epoch, store.gone_epoch
            if version in ("", "0"):
                for (pod_ns, _), pod in store.pods.items():
                    meta = pod["metadata"]
                    if matches(pod_ns, meta.get("labels") or {}, pod_fields(pod)):
                        line = json.dumps({"type": "ADDED", "object": pod})
                        initial.append(line.encode() + b"\n")
                cursor = store.rv
            else:
                try:
                    cursor = int(version)
                except ValueError:
                    raise ApiError(
                        400, "BadRequest", f"invalid resource version {version!r}"
                    ) from None
                if store.since(cursor) is None:
                    expired = f"too old resource version: {cursor} ({store.oldest + 1})"
        with store.cond:
            store.watches += 1
        try:
            self._stream(cursor, epoch, gone_epoch, deadline, initial, expired, matches)
        finally:
            with store.cond:
                store.watches -= 1

    def _stream(
        self,
        cursor: int,
        epoch: int,
        gone_epoch: int,
        deadline: float,
        initial: list[bytes],
        expired: str,
        matches: Callable[[str, dict[str, str], dict[str, str]], bool],
    ) -> None:
        store = self.store
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if expired:
            self._chunk(_gone(expired))
            self._chunk(b"")
            return
        if initial:
            self._chunk(b"".join(initial))
        while True:
            lines: list[bytes] = []
            ended = ""
            with store.cond:
                while not lines:
                    if store.closed:
                        ended = "closed"
                        break
                    if store.gone_epoch != gone_epoch:
                        ended = f"too old resource version: {cursor} ({store.rv})"
                        break
                    if store.epoch != epoch:
                        ended = "expired"
                        break
                    events = store.since(cursor)
                    if events is None:
                        ended = (
                            f"too old resource version: {cursor} ({store.oldest + 1})"
                        )
                        break
                    for event in events:
                        if matches(
                            event.fields["metadata.namespace"],
                            event.labels,
                            event.fields,
                        ):
                            lines.append(event.line)
                    if events:
                        cursor = events[-1].rv
                    if lines:
                        break
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        ended = "timeout"
                        break
                    store.cond.wait(remaining)
            if lines:
                self._chunk(b"".join(lines))
                continue
            if ended.startswith("too old"):
                self._chunk(_gone(ended))
            self._chunk(b"")
            return

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    # -- port-forward ----------------------------------------------------------------

    def _port_forward(self, ns: str, name: str, query: dict[str, str]) -> None:
        """Relay one pod port over the WebSocket port-forward protocol."""
        with self.store.cond:
            self._check_namespace(ns, "create", "pods/portforward")
            pod = self.store.pods.get((ns, name))
            if pod is None:
                raise _missing_pod(name)
            phase = pod.get("status", {}).get("phase", "")
        if phase != "Running":
            raise ApiError(
                400,
                "BadRequest",
                f"unable to upgrade connection: pod {name} is not running ({phase})",
            )
        key = self.headers.get("Sec-WebSocket-Key", "")
        if self.headers.get("Upgrade", "").lower() != "websocket" or not key:
            raise ApiError(400, "BadRequest", "port-forward needs a WebSocket upgrade")
        try:
            ports = [int(p) for p in query.get("ports", "").split(",") if p]
        except ValueError:
            raise ApiError(400, "BadRequest", "ports must be numbers") from None
        if len(ports) != 1:
            raise ApiError(400, "BadRequest", "LocalKubeAPI forwards exactly one port")
        port = ports[0]
        offered = [
            p.strip() for p in self.headers.get("Sec-WebSocket-Protocol", "").split(",")
        ]
        protocol = "v4.channel.k8s.io" if "v4.channel.k8s.io" in offered else offered[0]
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", ws.accept_key(key))
        if protocol:
            self.send_header("Sec-WebSocket-Protocol", protocol)
        self.end_headers()
        self.close_connection = True
        writer = ws.FrameWriter(self.connection.sendall)
        prefix = port.to_bytes(2, "little")
        writer.send(ws.OP_BINARY, b"\x00" + prefix)
        writer.send(ws.OP_BINARY, b"\x01" + prefix)
        try:
            target = socket.create_connection((POD_IP, port), timeout=5)
        except OSError as exc:
            message = f"error forwarding port {port} to pod {name}: {exc}"
            writer.send(ws.OP_BINARY, b"\x01" + message.encode())
            writer.send(ws.OP_CLOSE, b"\x03\xe8")
            return
        target.settimeout(None)
        target.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pump = threading.Thread(
            target=_pod_to_client,
            args=(target, writer),
            name=f"spear_nb-kubeapi-forward-{name}",
            daemon=True,
        )
        pump.start()
        try:
            self._client_to_pod(target, writer)
        finally:
            with contextlib.suppress(OSError):
                target.shutdown(socket.SHUT_RDWR)
            pump.join(timeout=5)
            target.close()

    def _client_to_pod(self, target: socket.socket, writer: ws.FrameWriter) -> None:
        while True:
            try:
                opcode, payload = ws.read_frame(self.rfile)  # type: ignore[arg-type]
            except (ws.WebSocketClosed, OSError, ValueError):
                return
            if opcode == ws.OP_CLOSE:
                writer.send(ws.OP_CLOSE, payload[:2])
                return
            if opcode == ws.OP_PING:
                writer.send(ws.OP_PONG, payload)
                continue
            if opcode != ws.OP_BINARY or not payload or payload[0] != 0:
                continue
            try:
                target.sendall(payload[1:])
            except OSError:
                writer.send(ws.OP_CLOSE, b"\x03\xe8")
                return


def _pod_to_client(target: socket.socket, writer: ws.FrameWriter) -> None:
    while True:
        try:
            data = target.recv(1 << 20)
        except OSError:
            data = b""
        if not data:
            writer.send(ws.OP_CLOSE, b"\x03\xe8")
            return
        if not writer.send(ws.OP_BINARY, b"\x00" + data):
            return


def _defaults(pod: Pod, ns: str) -> None:
    meta = pod["metadata"]
    meta.update(
        {
            "namespace": ns,
            "uid": str(uuid.uuid4()),
            "creationTimestamp": now_rfc3339(),
        }
    )
    meta.setdefault("labels", {})
    spec = pod["spec"]
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("serviceAccountName", "default")
    for container in spec["containers"]:
        container.setdefault("imagePullPolicy", default_pull_policy(container["image"]))
        container.setdefault("terminationMessagePath", "/dev/termination-log")
        container.setdefault("resources", {})
    pod["status"] = {"phase": "Pending", "qosClass": qos_class(pod)}


def _grace(pod: Pod, query: dict[str, str], body: dict[str, Any] | None) -> int:
    raw: Any = query.get("gracePeriodSeconds")
    if raw is None and body:
        raw = body.get("gracePeriodSeconds")
    if raw is None:
        raw = pod["spec"].get("terminationGracePeriodSeconds", 30)
    try:
        return max(0, int(raw))
    except (TypeError, ValueError):
        raise ApiError(
            400, "BadRequest", f"invalid gracePeriodSeconds {raw!r}"
        ) from None


def _missing_pod(name: str) -> ApiError:
    return ApiError(
        404, "NotFound", f'pods "{name}" not found', {"name": name, "kind": "pods"}
    )


def _missing_namespace(ns: str) -> ApiError:
    return ApiError(
        404,
        "NotFound",
        f'namespaces "{ns}" not found',
        {"name": ns, "kind": "namespaces"},
    )


def _gone(message: str) -> bytes:
    event = {"type": "ERROR", "object": status_body(410, "Expired", message)}
    return json.dumps(event).encode() + b"\n"
