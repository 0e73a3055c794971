"""Issue 3: the gRPC channel: generated code, fallback, auth on the stream, and a
peer that breaks the protocol. Real gRPC servers and clients throughout."""

from __future__ import annotations

import asyncio
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

import spear_nb
from spear_nb.communication._grpc import spear_pb2, spear_pb2_grpc
from spear_nb.communication.channel import ChannelState
from spear_nb.communication.grpc_channel import GrpcChannel
from spear_nb.communication.protocol import VERSION, Message, MessageType, pack, unpack
from tests import _remote
from tests._support import rows, warm_grpc

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "generate_grpc.py"


@pytest.fixture(scope="module", autouse=True)
def _grpc_process_state() -> None:
    warm_grpc()


# -- generated code ----------------------------------------------------------------


def test_generated_grpc_code_is_current() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def test_the_staleness_check_notices_a_changed_proto(tmp_path) -> None:
    """The check itself can fail: on a copy whose .proto gained a field."""
    copy = tmp_path / "repo"
    (copy / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, copy / "scripts")
    package = copy / "spear_nb" / "communication" / "_grpc"
    shutil.copytree(ROOT / "spear_nb" / "communication" / "_grpc", package)
    proto = package / "spear.proto"
    text = proto.read_text()
    assert "message Frame {" in text
    proto.write_text(
        text.replace("message Frame {", "message Frame {\n  string extra = 99;", 1)
    )
    done = subprocess.run(
        [sys.executable, str(copy / "scripts" / "generate_grpc.py"), "--check"],
        cwd=copy,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "stale" in done.stderr and "spear_pb2.py" in done.stderr


# -- fallback ------------------------------------------------------------------------


def test_an_agent_that_cannot_serve_grpc_dials_the_session(session) -> None:
    session.register(
        "inc", _remote.inc, channel="grpc", env={"SPEAR_GRPC_DISABLED": "1"}
    )
    assert [session.invoke("inc", i) for i in range(3)] == [1, 2, 3]
    (instance,) = session.instances().to_dict("records")
    assert instance["channel"] == "unix" and instance["status"] == "ready"
    (row,) = session.channels().to_dict("records")
    assert row["type"] == "unix"
    assert row["fallback_from"] == "grpc"
    assert row["state"] == "connected" and row["messages_sent"] >= 3
    events = rows(session.events(), phase="channel_fallback")
    (detail,) = events["detail"]
    assert list(events["instance_id"]) == [instance["instance_id"]]
    assert "SPEAR_GRPC_DISABLED" in detail and "unix" in detail
    # The instance's own log says why, too.
    assert "SPEAR_GRPC_DISABLED" in session.inspect(instance["instance_id"])["log_tail"]


# -- auth on the gRPC stream ---------------------------------------------------------


@pytest.fixture
def grpc_instance(session):
    """(session, instance_id, address) of a live instance served over gRPC."""
    session.register("inc", _remote.inc, channel="grpc")
    assert session.invoke("inc", 1) == 2
    (row,) = session.channels().to_dict("records")
    assert row["type"] == "grpc" and row["address"].startswith("unix:")
    return session, row["instance_id"], row["address"]


def _dial_by_hand(address: str, instance_id: str, secret: str) -> list[Message]:
    """Open Agent.Connect with a plain gRPC client; send only an auth request."""
    auth = Message(
        MessageType.AUTH_REQUEST,
        0,
        headers={"instance_id": instance_id, "secret": secret},
    )
    with grpc.insecure_channel(address) as channel:
        stub = spear_pb2_grpc.AgentStub(channel)
        replies = stub.Connect(iter([spear_pb2.Frame(body=pack(auth))]), timeout=30)
        return [unpack(frame.body) for frame in replies]


@pytest.mark.parametrize(
    "who, expected",
    [
        ("wrong secret", b"wrong secret"),
        ("wrong instance", b"wrong secret"),
        ("right secret, already connected", b"already connected"),
    ],
)
def test_the_grpc_agent_refuses_a_second_or_bad_stream(
    grpc_instance, who, expected
) -> None:
    s, instance_id, address = grpc_instance
    secret = s._manager.instances[instance_id].secret
    given = {
        "wrong secret": (instance_id, "0" * 32),
        "wrong instance": ("inc-99", secret),
        "right secret, already connected": (instance_id, secret),
    }[who]
    replies = _dial_by_hand(address, *given)
    assert len(replies) == 1, replies
    (reply,) = replies
    assert reply.type is MessageType.AUTH_RESPONSE and reply.header("ok") is False
    assert expected in reply.payload
    # The host's stream was not disturbed.
    assert s.invoke("inc", 41) == 42
    (row,) = s.channels().to_dict("records")
    assert row["state"] == "connected" and row["errors"] == 0
    assert len(s.instances()) == 1


def test_a_wrong_secret_gives_authentication_failed(grpc_instance) -> None:
    s, instance_id, address = grpc_instance

    async def dial() -> GrpcChannel:
        channel = GrpcChannel(instance_id, address, 1 << 20)
        with pytest.raises(spear_nb.AuthenticationFailed) as info:
            await channel.connect("not-the-secret", b"", 10)
        assert "wrong secret" in str(info.value)
        assert address in str(info.value)
        return channel

    channel = asyncio.run(dial())
    assert channel.stats.auth_failures == 1
    assert not channel.connected
    assert s.invoke("inc", 2) == 3


def test_no_grpc_server_at_the_address_is_a_channel_error() -> None:
    where = tempfile.mkdtemp(prefix="sn-")
    try:
        address = f"unix:{where}/nobody.sock"

        async def dial() -> None:
            channel = GrpcChannel("i-1", address, 1 << 20)
            with pytest.raises(spear_nb.ChannelError) as info:
                await channel.connect("s", b"", 0.3)
            assert "no gRPC server answered" in str(info.value)
            assert address in str(info.value)

        asyncio.run(dial())
    finally:
        os.rmdir(where)


# -- a gRPC peer that breaks the protocol ----------------------------------------------


class _RudeAgent(spear_pb2_grpc.AgentServicer):
    """Accepts the auth request, waits for one request, then answers ``bad``."""

    def __init__(self, bad: bytes) -> None:
        self.bad = bad

    def Connect(self, request_iterator, context):
        first = unpack(next(request_iterator).body)
        ok = Message(MessageType.AUTH_RESPONSE, first.request_id, headers={"ok": True})
        yield spear_pb2.Frame(body=pack(ok))
        next(request_iterator)  # the host's first request
        yield spear_pb2.Frame(body=self.bad)
        for _ in request_iterator:  # until the host goes away
            pass


@pytest.fixture
def rude_server() -> Iterator:
    """Start a gRPC server whose agent misbehaves; yields start(bad) -> address."""
    where = tempfile.mkdtemp(prefix="sn-")
    servers: list[tuple[grpc.Server, futures.ThreadPoolExecutor]] = []

    def start(bad: bytes) -> str:
        pool = futures.ThreadPoolExecutor(2)
        server = grpc.server(pool)
        spear_pb2_grpc.add_AgentServicer_to_server(_RudeAgent(bad), server)
        address = f"unix:{where}/rude{len(servers)}.sock"
        assert server.add_insecure_port(address)
        server.start()
        servers.append((server, pool))
        return address

    try:
        yield start
    finally:
        for server, pool in servers:
            server.stop(None).wait(10)
            pool.shutdown(wait=True)
        shutil.rmtree(where, ignore_errors=True)


def _raw(version: int, kind: int) -> bytes:
    import msgpack

    return msgpack.packb([version, kind, 1, 1.0, b"", None], use_bin_type=True)


@pytest.mark.parametrize(
    "bad, reason",
    [
        (_raw(VERSION + 1, int(MessageType.EXECUTE_RESPONSE)), "protocol version"),
        (_raw(VERSION, 77), "unknown type 77"),
        (b"\xc1\xc1", "msgpack"),
    ],
    ids=["newer version", "unknown type", "garbage"],
)
def test_a_grpc_peer_breaking_the_protocol_is_dropped(rude_server, bad, reason) -> None:
    address = rude_server(bad)

    async def main() -> GrpcChannel:
        channel = GrpcChannel("rude-1", address, 1 << 20)
        await channel.connect("s", b"", 10)
        assert channel.connected
        lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        channel.on_lost(lambda _: lost.done() or lost.set_result(None))
        pending = channel.start_request(Message(MessageType.EXECUTE_REQUEST, 0, b""))
        with pytest.raises(spear_nb.ChannelError) as info:
            await asyncio.wait_for(pending, 10)
        assert reason in str(info.value)
        await asyncio.wait_for(lost, 10)
        channel.close()
        return channel

    channel = asyncio.run(main())
    assert channel.state in (ChannelState.DISCONNECTED, ChannelState.CLOSED)
    assert reason in channel.close_reason
    assert channel.stats.errors == 1
    assert threading.current_thread() is threading.main_thread()
