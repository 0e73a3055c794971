"""Just enough of the WebSocket protocol (RFC 6455) for the port-forward endpoint.

The server side of a connection: the opening handshake answer, reading masked
client frames, writing unmasked server frames. No extensions, no compression.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import threading
from collections.abc import Callable
from typing import BinaryIO

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

# Frames larger than this are refused: port-forward frames are at most ~1 MiB.
MAX_FRAME = 16 * 1024 * 1024


class WebSocketClosed(Exception):
    """The peer closed the connection or broke the framing."""


def accept_key(key: str) -> str:
    """The Sec-WebSocket-Accept value answering a client's Sec-WebSocket-Key."""
    digest = hashlib.sha1(key.encode("ascii") + _GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if data is None or len(data) < size:
        raise WebSocketClosed("the connection ended inside a frame")
    return data


def read_frame(stream: BinaryIO) -> tuple[int, bytes]:
    """Read one whole message (joining continuation frames): (opcode, payload)."""
    opcode = -1
    parts: list[bytes] = []
    while True:
        first, second = _read_exactly(stream, 2)
        final = bool(first & 0x80)
        frame_op = first & 0x0F
        masked = bool(second & 0x80)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", _read_exactly(stream, 2))
        elif length == 127:
            (length,) = struct.unpack("!Q", _read_exactly(stream, 8))
        if length > MAX_FRAME:
            raise WebSocketClosed(f"a frame of {length} bytes is too large")
        mask = _read_exactly(stream, 4) if masked else b""
        payload = _read_exactly(stream, length) if length else b""
        if masked and payload:
            payload = _unmask(payload, mask)
        if frame_op >= OP_CLOSE:  # control frames may arrive between fragments
            return frame_op, payload
        if frame_op != OP_CONTINUATION:
            opcode = frame_op
        parts.append(payload)
        if final:
            return opcode, b"".join(parts)


def _unmask(payload: bytes, mask: bytes) -> bytes:
    repeated = (mask * (len(payload) // 4 + 1))[: len(payload)]
    value = int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")
    return value.to_bytes(len(payload), "big")


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One final, unmasked server frame."""
    head = bytes([0x80 | opcode])
    size = len(payload)
    if size < 126:
        head += bytes([size])
    elif size < 1 << 16:
        head += bytes([126]) + struct.pack("!H", size)
    else:
        head += bytes([127]) + struct.pack("!Q", size)
    return head + payload


class FrameWriter:
    """Writes frames to a socket from several threads, one frame at a time."""

    def __init__(self, sendall: Callable[[bytes], object]) -> None:
        self._sendall = sendall
        self._lock = threading.Lock()
        self.closed = False

    def send(self, opcode: int, payload: bytes) -> bool:
        """Send a frame; return False if the connection is already gone."""
        with self._lock:
            if self.closed:
                return False
            try:
                self._sendall(encode_frame(opcode, payload))
            except OSError:
                self.closed = True
                return False
            if opcode == OP_CLOSE:
                self.closed = True
            return True
