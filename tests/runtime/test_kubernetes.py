"""The Kubernetes runtime against the local API server, through the real client.

Every test talks HTTP to a fresh :class:`LocalKubeAPI` through a kubeconfig, as
a user with a real cluster would; the pods it runs are local processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import cloudpickle
import psutil
import pytest

pytest.importorskip("kubernetes")

from kubernetes import client as kube_client
from kubernetes import config as kube_config

import spear_nb
from spear_nb.execution.model import RuntimeType
from spear_nb.runtime.kubernetes import (
    LABEL_INSTANCE,
    LABEL_SESSION,
    KubernetesRuntime,
    pod_name,
)
from spear_nb.testing import LocalKubeAPI
from tests import _remote
from tests._support import EventWaiter, all_gone

IMAGE = "spear-nb-agent:test"


def say_hello(name: str) -> str:
    print(f"hello {name} from the pod", flush=True)
    return f"hello {name}"


def squares(n: int) -> Iterator[int]:
    for i in range(n):
        yield i * i


def spin() -> None:
    while True:
        pass


def nap() -> None:
    time.sleep(60)


cloudpickle.register_pickle_by_value(sys.modules[__name__])


def wait_until(predicate: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Poll state until ``predicate`` is truthy (bounded); return its value."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        pause.wait(0.01)


@pytest.fixture(scope="module", autouse=True)
def _process_wide_state() -> None:
    """Run one pod before the tests: gRPC opens its pollers and wakeup pipes once
    per process, and the per-test leak check must not count them."""
    with LocalKubeAPI() as kube, open_session(kube) as s:
        s.register("warm", _remote.inc, image=IMAGE)
        assert s.invoke("warm", 1) == 2


@pytest.fixture
def kube() -> Iterator[LocalKubeAPI]:
    with LocalKubeAPI(
        namespaces=("default", "locked"),
        unpullable_images=("registry.invalid/missing:1",),
        forbidden_namespaces=("locked",),
    ) as api:
        yield api
        assert api.pod_pids() == [], "pod processes left behind"


@pytest.fixture
def core(kube: LocalKubeAPI) -> Iterator[Any]:
    """The test's own client, to look at and change pods behind the session."""
    api_client = kube_config.new_client_from_config(
        config_file=kube.kubeconfig, persist_config=False
    )
    try:
        yield kube_client.CoreV1Api(api_client)
    finally:
        api_client.close()


def open_session(kube: LocalKubeAPI, **settings: Any) -> spear_nb.Session:
    settings.setdefault("stop_grace", 0.5)
    settings.setdefault("execution_timeout", 60)
    return spear_nb.Session(kubeconfig=kube.kubeconfig, **settings)


@pytest.fixture
def session(kube: LocalKubeAPI) -> Iterator[spear_nb.Session]:
    s = open_session(kube)
    try:
        yield s
    finally:
        s.close()
        assert kube.pods() == [], "the session left pods behind"


def runtime_of(s: spear_nb.Session) -> KubernetesRuntime:
    runtime = s._manager.runtimes.get(RuntimeType.KUBERNETES)
    assert isinstance(runtime, KubernetesRuntime)
    return runtime


def crash_template(code: int, restart: str = "Never") -> dict[str, Any]:
    command = f"import sys; print('crashing now', flush=True); sys.exit({code})"
    return {
        "spec": {
            "restartPolicy": restart,
            "containers": [{"name": "agent", "command": ["python", "-c", command]}],
        }
    }


# -- the lifecycle -------------------------------------------------------------------


def sleeping_pod(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    """A pod made behind the session's back: one container that sleeps a minute."""
    metadata: dict[str, Any] = {"name": name}
    if labels:
        metadata["labels"] = labels
    container = {
        "name": "c",
        "image": "x",
        "command": ["python", "-c", "import time; time.sleep(60)"],
    }
    return {"metadata": metadata, "spec": {"containers": [container]}}


def test_a_pod_serves_warm_calls_and_is_deleted_on_close(kube, core) -> None:
    s = open_session(kube)
    try:
        info = s.register(
            "inc_pod",
            _remote.inc,
            runtime="kubernetes",
            image=IMAGE,
            cpu="100m",
            memory="64Mi",
            memory_limit="128Mi",
            image_pull_policy="IfNotPresent",
            labels={"team": "notebooks"},
        )
        assert (info.runtime, info.kind) == ("kubernetes", "callable")
        assert [s.invoke("inc_pod", i) for i in range(20)] == list(range(1, 21))

        instances = s.instances()
        assert list(instances["status"]) == ["ready"]
        assert list(instances["channel"]) == ["grpc"]
        assert instances["requests_total"].iloc[0] == 20
        channels = s.channels()
        assert (
            list(channels["type"]) == ["grpc"] and channels["state"][0] == "connected"
        )

        (pod,) = kube.pods()
        meta, spec = pod["metadata"], pod["spec"]
        instance_id = instances["instance_id"].iloc[0]
        assert meta["name"] == pod_name(s.session_id, instance_id)
        assert meta["labels"][LABEL_SESSION] == runtime_of(s).session_label
        assert meta["labels"][LABEL_INSTANCE] == instance_id
        assert meta["labels"]["team"] == "notebooks"
        assert meta["annotations"]["spear-nb/session"] == s.session_id
        assert meta["annotations"]["spear-nb/task"] == "inc_pod"
        (container,) = spec["containers"]
        assert container["image"] == IMAGE
        assert container["imagePullPolicy"] == "IfNotPresent"
        assert container["command"] == ["python", "-m", "spear_nb.agent"]
        assert container["resources"] == {
            "requests": {"cpu": "100m", "memory": "64Mi"},
            "limits": {"memory": "128Mi"},
        }
        env = {e["name"]: e["value"] for e in container["env"]}
        port = container["ports"][0]["containerPort"]
        assert env["SPEAR_INSTANCE_ID"] == instance_id
        assert env["SPEAR_GRPC_ADDRESS"] == f"0.0.0.0:{port}"
        assert set(env) >= {"SPEAR_SECRET_SHA256", "SPEAR_HEARTBEAT", "SPEAR_MAX_FRAME"}
        # Whoever may read the pod sees only a digest of its instance's secret.
        secret = s._manager.instances[instance_id].secret
        assert "SPEAR_SECRET" not in env and secret not in json.dumps(pod)
        assert env["SPEAR_SECRET_SHA256"] == hashlib.sha256(secret.encode()).hexdigest()
        assert pod["status"]["qosClass"] == "Burstable"
        assert channels["address"][0] == f"127.0.0.1:{port}"
        pids = kube.pod_pids()
        assert len(pids) == 1
    finally:
        s.close()
    listed = core.list_namespaced_pod("default", label_selector=LABEL_SESSION)
    assert listed.items == []
    assert kube.pods() == []
    assert all_gone(pids) == []


def test_stop_instance_deletes_its_pod(session, kube) -> None:
    session.register("inc", _remote.inc, image=IMAGE)
    assert session.invoke("inc", 1) == 2
    (instance_id,) = session.instances()["instance_id"]
    assert len(kube.pods()) == 1
    session.stop_instance(instance_id)
    assert kube.pods() == []
    assert kube.pod_pids() == []
    assert session.invoke("inc", 2) == 3  # a new pod
    assert len(session.instances()) == 2


def test_streams_errors_and_pod_logs_come_back(session) -> None:
    session.register("count", squares, image=IMAGE)
    assert list(session.stream("count", 4)) == [0, 1, 4, 9]
    session.register("boom", _remote.explode_on_purpose, image=IMAGE)
    with pytest.raises(spear_nb.RemoteError, match="bad input 7") as caught:
        session.invoke("boom", 7)
    assert "explode_on_purpose" in caught.value.remote_traceback
    session.register("hello", say_hello, image=IMAGE)
    assert session.invoke("hello", "Ada") == "hello Ada"
    instance_id = session.executions()["instance_id"].iloc[-1]
    details = session.inspect(instance_id)
    assert details["pod"].startswith("spear-")
    assert details["pod_status"] == "Running, Ready"
    assert "hello Ada from the pod" in details["log_tail"]


@pytest.mark.parametrize("fn", [spin, nap], ids=["python-loop", "blocking-sleep"])
def test_a_timed_out_call_is_cancelled_inside_the_pod(session, fn) -> None:
    session.register("spin", fn, image=IMAGE, timeout=0.3)
    session.register("inc", _remote.inc, image=IMAGE)
    with pytest.raises(spear_nb.ExecutionTimeout):
        session.invoke("spin")
    spin_rows = session.instances().set_index("function").loc["spin"]
    assert spin_rows["status"] == "ready"  # the agent interrupted the call
    assert session.invoke("inc", 1) == 2


def test_a_result_larger_than_a_frame_is_refused(kube) -> None:
    with open_session(kube, max_frame_size=64 * 1024) as s:
        s.register("make", _remote.make_bytes, image=IMAGE)
        with pytest.raises(spear_nb.PayloadTooLarge, match="too large to send back"):
            s.invoke("make", 200_000)
        assert s.invoke("make", 10) == b"x" * 10  # the pod serves on


def test_an_image_artifact_runs_the_image_command(tmp_path) -> None:
    script = tmp_path / "shout.py"
    script.write_text(
        textwrap.dedent(
            """
            from spear_nb.agent import serve

            def shout(text):
                return text.upper() + "!"

            serve(shout)
            """
        )
    )
    with LocalKubeAPI(images={"shout:1": ["python", str(script)]}) as kube:
        with open_session(kube) as s:
            info = s.register("shout", image="shout:1")
            assert (info.runtime, info.kind) == ("kubernetes", "image")
            assert s.invoke("shout", "hey") == "HEY!"
            (pod,) = kube.pods()
            assert "command" not in pod["spec"]["containers"][0]
        assert kube.pods() == []


def test_port_forward_reaches_the_pod_through_the_api_server(kube) -> None:
    with open_session(kube, kube_port_forward=True) as s:
        s.register("inc", _remote.inc, image=IMAGE)
        assert [s.invoke("inc", i) for i in range(5)] == [1, 2, 3, 4, 5]
        (pod,) = kube.pods()
        port = pod["spec"]["containers"][0]["ports"][0]["containerPort"]
        address = s.channels()["address"][0]
        assert address.startswith("127.0.0.1:")
        assert address != f"127.0.0.1:{port}"
        assert any("/portforward?ports=" in r for r in kube.requests)
    assert kube.pods() == []


# -- the cluster's failures ------------------------------------------------------------


def test_an_image_that_cannot_be_pulled_fails_fast(session, kube) -> None:
    session.register("inc", _remote.inc, image="registry.invalid/missing:1")
    with pytest.raises(spear_nb.InstanceStartFailed) as caught:
        session.invoke("inc", 1)
    text = str(caught.value)
    assert "pod spear-" in text
    assert "ErrImagePull" in text or "ImagePullBackOff" in text
    assert "registry.invalid/missing:1" in text
    assert kube.pods() == []
    assert session.instances()["status"].tolist() == ["failed"]


def test_an_unschedulable_pod_fails_with_the_schedulers_reason(session, kube) -> None:
    kube.unschedulable = True
    session.register("inc", _remote.inc, image=IMAGE)
    with pytest.raises(spear_nb.InstanceStartFailed, match="Unschedulable: 0/1 nodes"):
        session.invoke("inc", 1)
    assert kube.pods() == []


def test_a_container_that_exits_fails_with_its_code_and_log(session, kube) -> None:
    session.register("inc", _remote.inc, image=IMAGE, pod_template=crash_template(3))
    with pytest.raises(spear_nb.InstanceStartFailed) as caught:
        session.invoke("inc", 1)
    text = str(caught.value)
    assert "ended (Failed)" in text
    assert "exit code 3 (Error)" in text
    assert "crashing now" in text  # the end of the pod's log
    assert kube.pods() == []


def test_a_crash_loop_is_reported(session, kube) -> None:
    template = crash_template(4, restart="Always")
    session.register("inc", _remote.inc, image=IMAGE, pod_template=template)
    with pytest.raises(spear_nb.InstanceStartFailed) as caught:
        session.invoke("inc", 1)
    text = str(caught.value)
    assert "CrashLoopBackOff" in text
    assert "exit code 4" in text
    assert kube.pods() == []


def test_a_start_timeout_deletes_the_pod(kube) -> None:
    sleeper = {
        "spec": {
            "containers": [
                {
                    "name": "agent",
                    "command": ["python", "-c", "import time; time.sleep(120)"],
                }
            ]
        }
    }
    with open_session(kube, instance_start_timeout=1.0) as s:
        s.register("inc", _remote.inc, image=IMAGE, pod_template=sleeper)
        with pytest.raises(spear_nb.InstanceStartFailed) as caught:
            s.invoke("inc", 1)
        text = str(caught.value)
        assert "not Running and Ready within the start timeout of 1 s" in text
        assert "it was deleted" in text
        assert kube.pods() == []
        assert kube.pod_pids() == []


def test_a_forbidden_namespace_raises_cluster_error(kube) -> None:
    with open_session(kube, kube_namespace="locked") as s:
        s.register("inc", _remote.inc, image=IMAGE)
        with pytest.raises(spear_nb.ClusterError) as caught:
            s.invoke("inc", 1)
    error = caught.value
    assert error.status == 403 and error.reason == "Forbidden"
    assert "403 Forbidden" in str(error) and "'locked'" in str(error)
    assert "RBAC" in str(error)


def test_a_missing_namespace_raises_cluster_error(kube) -> None:
    with open_session(kube, kube_namespace="nowhere") as s:
        s.register("inc", _remote.inc, image=IMAGE)
        with pytest.raises(spear_nb.ClusterError) as caught:
            s.invoke("inc", 1)
    assert caught.value.status == 404
    assert "namespace 'nowhere' does not exist" in str(caught.value)


def test_an_unreachable_api_server_raises_cluster_error(tmp_path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(config))
    with spear_nb.Session(kubeconfig=str(path), stop_grace=0.5) as s:
        s.register("inc", _remote.inc, image=IMAGE)
        with pytest.raises(spear_nb.ClusterError) as caught:
            s.invoke("inc", 1)
    assert caught.value.status == 0
    assert f"at http://127.0.0.1:{port} cannot be reached" in str(caught.value)


def test_a_pod_agent_takes_the_secret_not_its_digest_from_the_spec(session) -> None:
    """The pod's spec carries the secret's SHA-256: presenting that digest (all
    that someone who read the pod knows) is refused, like a wrong secret."""
    import grpc

    from spear_nb.communication._grpc import spear_pb2, spear_pb2_grpc
    from spear_nb.communication.protocol import Message, MessageType, pack, unpack

    session.register("inc", _remote.inc, image=IMAGE)
    assert session.invoke("inc", 1) == 2
    (row,) = session.channels().to_dict("records")
    instance_id = row["instance_id"]
    secret = session._manager.instances[instance_id].secret
    digest = hashlib.sha256(secret.encode()).hexdigest()

    def dial(given: str) -> Message:
        auth = Message(
            MessageType.AUTH_REQUEST,
            0,
            headers={"instance_id": instance_id, "secret": given},
        )
        with grpc.insecure_channel(row["address"]) as channel:
            stub = spear_pb2_grpc.AgentStub(channel)
            (reply,) = stub.Connect(
                iter([spear_pb2.Frame(body=pack(auth))]), timeout=30
            )
            return unpack(reply.body)

    for given in (digest, "0" * 64):
        reply = dial(given)
        assert reply.header("ok") is False and b"wrong secret" in reply.payload
    reply = dial(secret)  # the right one: only the host's stream may stay
    assert reply.header("ok") is False and b"already connected" in reply.payload
    assert session.invoke("inc", 2) == 3


def test_a_wrong_kubeconfig_or_context_is_refused_when_the_session_is_made(
    tmp_path, monkeypatch
) -> None:
    """Without the network: only the file is read, and nothing is left behind."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [
            {"name": "lab", "context": {"cluster": "c", "user": "u"}},
            {"name": "prod", "context": {"cluster": "c", "user": "u"}},
        ],
        "current-context": "lab",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(config))
    with pytest.raises(spear_nb.ConfigurationError) as caught:
        spear_nb.Session(kubeconfig=str(path), kube_context="labb")
    assert "has no context 'labb' (did you mean 'lab'?)" in str(caught.value)
    assert "its contexts: lab, prod" in str(caught.value)
    with pytest.raises(spear_nb.ConfigurationError, match="does not exist"):
        spear_nb.Session(kubeconfig=str(tmp_path / "missing"))
    broken = tmp_path / "broken"
    broken.write_text("apiVersion: v1\nclusters: [ {name: c\n")
    with pytest.raises(spear_nb.ConfigurationError) as caught:
        spear_nb.Session(kubeconfig=str(broken))
    assert f"cannot read the kubeconfig {broken}" in str(caught.value)
    assert "line 2" in str(caught.value)  # the parser's words, on one line
    with spear_nb.Session(kubeconfig=str(path), kube_context="prod") as s:
        assert s.config.kube_context == "prod"
    monkeypatch.setitem(sys.modules, "kubernetes", None)  # as if not installed
    with pytest.raises(spear_nb.ConfigurationError, match=r"spear_nb\[kubernetes\]"):
        spear_nb.Session(kubeconfig=str(path), kube_context="prod")


def test_an_invalid_pod_is_refused_with_the_api_servers_causes(session, kube) -> None:
    session.register("inc", _remote.inc, image=IMAGE, cpu="lots")
    with pytest.raises(spear_nb.ClusterError) as caught:
        session.invoke("inc", 1)
    assert caught.value.status == 422
    assert "resources.requests[cpu]" in str(caught.value)
    assert kube.pods() == []


def test_a_pod_name_that_exists_gets_a_new_suffix(session, kube, core) -> None:
    taken = pod_name(session.session_id, "inc-1")
    squatter = {
        "metadata": {"name": taken},
        "spec": {
            "containers": [
                {"name": "c", "image": "x", "command": ["python", "-c", "pass"]}
            ]
        },
    }
    core.create_namespaced_pod("default", squatter)
    try:
        session.register("inc", _remote.inc, image=IMAGE)
        assert session.invoke("inc", 1) == 2
        details = session.inspect("inc-1")
        assert details["pod"].startswith(taken + "-") and details["pod"] != taken
        events = session.events()
        assert "pod_renamed" in set(events["phase"])
    finally:
        core.delete_namespaced_pod(taken, "default", grace_period_seconds=0)


def test_registration_refuses_what_pods_cannot_run(session) -> None:
    with pytest.raises(spear_nb.InvalidSpec, match="needs image="):
        session.register("f", _remote.inc, runtime="kubernetes")
    with pytest.raises(spear_nb.InvalidSpec, match="not a command"):
        session.register("f", command=["wc"], runtime="kubernetes", image=IMAGE)
    with pytest.raises(spear_nb.InvalidSpec, match="over gRPC"):
        session.register("f", _remote.inc, image=IMAGE, channel="unix")
    with pytest.raises(spear_nb.InvalidSpec, match="unknown keyword 'gpu'"):
        session.register("f", _remote.inc, image=IMAGE, gpu=1)
    with pytest.raises(spear_nb.InvalidSpec, match="image_pull_policy"):
        session.register("f", _remote.inc, image=IMAGE, image_pull_policy="Maybe")


# -- the watch -------------------------------------------------------------------------


def test_a_pod_deleted_behind_the_sessions_back_is_replaced(session, kube, core):
    session.register("inc", _remote.inc, image=IMAGE)
    assert session.invoke("inc", 1) == 2
    (pod,) = kube.pods()
    with EventWaiter(session, lambda e: e.phase == "instance_lost") as lost:
        core.delete_namespaced_pod(
            pod["metadata"]["name"], "default", grace_period_seconds=0
        )
        assert lost.wait(15)
    # The watch and the broken gRPC stream race to report it; either is right.
    reason = lost.matched[0].detail
    assert "was deleted" in reason or "channel was lost" in reason
    assert session.invoke("inc", 2) == 3
    statuses = session.instances().set_index("instance_id")["status"]
    assert statuses.to_dict() == {"inc-1": "stopped", "inc-2": "ready"}


@pytest.mark.parametrize("gone", [False, True], ids=["timeout", "410-gone"])
def test_the_watch_lists_again_after_a_timeout_or_410(
    session, kube, core, gone
) -> None:
    session.register("inc", _remote.inc, image=IMAGE)
    assert session.invoke("inc", 1) == 2
    watcher = runtime_of(session)._watcher
    assert watcher is not None
    assert wait_until(lambda: kube.open_watches == 1)
    lists = watcher.lists
    if gone:
        kube.compact()
    kube.expire_watches(gone=gone)
    assert wait_until(lambda: watcher.lists > lists and kube.open_watches == 1)
    assert watcher.expired == (1 if gone else 0)
    session.scale("inc", 2)  # a new pod is followed to Ready by the new watch
    assert len(kube.pods()) == 2
    with EventWaiter(session, lambda e: e.phase == "instance_lost") as lost:
        kube.expire_watches(gone=gone)
        name = kube.pods()[0]["metadata"]["name"]
        core.delete_namespaced_pod(name, "default", grace_period_seconds=0)
        assert lost.wait(15)


# -- cleanup -------------------------------------------------------------------------


def test_a_pod_deleted_while_it_starts_leaves_no_process(kube, core) -> None:
    """LocalKubeAPI: a delete that comes while the kubelet is starting the pod's
    process (so that it sees none to stop) still ends that process."""
    for i in range(20):
        name = f"brief-{i}"
        core.create_namespaced_pod("default", sleeping_pod(name))
        core.delete_namespaced_pod(name, "default", grace_period_seconds=0)
        assert kube.pods() == []
        assert kube.pod_pids() == [], f"pod {name} left its process behind"


def test_close_deletes_the_sessions_pods_after_errors_too(kube, core) -> None:
    s = open_session(kube)
    try:
        s.register("inc", _remote.inc, image=IMAGE)
        s.register("bad", _remote.inc, image="registry.invalid/missing:1")
        assert s.invoke("inc", 1) == 2
        with pytest.raises(spear_nb.InstanceStartFailed):
            s.invoke("bad", 1)
        # A pod the session made but lost track of (say its create answer was
        # lost): only the label says whose it is.
        label = runtime_of(s).session_label
        stray = sleeping_pod("stray", {LABEL_SESSION: label})
        core.create_namespaced_pod("default", stray)
        assert len(kube.pods()) == 2
        pids = kube.pod_pids()
    finally:
        s.close()
    selector = f"{LABEL_SESSION}={label}"
    assert core.list_namespaced_pod("default", label_selector=selector).items == []
    assert kube.pods() == []
    assert all_gone(pids) == []


HOST = """
import json, sys
import cloudpickle
import spear_nb
from tests import _remote
cloudpickle.register_pickle_by_value(_remote)
s = spear_nb.Session(kubeconfig=sys.argv[1], stop_grace=0.5)
s.register("inc", _remote.inc, image="spear-nb-agent:test")
s.invoke("inc", 1)
print(json.dumps({"watchdog": s._watchdog.pid}), flush=True)
sys.stdin.read()
"""


def test_the_watchdog_deletes_pods_when_the_host_is_killed(kube, tmp_path) -> None:
    script = tmp_path / "host.py"
    script.write_text(HOST)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root)
    process = subprocess.Popen(
        [sys.executable, str(script), kube.kubeconfig],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        cwd=root,
    )
    try:
        assert process.stdout is not None
        info = json.loads(process.stdout.readline())
        assert len(kube.pods()) == 1
        watchdog = psutil.Process(info["watchdog"])
        process.kill()
        process.wait(30)
    finally:
        process.kill()
        process.wait()
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()
    # The watchdog deletes the pod, then exits.
    assert all_gone([watchdog.pid], timeout=30) == []
    assert kube.pods() == []
