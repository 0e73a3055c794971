"""The host's listener, spoken to by hand over a real socket.

Every connection must start with an AUTH_REQUEST carrying a live instance's id and
its secret; anything else is answered with ``ok: False`` and closed, counted in the
stats, and the session keeps serving.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from spear_nb.communication.protocol import LENGTH, Message, MessageType, frame
from tests import _remote
from tests._support import read_messages, rows


def _unix_address(s) -> str:
    addresses = s._manager.factory.listener_addresses()
    assert "unix" in addresses, addresses
    path = addresses["unix"]
    # The address the channels table shows is the same socket.
    assert path in set(rows(s.channels(), type="unix")["address"])
    return path


def _dial(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(path)
    return sock


def _auth(instance_id: str, secret: str) -> bytes:
    return frame(
        Message(
            MessageType.AUTH_REQUEST,
            0,
            headers={"instance_id": instance_id, "secret": secret, "pid": os.getpid()},
        )
    )


def _refusal(sock: socket.socket) -> Message:
    """The single AUTH_RESPONSE the host sends before closing the connection."""
    messages = read_messages(sock)  # returns only once the host has closed it
    assert len(messages) == 1, messages
    (reply,) = messages
    assert reply.type is MessageType.AUTH_RESPONSE
    assert reply.header("ok") is False
    return reply


@pytest.fixture
def warm(session):
    """A session with one live callable instance; returns (session, instance_id)."""
    session.register("inc", _remote.inc)
    assert session.invoke("inc", 1) == 2
    (instance_id,) = rows(session.instances(), function="inc")["instance_id"]
    return session, instance_id


def test_wrong_secret_is_refused_closed_and_counted(warm) -> None:
    s, instance_id = warm
    factory = s._manager.factory
    before = factory.stats.auth_failures
    with _dial(_unix_address(s)) as sock:
        sock.sendall(_auth(instance_id, "0" * 32))
        reply = _refusal(sock)
    assert b"wrong secret" in reply.payload
    assert instance_id.encode() in reply.payload
    assert factory.stats.auth_failures == before + 1
    (failures,) = rows(s.channels(), instance_id=instance_id)["auth_failures"]
    assert failures == 1
    # The real instance was not disturbed.
    assert s.invoke("inc", 41) == 42
    (total,) = rows(s.instances(), instance_id=instance_id)["requests_total"]
    assert total == 2


def test_missing_secret_is_refused(warm) -> None:
    s, instance_id = warm
    with _dial(_unix_address(s)) as sock:
        sock.sendall(
            frame(
                Message(
                    MessageType.AUTH_REQUEST, 0, headers={"instance_id": instance_id}
                )
            )
        )
        reply = _refusal(sock)
    assert b"wrong secret" in reply.payload
    assert s.invoke("inc", 1) == 2


def test_right_secret_for_a_connected_instance_is_refused(warm) -> None:
    s, instance_id = warm
    secret = s._manager.instances[instance_id].secret
    with _dial(_unix_address(s)) as sock:
        sock.sendall(_auth(instance_id, secret))
        reply = _refusal(sock)
    assert b"already connected" in reply.payload
    assert s.invoke("inc", 2) == 3


def test_unknown_instance_is_refused(warm) -> None:
    s, _ = warm
    factory = s._manager.factory
    with _dial(_unix_address(s)) as sock:
        sock.sendall(_auth("nobody-1", "x" * 32))
        reply = _refusal(sock)
    assert b"nobody-1" in reply.payload
    assert factory.stats.unknown_instance_attempts == 1
    assert s.invoke("inc", 3) == 4


def test_first_message_must_be_auth(warm) -> None:
    s, _ = warm
    with _dial(_unix_address(s)) as sock:
        sock.sendall(frame(Message(MessageType.EXECUTE_REQUEST, 1, b"")))
        reply = _refusal(sock)
    assert b"AUTH_REQUEST" in reply.payload
    assert s.invoke("inc", 4) == 5


def test_oversized_frame_before_auth_is_refused_without_the_body(warm) -> None:
    s, _ = warm
    with _dial(_unix_address(s)) as sock:
        # Only a length is sent; the host must answer without waiting for the body.
        sock.sendall(LENGTH.pack(0xFFFFFFF0))
        reply = _refusal(sock)
    assert b"maximum frame size" in reply.payload
    assert s.invoke("inc", 5) == 6


def test_garbage_before_auth_is_refused(warm) -> None:
    s, _ = warm
    with _dial(_unix_address(s)) as sock:
        sock.sendall(LENGTH.pack(3) + b"\xc1\xc1\xc1")
        reply = _refusal(sock)
    assert b"msgpack" in reply.payload
    assert s.invoke("inc", 6) == 7


def test_an_agent_with_a_wrong_secret_exits_with_a_clear_message(warm) -> None:
    s, instance_id = warm
    env = dict(os.environ)
    env.update(
        {
            "SPEAR_CHANNEL": "unix",
            "SPEAR_ADDRESS": _unix_address(s),
            "SPEAR_INSTANCE_ID": instance_id,
            "SPEAR_SECRET": "not-the-secret",
        }
    )
    done = subprocess.run(
        [sys.executable, "-m", "spear_nb.agent"],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert b"refused" in done.stderr
    assert b"wrong secret" in done.stderr
    assert s.invoke("inc", 7) == 8
