"""The agent's side of the wire, over real socket pairs and a real process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import pytest

from spear_nb import PayloadTooLarge, ProtocolError
from spear_nb.agent._serve import AgentError, Wire, authenticate, connect
from spear_nb.communication.protocol import LENGTH, Message, MessageType, frame


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(30)
    b.settimeout(30)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_wire_reads_what_was_written(pair) -> None:
    a, b = pair
    sender, receiver = Wire(a, 1 << 20), Wire(b, 1 << 20)
    sender.write(Message(MessageType.EXECUTE_REQUEST, 1, b"one"))
    sender.write(Message(MessageType.HEARTBEAT, 2))
    first, second = receiver.read(), receiver.read()
    assert (first.type, first.request_id, first.payload) == (
        MessageType.EXECUTE_REQUEST,
        1,
        b"one",
    )
    assert (second.type, second.request_id) == (MessageType.HEARTBEAT, 2)


def test_wire_reassembles_frames_larger_than_its_buffer(pair) -> None:
    a, b = pair
    payload = os.urandom(700 * 1024)  # more than the 256 KiB initial buffer
    data = frame(Message(MessageType.EXECUTE_RESPONSE, 9, payload), 1 << 22)
    writer = threading.Thread(target=a.sendall, args=(data,))
    writer.start()
    try:
        message = Wire(b, 1 << 22).read()
    finally:
        writer.join()
    assert message.payload == payload


def test_wire_refuses_an_oversized_length_before_the_body(pair) -> None:
    a, b = pair
    a.sendall(LENGTH.pack(2048))  # no body follows
    with pytest.raises(PayloadTooLarge):
        Wire(b, 1024).read()


def test_wire_refuses_garbage(pair) -> None:
    a, b = pair
    a.sendall(LENGTH.pack(2) + b"\xc1\xc1")
    with pytest.raises(ProtocolError):
        Wire(b, 1024).read()


def test_wire_returns_none_when_the_peer_closes(pair) -> None:
    a, b = pair
    a.sendall(frame(Message(MessageType.HEARTBEAT, 1))[:5])
    a.close()
    assert Wire(b, 1024).read() is None


def test_authenticate_reports_a_refusal(pair) -> None:
    a, b = pair
    host = Wire(b, 1 << 20)
    reply = Message(MessageType.AUTH_RESPONSE, 0, b"wrong secret for instance x")
    reply.headers = {"ok": False}
    host_reply = threading.Thread(target=lambda: (host.read(), host.write(reply)))
    host_reply.start()
    try:
        with pytest.raises(AgentError, match="refused this instance: wrong secret"):
            authenticate(
                Wire(a, 1 << 20), {"SPEAR_INSTANCE_ID": "x", "SPEAR_SECRET": "y"}
            )
    finally:
        host_reply.join()


def test_connect_without_an_address_explains_itself() -> None:
    with pytest.raises(AgentError, match="meant to be started by a spear_nb session"):
        connect({})


def test_agent_started_by_hand_exits_with_a_message() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPEAR_")}
    done = subprocess.run(
        [sys.executable, "-m", "spear_nb.agent"],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert b"SPEAR_ADDRESS is not set" in done.stderr


def test_agent_with_an_unreachable_address_exits(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPEAR_")}
    env.update({"SPEAR_CHANNEL": "unix", "SPEAR_ADDRESS": str(tmp_path / "none.sock")})
    done = subprocess.run(
        [sys.executable, "-m", "spear_nb.agent"],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert b"cannot reach the host" in done.stderr


def test_the_grpc_agent_hands_a_quick_reply_to_its_waiting_loop() -> None:
    """The reply of the call the loop waits for skips the outbox; anything else,
    and a reply that comes after the wait, goes through it."""
    import asyncio

    from spear_nb.agent._grpc_serve import LoopWire

    async def main() -> None:
        wire = LoopWire(asyncio.get_running_loop(), 1 << 20)
        reply = Message(MessageType.EXECUTE_RESPONSE, 7, b"quick")
        wire.expect_reply(7)
        worker = threading.Thread(target=wire.write, args=(reply,))
        worker.start()
        body = wire.wait_for_reply(30)
        worker.join()
        assert body is not None and b"quick" in body
        assert wire.outbox.empty()

        # Too late: the loop gave up waiting, so the reply takes the outbox.
        wire.expect_reply(8)
        assert wire.wait_for_reply(0.001) is None
        late = threading.Thread(
            target=wire.write, args=(Message(MessageType.EXECUTE_RESPONSE, 8, b"slow"),)
        )
        late.start()
        late.join()
        assert b"slow" in await asyncio.wait_for(wire.outbox.get(), 30)

        # Another call's reply, or a stream chunk of this one, is never kept.
        wire.expect_reply(9)
        wire.write(Message(MessageType.STREAM_DATA, 9, b"chunk"))
        wire.write(Message(MessageType.EXECUTE_RESPONSE, 10, b"other"))
        assert b"chunk" in wire.outbox.get_nowait()
        assert b"other" in wire.outbox.get_nowait()
        wire.write(Message(MessageType.EXECUTE_RESPONSE, 9, b"mine"))
        body = wire.wait_for_reply(30)
        assert body is not None and b"mine" in body

    asyncio.run(main())


def test_the_grpc_agent_looks_for_a_quick_reply_before_it_blocks() -> None:
    """With busy polling on, the loop looks for the reply before it sleeps on it;
    a reply that comes after the look is still waited for, and the look then
    backs off (see BusyWait)."""
    import asyncio

    from spear_nb.agent._grpc_serve import LoopWire

    async def main() -> None:
        wire = LoopWire(asyncio.get_running_loop(), 1 << 20, busy_wait=30.0)
        wire.expect_reply(1)
        worker = threading.Thread(
            target=wire.write, args=(Message(MessageType.EXECUTE_RESPONSE, 1, b"a"),)
        )
        worker.start()  # within the 30 s look: found without blocking
        body = wire.wait_for_reply(30)
        worker.join()
        assert body is not None and b"a" in body
        assert (wire._look.hits, wire._look.misses) == (1, 0)

        wire._look.seconds = 0.001  # a look too short for a reply that waits
        wire.expect_reply(2)
        written = threading.Event()

        def write_after_the_look() -> None:
            written.wait(30)
            wire.write(Message(MessageType.EXECUTE_RESPONSE, 2, b"b"))

        def look_then_tell() -> bool:
            written.set()  # the reply is written while the look finds nothing
            return False

        wire._look.look = look_then_tell
        writer = threading.Thread(target=write_after_the_look)
        writer.start()
        body = wire.wait_for_reply(30)
        writer.join()
        assert body is not None and b"b" in body
        assert wire._look.misses == 1 and wire._look.skip == 1

    asyncio.run(main())


def test_the_grpc_agent_serves_on_uvloop_when_it_is_installed() -> None:
    """As on the host: uvloop roughly halves the loop's cost per message."""
    import asyncio

    pytest.importorskip("uvloop")
    from spear_nb.agent._grpc_serve import _run

    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    if sys.version_info >= (3, 11):
        assert _run(loop_module()).startswith("uvloop")  # type: ignore[arg-type]
    else:  # without asyncio.Runner, asyncio's own loop
        assert _run(loop_module()).startswith("asyncio")  # type: ignore[arg-type]
