"""Bad input from callers and from the network: it is refused with a spear_nb
error, counted, and never reaches a function.

Already covered elsewhere and not repeated here: fuzzing of the frame decoder and
of message bodies (tests/communication/test_protocol.py), single malformed auth
attempts on the host's listener (tests/communication/test_auth.py), the agent's
wire against garbage (tests/agent/test_wire.py), payloads just over a small
frame limit (tests/test_faults.py, tests/runtime/test_wasm.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import socket
import stat
import sys
import threading
from collections.abc import Iterator
from typing import Any

import cloudpickle
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spear_nb
from spear_nb import samples
from spear_nb.agent._serve import Wire
from spear_nb.communication.protocol import LENGTH, Message, MessageType, frame
from spear_nb.errors import ConfigurationError, PayloadTooLarge, ProtocolError
from spear_nb.execution.model import TaskSettings
from spear_nb.execution.spec import build_settings, build_spec
from tests._support import read_messages

MiB = 1 << 20
fuzz = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
    ],
)


# -- functions that run inside instances (shipped by value) -----------------------


def echo(data: bytes) -> bytes:
    return data


def mark(path: str, tag: str) -> str:
    """Append ``tag`` to ``path``: the file tells which calls really ran."""
    with open(path, "a") as f:
        f.write(tag + "\n")
    return tag


def inc(x: int) -> int:
    return x + 1


cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module", autouse=True)
def _grpc_process_state() -> Iterator[None]:
    """Keep one gRPC channel open while this module runs: gRPC opens its pollers
    and wakeup pipes once per process (and may close them once no channel is
    left), and the per-test leak check must not count them."""
    with spear_nb.Session(stop_grace=0.5) as s:
        s.register("warm", inc, channel="grpc")
        assert s.invoke("warm", 1) == 2
        yield


# -- the artifact spec parser -------------------------------------------------------

_junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.binary(max_size=12),
    st.lists(st.one_of(st.text(max_size=6), st.integers(), st.none()), max_size=4),
    st.dictionaries(
        st.one_of(st.text(max_size=6), st.integers()),
        st.one_of(st.text(max_size=6), st.integers(), st.none()),
        max_size=3,
    ),
    st.sampled_from(
        [
            inc,
            "unix",
            "tcp",
            "grpc",
            "memory",
            "process",
            "wasm",
            "kubernetes",
            "wait",
            "reject",
            "round_robin",
            "a:b",
            "echo 'unclosed",
            "a\x00b",
            "(module)",
            b"\x00asm\x01\x00\x00\x00",
            float("inf"),
            -0.0,
            2**63,
            object(),
        ]
    ),
)
_spec_keys = ("command", "handler", "script", "wasm", "image", "runtime", "channel")
_spec_keys += ("env", "cwd")
_setting_keys = ("timeout", "max_instances", "max_concurrency", "idle_timeout")
_setting_keys += ("queue_policy", "scheduler")


@fuzz
@given(
    st.one_of(st.none(), _junk),
    st.dictionaries(st.sampled_from(_spec_keys), _junk, max_size=4),
    st.dictionaries(st.text(max_size=8), _junk, max_size=2),
    st.dictionaries(st.sampled_from(_setting_keys), _junk, max_size=4),
)
def test_fuzz_spec_parser_raises_only_configuration_errors(
    fn: Any,
    spec_kwargs: dict[str, Any],
    options: dict[str, Any],
    overrides: dict[str, Any],
) -> None:
    with contextlib.suppress(ConfigurationError):
        spec = build_spec(fn, options=options, **spec_kwargs)
        assert spec.digest()
    with contextlib.suppress(ConfigurationError):
        task_settings = build_settings(TaskSettings(), **overrides)
        assert isinstance(task_settings, TaskSettings)


@pytest.fixture
def fuzz_session(tmp_path) -> Iterator[spear_nb.Session]:
    s = spear_nb.Session(
        stop_grace=0.5, execution_timeout=60, cache_dir=str(tmp_path / "cache")
    )
    try:
        yield s
    finally:
        s.close()


@fuzz
@given(
    st.one_of(st.none(), _junk),
    st.dictionaries(
        st.sampled_from(_spec_keys + _setting_keys).filter(
            lambda k: k not in ("image", "runtime")  # no cluster in this test
        ),
        _junk,
        max_size=4,
    ),
)
def test_fuzz_register_raises_only_configuration_errors(
    fuzz_session, fn: Any, kwargs: dict[str, Any]
) -> None:
    """The whole register path, runtime validation included."""
    with contextlib.suppress(ConfigurationError):
        fuzz_session.register("fuzzed", fn, **kwargs)


# -- the WASM registration path -----------------------------------------------------

_WASM_MAGIC = b"\x00asm\x01\x00\x00\x00"


@fuzz
@given(
    st.one_of(
        st.binary(max_size=256),
        st.binary(max_size=256).map(lambda b: _WASM_MAGIC + b),
        st.text(max_size=120).map(lambda t: ("(module " + t).encode()),
        st.text(max_size=120).map(lambda t: "(module " + t),
    )
)
def test_fuzz_wasm_registration_raises_only_invalid_spec(
    fuzz_session, module: bytes | str
) -> None:
    try:
        fuzz_session.register("fuzzed_wasm", wasm=module)
    except spear_nb.InvalidSpec:
        return
    # The rare module that is valid must also have a handler export and run.
    with contextlib.suppress(spear_nb.SpearError):
        fuzz_session.invoke("fuzzed_wasm", b"x")


def test_wasm_registration_still_works_after_the_fuzzing(fuzz_session) -> None:
    fuzz_session.register("upper", wasm=samples.path("wasm", "upper.wat"))
    assert fuzz_session.invoke("upper", b"still fine") == b"STILL FINE"


# -- the agent's wire -----------------------------------------------------------------


@fuzz
@given(st.lists(st.binary(max_size=200), max_size=8))
def test_fuzz_agent_wire_raises_only_protocol_errors(chunks: list[bytes]) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        b.settimeout(10)
        a.sendall(b"".join(chunks))
        a.shutdown(socket.SHUT_WR)
        wire = Wire(b, 4096)
        with contextlib.suppress(ProtocolError):
            while (message := wire.read()) is not None:
                assert isinstance(message.type, MessageType)


@pytest.mark.parametrize("scheduler", [[], {"a": 1}, "nope", 3])
def test_a_bad_scheduler_is_refused_and_leaves_no_task(session, scheduler) -> None:
    with pytest.raises(spear_nb.InvalidSpec, match="scheduler"):
        session.register("f", inc, scheduler=scheduler)
    assert session.functions == []
    assert session.tasks().empty


# -- payloads from 0 bytes to 64 MiB ------------------------------------------------

SIZES = [0, 1, 64 * 1024 - 1, 64 * 1024, 64 * 1024 + 1, MiB, 16 * MiB]


def _payload(size: int) -> bytes:
    # Not all one byte: a lost or reordered chunk would go unnoticed in b"x" * n.
    block = hashlib.sha256(str(size).encode()).digest() * 2048  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


@pytest.mark.parametrize("channel", ["unix", "tcp", "grpc"])
def test_payloads_from_zero_bytes_to_sixteen_mib_round_trip(session, channel) -> None:
    session.register("echo", echo, channel=channel)
    for size in SIZES:
        payload = _payload(size)
        assert session.invoke("echo", payload) == payload, f"{size} bytes"
    (row,) = session.instances().to_dict("records")
    assert row["requests_total"] == len(SIZES) and row["requests_failed"] == 0


def test_wasm_payloads_from_zero_bytes_to_sixteen_mib(tmp_path) -> None:
    with spear_nb.Session(stop_grace=0.5, cache_dir=str(tmp_path)) as s:
        s.register("upper", wasm=samples.path("wasm", "upper.wat"))
        for size in SIZES:
            payload = _payload(size)
            assert s.invoke("upper", payload) == payload.upper(), f"{size} bytes"


@pytest.mark.parametrize("channel", ["unix", "tcp", "grpc"])
def test_just_under_and_just_over_sixty_four_mib(channel) -> None:
    limit = 64 * MiB
    # The frame carries the pickled payload plus a small envelope: raise the
    # limit by a little so that a payload just under 64 MiB fits.
    with spear_nb.Session(stop_grace=0.5, max_frame_size=limit + 4096) as s:
        s.register("digest", _sha256, channel=channel)
        payload = _payload(limit - 1)
        assert s.invoke("digest", payload) == hashlib.sha256(payload).hexdigest()
    with spear_nb.Session(stop_grace=0.5) as s:  # the default limit: 64 MiB
        s.register("digest", _sha256, channel=channel)
        assert s.invoke("digest", b"warm") == hashlib.sha256(b"warm").hexdigest()
        with pytest.raises(PayloadTooLarge, match="maximum frame size"):
            s.invoke("digest", bytes(limit + 1))
        # Refused before sending: the same instance serves the next call.
        assert s.invoke("digest", b"") == hashlib.sha256(b"").hexdigest()
        assert len(s.instances()) == 1


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- hostile peers on the host's listener --------------------------------------------


def _auth_frame(headers: dict[str, Any]) -> bytes:
    return frame(Message(MessageType.AUTH_REQUEST, 0, headers=headers))


def _execute_frame(path: str) -> bytes:
    args = pickle.dumps(((path, "HOSTILE"), {}), protocol=5)
    return frame(Message(MessageType.EXECUTE_REQUEST, 1, args))


def _dial(address: str) -> socket.socket:
    if address.startswith("/"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(address)
        return sock
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=30)


def _refused(sock: socket.socket) -> bool:
    """The host answered with one refusal and closed: nothing else came."""
    messages = read_messages(sock)
    return (
        len(messages) == 1
        and messages[0].type is MessageType.AUTH_RESPONSE
        and messages[0].header("ok") is False
    )


def _marked(path: str) -> list[str]:
    with open(path) as f:
        return f.read().split()


def _refusals(s: spear_nb.Session) -> int:
    return int((s.events()["phase"] == "auth_refused").sum())


@pytest.mark.parametrize("channel", ["unix", "tcp"])
def test_hostile_dialers_never_get_the_function_or_a_call(
    session, tmp_path, channel
) -> None:
    marks = str(tmp_path / "marks")
    session.register("mark", mark, channel=channel, max_instances=2)
    session.scale("mark", 2)
    assert session.invoke("mark", marks, "legit-1") == "legit-1"
    a, b = (session._manager.instances[f"mark-{i}"] for i in (1, 2))
    address = session._manager.factory.listener_addresses()[channel]
    factory = session._manager.factory
    before = factory.stats.auth_failures
    attempts = [
        # a wrong secret
        _auth_frame({"instance_id": a.instance_id, "secret": "0" * 32}),
        # the secret of another instance, replayed
        _auth_frame({"instance_id": b.instance_id, "secret": a.secret}),
        # a live instance's own id and secret, replayed: it is already connected
        _auth_frame({"instance_id": a.instance_id, "secret": a.secret}),
        # no auth at all, straight to a call
        _execute_frame(marks),
        # an auth request without any headers, then a call
        _auth_frame({}) + _execute_frame(marks),
        # a wrong secret with a call right behind it in the same write
        _auth_frame({"instance_id": a.instance_id, "secret": "x"})
        + _execute_frame(marks),
    ]
    for data in attempts:
        with _dial(address) as sock:
            sock.sendall(data)
            assert _refused(sock)
    # A stopped instance's credentials are worthless too.
    session.stop_instance(b.instance_id)
    with _dial(address) as sock:
        sock.sendall(_auth_frame({"instance_id": b.instance_id, "secret": b.secret}))
        assert _refused(sock)
    refused = len(attempts) + 1
    assert factory.stats.auth_failures == before + refused
    assert _refusals(session) == refused
    assert session.invoke("mark", marks, "legit-2") == "legit-2"
    assert _marked(marks) == ["legit-1", "legit-2"]
    rows = session.instances().set_index("instance_id")
    assert rows.loc[a.instance_id, "status"] == "ready"


@pytest.mark.parametrize("channel", ["unix", "tcp"])
def test_an_auth_flood_is_refused_while_real_calls_go_on(
    session, tmp_path, channel
) -> None:
    flood = 500
    marks = str(tmp_path / "marks")
    session.register("mark", mark, channel=channel)
    assert session.invoke("mark", marks, "legit-0") == "legit-0"
    (instance,) = session._manager.instances.values()
    address = session._manager.factory.listener_addresses()[channel]
    factory = session._manager.factory
    before = factory.stats.auth_failures
    kinds = [
        _auth_frame({"instance_id": instance.instance_id, "secret": "0" * 32}),
        _auth_frame({"instance_id": instance.instance_id, "secret": instance.secret}),
        _auth_frame({"instance_id": "nobody-1", "secret": instance.secret}),
        _execute_frame(marks),
        LENGTH.pack(3) + b"\xc1\xc1\xc1",
    ]
    legit: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def real_calls() -> None:
        i = 1
        while not stop.is_set() or i <= 50:
            try:
                legit.append(session.invoke("mark", marks, f"legit-{i}"))
            except BaseException as exc:
                errors.append(exc)
                return
            i += 1

    caller = threading.Thread(target=real_calls)
    caller.start()
    socks: list[socket.socket] = []
    try:
        for _ in range(flood):  # all connected at once
            socks.append(_dial(address))
        for i, sock in enumerate(socks):
            sock.sendall(kinds[i % len(kinds)])
        refused = sum(_refused(sock) for sock in socks)
    finally:
        stop.set()
        caller.join(60)
        for sock in socks:
            sock.close()
    assert refused == flood
    assert errors == []
    assert factory.stats.auth_failures == before + flood
    assert _refusals(session) == flood
    # Every real call ran, once; no hostile one did.
    assert _marked(marks) == ["legit-0", *legit]
    assert len(legit) >= 50
    (row,) = session.instances().to_dict("records")
    assert row["status"] == "ready" and row["requests_failed"] == 0


# -- hostile peers on an agent's gRPC server -------------------------------------------


def _grpc_attempt(address: str, frames: list[bytes]) -> list[Message]:
    """Open an Agent.Connect stream, send ``frames`` and read what comes back."""
    import grpc

    from spear_nb.communication._grpc import spear_pb2, spear_pb2_grpc
    from spear_nb.communication.protocol import unpack

    with grpc.insecure_channel(address) as channel:
        stub = spear_pb2_grpc.AgentStub(channel)
        replies = stub.Connect(
            iter([spear_pb2.Frame(body=body) for body in frames]), timeout=30
        )
        out: list[Message] = []
        try:
            for reply in replies:
                out.append(unpack(reply.body))
        except grpc.RpcError as exc:  # the agent ended the stream with an error
            assert exc.code() is not grpc.StatusCode.DEADLINE_EXCEEDED
        return out


def _body(data: bytes) -> bytes:
    return data[LENGTH.size :]  # a gRPC frame carries the message without a length


def test_hostile_clients_of_an_agents_grpc_server_never_run_the_function(
    session, tmp_path
) -> None:
    marks = str(tmp_path / "marks")
    session.register("mark", mark, channel="grpc", max_instances=2)
    session.scale("mark", 2)
    assert session.invoke("mark", marks, "legit-1") == "legit-1"
    a, b = (session._manager.instances[f"mark-{i}"] for i in (1, 2))
    address = f"unix:{os.path.join(session._workdir, a.instance_id)}.grpc.sock"
    call = _body(_execute_frame(marks))
    attempts = [
        [_body(_auth_frame({"instance_id": a.instance_id, "secret": "0" * 32})), call],
        [_body(_auth_frame({"instance_id": a.instance_id, "secret": b.secret})), call],
        [_body(_auth_frame({"instance_id": a.instance_id, "secret": a.secret})), call],
        [call],
        [_body(_auth_frame({})), call],
        [b"\xc1\xc1\xc1", call],
    ]
    for frames in attempts:
        replies = _grpc_attempt(address, frames)
        assert all(r.type is MessageType.AUTH_RESPONSE for r in replies), replies
        assert all(r.header("ok") is False for r in replies), replies
    assert session.invoke("mark", marks, "legit-2") == "legit-2"
    assert _marked(marks) == ["legit-1", "legit-2"]
    assert set(session.instances()["status"]) == {"ready"}


def test_hostile_clients_of_a_pods_grpc_port_never_run_the_function(tmp_path) -> None:
    pytest.importorskip("kubernetes")
    from spear_nb.testing import LocalKubeAPI

    marks = str(tmp_path / "marks")
    with (
        LocalKubeAPI() as kube,
        spear_nb.Session(kubeconfig=kube.kubeconfig, stop_grace=0.5) as s,
    ):
        s.register("mark", mark, image="spear-nb-agent:test")
        assert s.invoke("mark", marks, "legit-1") == "legit-1"
        (instance,) = s._manager.instances.values()
        (address,) = s.channels()["address"]
        call = _body(_execute_frame(marks))
        wrong = {"instance_id": instance.instance_id, "secret": "0" * 32}
        for frames in ([_body(_auth_frame(wrong)), call], [call]):
            replies = _grpc_attempt(address, frames)
            assert all(r.header("ok") is False for r in replies), replies
        assert s.invoke("mark", marks, "legit-2") == "legit-2"
    assert _marked(marks) == ["legit-1", "legit-2"]


# -- who can reach the session at all --------------------------------------------------


def test_sockets_are_owner_only_and_tcp_listens_on_loopback(tmp_path) -> None:
    with spear_nb.Session(stop_grace=0.5, cache_dir=str(tmp_path)) as s:
        s.register("u", inc)
        s.register("t", inc, channel="tcp")
        s.register("g", inc, channel="grpc")
        s.register("w", wasm=samples.path("wasm", "upper.wat"))
        for name in "utg":
            assert s.invoke(name, 1) == 2
        assert s.invoke("w", b"a") == b"A"
        workdir = s._workdir
        assert stat.S_IMODE(os.stat(workdir).st_mode) == 0o700
        sockets = {
            name: stat.S_IMODE(os.stat(os.path.join(workdir, name)).st_mode)
            for name in os.listdir(workdir)
            if stat.S_ISSOCK(os.stat(os.path.join(workdir, name)).st_mode)
        }
        assert set(sockets) == {"host.sock", "g-1.grpc.sock"}
        open_to_others = {n: oct(m) for n, m in sockets.items() if m & 0o077}
        assert open_to_others == {}
        me = psutil.Process()
        listening = [
            (p.pid, c.laddr)
            for p in [me, *me.children(recursive=True)]
            for c in p.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        ]
        assert listening, "the tcp function's listener is missing"
        assert {addr.ip for _, addr in listening} == {"127.0.0.1"}, listening
