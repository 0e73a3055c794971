"""The agent as a gRPC server: the host dials it (pods, or ``channel="grpc"``).

The host opens one ``Agent.Connect`` stream; its first frame is the auth request
carrying the instance id, the secret and the function to load. After that the
stream carries exactly what a socket channel carries, served by the same
:class:`~spear_nb.agent._serve.Server`. The stream is read and written on an
asyncio loop (grpc.aio) in a thread of its own, so the stream keeps being read
while calls run, heartbeats go on and a cancel can reach a running call. A lone
call runs on the main thread, where a cancel (a signal the agent sends itself)
breaks even a blocking C call; calls beside it run in the server's thread pool.
The loop waits a moment for the lone call's reply, looking busily at first, so
that a quick one goes back without a second thread wake-up. The loop is uvloop's
when it is installed, as on the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from spear_nb._bridge import new_event_loop
from spear_nb.agent._serve import (
    EXIT_LOAD,
    EXIT_NO_HOST,
    EXIT_OK,
    AgentError,
    Server,
    _Cancelled,
    error_reply,
    heartbeat_forever,
    load_function,
)
from spear_nb.communication.protocol import (
    DEFAULT_MAX_FRAME,
    Message,
    MessageType,
    pack,
    too_large,
    unpack,
)
from spear_nb.communication.wire import BusyWait

_END = object()
# How long a started agent waits for its host to dial in before giving up.
CONNECT_WAIT = 120.0
# How long the loop waits, blocked, for the reply of a lone call that it has
# handed to the main thread. A reply that comes within it is written at once,
# without waking the loop (a thread wake-up costs tens of microseconds here); a
# later one comes through the outbox. Heartbeats and cancels wait at most this.
HANDOFF_WAIT = 0.001


class LoopWire:
    """The Wire interface of the agent over one gRPC stream on an event loop.

    Requests are read on the loop and handed to the main thread or the pool; replies
    may be written from any thread and are queued for the stream on the loop. A
    reply the loop is waiting for (see :meth:`wait_for_reply`) is handed to it
    directly instead.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, max_frame: int, busy_wait: float = 0.0
    ) -> None:
        self.loop = loop
        self.max_frame = max_frame
        self.outbox: asyncio.Queue[Any] = asyncio.Queue()
        self._loop_thread = threading.get_ident()
        self._lock = threading.Lock()
        self._awaited = 0  # request id whose reply the loop is waiting for
        self._handed: bytes | None = None
        # Held while the loop waits; the reply's writer releases it.
        self._handed_over = threading.Lock()
        self._handed_over.acquire()
        # Looks for the reply before blocking on it (see BusyWait): a thread
        # woken from sleep answers tens of microseconds later.
        self._look = BusyWait(lambda: self._handed_over.acquire(False), busy_wait)

    def read(self) -> Message | None:  # the loop reads; the server never calls this
        raise NotImplementedError

    def write(self, message: Message) -> None:
        body = pack(message)
        if len(body) > self.max_frame:
            raise too_large(message, len(body), self.max_frame)
        if (
            self._awaited
            and message.request_id == self._awaited
            and message.type is MessageType.EXECUTE_RESPONSE
        ):
            with self._lock:
                if self._awaited == message.request_id:
                    self._awaited = 0
                    self._handed = body
                    self._handed_over.release()
                    return
        self.put(body)

    def expect_reply(self, rid: int) -> None:
        """Keep the reply to call ``rid`` for :meth:`wait_for_reply`."""
        self._handed_over.acquire(False)  # held, even after a wait that ended
        self._awaited = rid

    def wait_for_reply(self, timeout: float) -> bytes | None:
        """Block up to ``timeout`` for the reply named by :meth:`expect_reply`
        (another thread runs the call meanwhile). None if it has not come by
        then: it goes through the outbox when it does."""
        if not self._look.wait() and not self._handed_over.acquire(True, timeout):
            with self._lock:
                self._awaited = 0
        body, self._handed = self._handed, None
        return body

    def put(self, item: Any) -> None:
        if threading.get_ident() == self._loop_thread:
            self.outbox.put_nowait(item)
        else:
            with contextlib.suppress(RuntimeError):  # the loop has ended
                self.loop.call_soon_threadsafe(self.outbox.put_nowait, item)


class LoneRunner:
    """The main thread, serving the lone call: quicker to hand a call to than
    the pool, and interruptible by a signal even in a blocking C call (a cancel
    raises in ``time.sleep`` there; it cannot in a worker thread). ``idle`` says
    whether it is free for the next call; busy, calls go to the pool."""

    def __init__(self) -> None:
        self.idle = True
        self.server: Server | None = None  # set once the host has connected
        self._jobs: queue.SimpleQueue[Message | None] = queue.SimpleQueue()

    def submit(self, message: Message) -> None:
        self.idle = False
        self._jobs.put(message)

    def stop(self) -> None:
        self._jobs.put(None)

    def serve(self) -> None:
        """Run calls on this (the main) thread until :meth:`stop`."""
        while True:
            message = self._jobs.get()
            if message is None:
                return
            try:
                if self.server is not None:
                    self.server.execute(message, on_main=True)
            except _Cancelled:  # a cancel that came as the call was ending
                pass
            finally:
                self.idle = True

    def on_signal(self, signum: int, frame: Any) -> None:
        if self.server is not None:
            self.server.on_main_cancel_signal(signum, frame)


def serve(env: dict[str, str], script_fn: Callable[..., Any] | None) -> int:
    """Serve gRPC on SPEAR_GRPC_ADDRESS until one host session has ended.

    The stream is served on an event loop in a thread of its own; this (the main)
    thread runs the lone call, see :class:`LoneRunner`.
    """
    if env.get("SPEAR_GRPC_DISABLED"):
        raise AgentError("gRPC is disabled by SPEAR_GRPC_DISABLED")
    try:
        # As on the host (see grpc_channel): the function may fork.
        os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
        import grpc
        import grpc.aio

        from spear_nb.communication._grpc import spear_pb2, spear_pb2_grpc
        from spear_nb.communication.grpc_channel import channel_options
    except ImportError as exc:
        raise AgentError(f"gRPC is not installed here ({exc})") from exc
    runner = LoneRunner()
    signal.signal(signal.SIGUSR1, runner.on_signal)
    outcome: list[int | BaseException] = []

    def serve_stream() -> None:
        try:
            coroutine = _serve(
                env, script_fn, grpc, spear_pb2, spear_pb2_grpc, channel_options, runner
            )
            outcome.append(_run(coroutine))
        except BaseException as exc:  # handed to the main thread
            outcome.append(exc)
        if not runner.idle:
            # The host is gone and a call still runs on the main thread: it
            # has no one to answer to, so do not wait for it.
            code = outcome[0] if isinstance(outcome[0], int) else EXIT_NO_HOST
            sys.stderr.flush()
            os._exit(code)
        runner.stop()

    thread = threading.Thread(target=serve_stream, name="spear-agent-grpc")
    thread.start()
    runner.serve()
    thread.join()
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    return result


def _run(coroutine: Coroutine[Any, Any, int]) -> int:
    """Run the server to its end on a loop of its own (uvloop's if installed)."""
    if sys.version_info < (3, 11):  # no asyncio.Runner: asyncio's own loop
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coroutine)


async def _serve(
    env: dict[str, str],
    script_fn: Callable[..., Any] | None,
    grpc: Any,
    spear_pb2: Any,
    spear_pb2_grpc: Any,
    channel_options: Callable[[int], list[tuple[str, Any]]],
    runner: LoneRunner,
) -> int:
    address = env["SPEAR_GRPC_ADDRESS"]
    instance_id = env.get("SPEAR_INSTANCE_ID", "")
    # A pod's spec, which anyone who may read pods can see, carries only the
    # secret's SHA-256; a local process gets the secret itself.
    secret_digest = env.get("SPEAR_SECRET_SHA256", "")
    secret = env.get("SPEAR_SECRET", "").encode()

    def secret_matches(given: bytes) -> bool:
        if secret_digest:
            digest = hashlib.sha256(given).hexdigest()
            return hmac.compare_digest(digest.encode(), secret_digest.encode())
        return bool(secret) and hmac.compare_digest(given, secret)

    max_frame = int(env.get("SPEAR_MAX_FRAME", DEFAULT_MAX_FRAME))
    concurrency = int(env.get("SPEAR_CONCURRENCY", "1"))
    interval = float(env.get("SPEAR_HEARTBEAT", "0"))
    busy_wait = float(env.get("SPEAR_BUSY_POLL_US", "0")) * 1e-6
    loop = asyncio.get_running_loop()
    connected = asyncio.Event()
    finished = asyncio.Event()
    exit_code = [EXIT_OK]

    def refusal(reason: bytes) -> Any:
        message = Message(MessageType.AUTH_RESPONSE, 0, reason)
        message.headers = {"ok": False}
        return spear_pb2.Frame(body=pack(message))

    class Agent(spear_pb2_grpc.AgentServicer):
        async def Connect(self, request_iterator: Any, context: Any) -> None:
            try:
                first_frame = await context.read()
            except Exception:
                return
            if first_frame is grpc.aio.EOF:
                return
            first = unpack(first_frame.body)
            if first.type is not MessageType.AUTH_REQUEST:
                return
            given = str(first.header("secret", "")).encode()
            if first.header("instance_id") != instance_id or not secret_matches(given):
                await context.write(refusal(b"wrong secret"))
                return
            if connected.is_set():
                await context.write(refusal(b"already connected"))
                return
            connected.set()
            accepted = Message(MessageType.AUTH_RESPONSE, first.request_id)
            accepted.headers = {"ok": True}
            await context.write(spear_pb2.Frame(body=pack(accepted)))
            try:
                # Loading may import heavy modules: keep the loop answering.
                fn = await loop.run_in_executor(
                    None, load_function, first.payload, script_fn
                )
            except BaseException as exc:  # report any failure to load, then stop
                failure = error_reply(0, exc)
                failure.type = MessageType.ERROR
                # Said before the host hears it: then it may stop this process.
                print(
                    f"spear_nb agent: cannot load the function: {exc!r}",
                    file=sys.stderr,
                    flush=True,
                )
                await context.write(spear_pb2.Frame(body=pack(failure)))
                exit_code[0] = EXIT_LOAD
                finished.set()
                return
            wire = LoopWire(loop, max_frame, busy_wait)
            stop = threading.Event()
            if interval > 0:
                threading.Thread(
                    target=heartbeat_forever, args=(wire, interval, stop), daemon=True
                ).start()
            server = Server(wire, fn, concurrency, threaded=True)
            await context.write(
                spear_pb2.Frame(
                    body=pack(Message(MessageType.SIGNAL, 0, b"", {"signal": "ready"}))
                )
            )

            lock = asyncio.Lock()
            runner.server = server

            async def send(body: bytes) -> None:
                async with lock:
                    await context.write(spear_pb2.Frame(body=body))

            async def read_all() -> None:
                code = EXIT_NO_HOST
                try:
                    while True:
                        frame = await context.read()
                        if frame is grpc.aio.EOF:
                            break
                        message = unpack(frame.body)
                        if (
                            message.type is MessageType.EXECUTE_REQUEST
                            and runner.idle
                            and not server.threads
                        ):
                            # A lone call: to the main thread.
                            if message.header("mode") == "stream":
                                # Its chunks go through the outbox, and so
                                # must its reply, after them.
                                runner.submit(message)
                                continue
                            wire.expect_reply(message.request_id)
                            runner.submit(message)
                            body = wire.wait_for_reply(HANDOFF_WAIT)
                            if body is not None:
                                await send(body)
                            continue
                        if server.dispatch(message):
                            code = EXIT_OK
                            break
                except Exception:  # the stream broke: the host is gone
                    pass
                exit_code[0] = code
                wire.put(_END)

            reader = loop.create_task(read_all())
            try:
                while True:
                    body = await wire.outbox.get()
                    if body is _END:
                        break
                    await send(body)
            finally:
                stop.set()
                reader.cancel()
                server.shutdown()
                finished.set()

    server = grpc.aio.server(options=channel_options(max_frame))
    spear_pb2_grpc.add_AgentServicer_to_server(Agent(), server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise AgentError(f"cannot serve gRPC on {address}: {exc}") from exc
    if port == 0:
        raise AgentError(f"cannot serve gRPC on {address}")
    await server.start()
    if address.startswith("unix:"):
        # Owner-only, like the host's socket (the directory is 0700 as well).
        os.chmod(address[len("unix:") :], 0o600)
    try:
        try:
            await asyncio.wait_for(connected.wait(), CONNECT_WAIT)
        except asyncio.TimeoutError:
            print("spear_nb agent: no host connected; exiting", file=sys.stderr)
            return EXIT_NO_HOST
        await finished.wait()
    finally:
        await server.stop(0.5)
        if address.startswith("unix:"):
            with contextlib.suppress(OSError):
                os.unlink(address[len("unix:") :])
    return exit_code[0]
