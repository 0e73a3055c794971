"""The agent as a gRPC server: the host dials it (pods, or ``channel="grpc"``).

The host opens one ``Agent.Connect`` stream; its first frame is the auth request
carrying the instance id, the secret and the function to load. After that the
stream carries exactly what a socket channel carries, served by the same
:class:`~spear_nb.agent._serve.Server`, whose calls always run in a thread pool
here so that the stream keeps being read (and a cancel can reach a running call).
"""

from __future__ import annotations

import contextlib
import hmac
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from spear_nb.agent._serve import (
    EXIT_NO_HOST,
    EXIT_OK,
    AgentError,
    Server,
    error_reply,
    heartbeat_forever,
    load_function,
)
from spear_nb.communication.protocol import (
    DEFAULT_MAX_FRAME,
    Message,
    MessageType,
    pack,
    unpack,
)
from spear_nb.errors import PayloadTooLarge

_END = object()
# How long a started agent waits for its host to dial in before giving up.
CONNECT_WAIT = 120.0


class StreamWire:
    """The Wire interface of the agent, over one gRPC stream."""

    def __init__(self, frames: Iterator[Any], max_frame: int) -> None:
        self.frames = frames
        self.max_frame = max_frame
        self.outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def read(self) -> Message | None:
        try:
            frame = next(self.frames)
        except StopIteration:
            return None
        except Exception:  # the stream broke: the host is gone
            return None
        return unpack(frame.body)

    def write(self, message: Message) -> None:
        body = pack(message)
        if len(body) > self.max_frame:
            raise PayloadTooLarge(
                f"the {message.type.name.lower()} message is {len(body)} bytes, more "
                f"than the maximum frame size of {self.max_frame} bytes"
            )
        self.outbox.put(body)

    def replies(self) -> Iterator[bytes]:
        while True:
            body = self.outbox.get()
            if body is _END:
                return
            yield body


def serve(env: dict[str, str], script_fn: Callable[..., Any] | None) -> int:
    """Serve gRPC on SPEAR_GRPC_ADDRESS until one host session has ended."""
    if env.get("SPEAR_GRPC_DISABLED"):
        raise AgentError("gRPC is disabled by SPEAR_GRPC_DISABLED")
    try:
        from concurrent import futures

        import grpc

        from spear_nb.communication._grpc import spear_pb2, spear_pb2_grpc
        from spear_nb.communication.grpc_channel import channel_options
    except ImportError as exc:
        raise AgentError(f"gRPC is not installed here ({exc})") from exc

    address = env["SPEAR_GRPC_ADDRESS"]
    instance_id = env.get("SPEAR_INSTANCE_ID", "")
    secret = env.get("SPEAR_SECRET", "").encode()
    max_frame = int(env.get("SPEAR_MAX_FRAME", DEFAULT_MAX_FRAME))
    concurrency = int(env.get("SPEAR_CONCURRENCY", "1"))
    interval = float(env.get("SPEAR_HEARTBEAT", "0"))
    connected = threading.Event()
    finished = threading.Event()
    exit_code = [EXIT_OK]

    class Agent(spear_pb2_grpc.AgentServicer):
        def Connect(self, request_iterator: Iterator[Any], context: Any) -> Any:
            wire = StreamWire(request_iterator, max_frame)
            first = wire.read()
            if first is None or first.type is not MessageType.AUTH_REQUEST:
                return
            given = str(first.header("secret", "")).encode()
            if first.header("instance_id") != instance_id or not hmac.compare_digest(
                given, secret
            ):
                refusal = Message(MessageType.AUTH_RESPONSE, 0, b"wrong secret")
                refusal.headers = {"ok": False}
                yield spear_pb2.Frame(body=pack(refusal))
                return
            if connected.is_set():
                busy = Message(MessageType.AUTH_RESPONSE, 0, b"already connected")
                busy.headers = {"ok": False}
                yield spear_pb2.Frame(body=pack(busy))
                return
            connected.set()
            accepted = Message(MessageType.AUTH_RESPONSE, first.request_id)
            accepted.headers = {"ok": True}
            yield spear_pb2.Frame(body=pack(accepted))
            try:
                fn = load_function(first.payload, script_fn)
            except BaseException as exc:  # report any failure to load, then stop
                failure = error_reply(0, exc)
                failure.type = MessageType.ERROR
                yield spear_pb2.Frame(body=pack(failure))
                finished.set()
                return
            wire.write(Message(MessageType.SIGNAL, 0, b"", {"signal": "ready"}))
            stop = threading.Event()
            if interval > 0:
                threading.Thread(
                    target=heartbeat_forever,
                    args=(wire, interval, stop),
                    daemon=True,
                ).start()

            def run() -> None:
                server = Server(wire, fn, concurrency, threaded=True)
                exit_code[0] = server.serve()
                stop.set()
                wire.outbox.put(_END)

            threading.Thread(target=run, name="spear-agent-serve", daemon=True).start()
            for body in wire.replies():
                yield spear_pb2.Frame(body=body)
            finished.set()

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4), options=channel_options(max_frame)
    )
    spear_pb2_grpc.add_AgentServicer_to_server(Agent(), server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise AgentError(f"cannot serve gRPC on {address}: {exc}") from exc
    if port == 0:
        raise AgentError(f"cannot serve gRPC on {address}")
    server.start()
    try:
        if not connected.wait(CONNECT_WAIT):
            print("spear_nb agent: no host connected; exiting", file=sys.stderr)
            return EXIT_NO_HOST
        finished.wait()
    finally:
        server.stop(grace=0.5)
        if address.startswith("unix:"):
            with contextlib.suppress(OSError):
                os.unlink(address[len("unix:") :])
    return exit_code[0]
