"""The agent: the code inside an instance that answers execute requests.

It dials the host's address from its environment, authenticates with its instance
secret, loads the function named by the host's reply, and serves calls until the
host says stop or goes away. It uses blocking sockets and imports only the standard
library and msgpack until a call needs more, so that it connects within a few
milliseconds of being started.

Environment: SPEAR_INSTANCE_ID, SPEAR_SECRET, SPEAR_CHANNEL (unix or tcp),
SPEAR_ADDRESS (a socket path or host:port), SPEAR_MAX_FRAME, SPEAR_HOST_PID.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import socket
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import msgpack

from spear_nb.communication.protocol import (
    DEFAULT_MAX_FRAME,
    Message,
    MessageType,
)
from spear_nb.communication.wire import BusyPoll, Spread, Wire
from spear_nb.errors import PayloadTooLarge, ProtocolError

_AGENT_DIR = os.path.dirname(os.path.abspath(__file__))
_OK = {"status": "ok"}
_CANCELLED = {"status": "cancelled"}

EXIT_OK = 0
EXIT_NO_HOST = 3
EXIT_AUTH = 4
EXIT_LOAD = 5
EXIT_PROTOCOL = 6


class AgentError(Exception):
    """Raised inside the agent when it cannot go on; its message goes to stderr."""


class _Cancelled(BaseException):
    """Raised into a running function when the host cancels its call."""


class WireLike(Protocol):
    """What the server needs of a transport: read and write whole messages."""

    def read(self) -> Message | None: ...

    def write(self, message: Message) -> None: ...


def connect(env: dict[str, str]) -> socket.socket:
    """Dial the host's address from the environment."""
    kind = env.get("SPEAR_CHANNEL", "unix")
    address = env.get("SPEAR_ADDRESS", "")
    if not address:
        raise AgentError(
            "SPEAR_ADDRESS is not set: this program is meant to be started by a "
            "spear_nb session, not by hand"
        )
    try:
        if kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(address)
        elif kind == "tcp":
            host, _, port = address.rpartition(":")
            sock = socket.create_connection((host, int(port)))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            raise AgentError(f"the agent cannot dial a {kind!r} channel")
    except OSError as exc:
        raise AgentError(f"cannot reach the host at {kind}:{address}: {exc}") from exc
    return sock


def authenticate(wire: Wire, env: dict[str, str], fallback_reason: str = "") -> bytes:
    """Send the auth request; return the host's bootstrap payload."""
    request = Message(MessageType.AUTH_REQUEST, 0)
    request.headers = {
        "instance_id": env.get("SPEAR_INSTANCE_ID", ""),
        "secret": env.get("SPEAR_SECRET", ""),
        "pid": os.getpid(),
    }
    if fallback_reason:
        request.headers["fallback_reason"] = fallback_reason
    wire.write(request)
    reply = wire.read()
    if reply is None:
        raise AgentError("the host closed the connection during authentication")
    if reply.type is not MessageType.AUTH_RESPONSE or not reply.header("ok"):
        raise AgentError(
            "the host refused this instance: "
            + reply.payload.decode("utf-8", "replace")
        )
    return reply.payload


def die_with_parent(host_pid: int) -> None:
    """Ask Linux to kill this process when the host dies (best effort)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if host_pid and os.getppid() != host_pid:
        raise AgentError("the host exited while this instance was starting")


def name_process(instance_id: str) -> None:
    """Give this process the short name ``ps -e`` and ``top`` show: ``spear:`` and
    the instance id, cut to Linux's 15 characters (best effort)."""
    if not instance_id or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_name = 15
        libc.prctl(pr_set_name, f"spear:{instance_id}".encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def load_function(bootstrap: bytes, script_fn: Callable[..., Any] | None) -> Any:
    """Turn the host's bootstrap payload into the function to serve."""
    spec = msgpack.unpackb(bootstrap, raw=False)
    kind = spec.get("kind")
    if kind == "callable":
        return pickle.loads(spec["code"])
    if kind == "handler":
        import importlib

        module_name, _, attribute = spec["target"].partition(":")
        module = importlib.import_module(module_name)
        fn = module
        for part in attribute.split("."):
            fn = getattr(fn, part)
        return fn
    if kind == "script":
        if script_fn is None:
            raise AgentError("the script did not pass a function to serve()")
        return script_fn
    raise AgentError(f"the host asked for an unknown artifact kind {kind!r}")


class Server:
    """Serves execute requests.

    With a concurrency of 1 (the default) calls run inline on the main thread, the
    fastest path; the host cancels one with SIGUSR1. With more, the main thread
    reads and a thread pool runs the calls, replying in whatever order they end;
    a cancel signal message interrupts the worker thread running that call.
    """

    def __init__(
        self,
        wire: WireLike,
        fn: Callable[..., Any],
        concurrency: int = 1,
        threaded: bool = False,
    ) -> None:
        self.wire = wire
        self.fn = fn
        self.current = 0  # request id of the inline call running now, 0 when idle
        self.cancelled = 0
        self.pool: Any = None
        self.threads: dict[int, int] = {}  # request id -> worker thread ident
        # gRPC: calls the host cancelled that run on the main thread; the signal
        # the agent then sends itself raises in the call only if it is one.
        self.cancel_wanted: set[int] = set()
        self.batch = wire if isinstance(wire, Wire) else None
        # The direct lane: a second connection on which the host's calling
        # thread sends calls itself (see spear_nb.communication.lane).
        self.lane: Wire | None = None
        self.busy_poll = 0.0  # seconds to poll for the next call before sleeping
        self._poller: BusyPoll | None = None
        self.spread = Spread()  # keeps the main thread off its polling caller's CPU
        if concurrency > 1 or threaded:
            from concurrent.futures import ThreadPoolExecutor

            workers = min(max(concurrency, 1), 64)
            self.pool = ThreadPoolExecutor(workers, "spear-agent")

    def on_cancel_signal(self, signum: int, frame: Any) -> None:
        if self.current and self.current != self.cancelled:
            self.cancelled = self.current
            raise _Cancelled()

    def on_main_cancel_signal(self, signum: int, frame: Any) -> None:
        """SIGUSR1 in gRPC mode: the main thread's call stops only if the host
        asked to cancel that very call (other calls run in the pool)."""
        if self.current in self.cancel_wanted:
            self.on_cancel_signal(signum, frame)

    def serve(self) -> int:
        batch = self.batch
        try:
            while True:
                if batch is not None and batch.holding and not batch.buffered_frame():
                    batch.flush()  # nothing more queued: send what was held back
                if self.lane is not None and self.serve_lane():
                    continue
                message = self.wire.read()
                if message is None:
                    return EXIT_NO_HOST
                if (
                    message.type is MessageType.EXECUTE_REQUEST
                    and self.pool is None
                    and batch is not None
                    and batch.buffered_frame()
                ):
                    batch.hold()  # more requests wait: answer them all at once
                if self.dispatch(message):
                    return EXIT_OK
        finally:
            self.shutdown()

    def serve_lane(self) -> bool:
        """Wait for the channel or the lane; serve one lane call if it is first.

        Returns False when the channel has a message to read instead.
        """
        lane = self.lane
        assert lane is not None and isinstance(self.wire, Wire)
        if not lane.buffered_frame():
            if self.wire.buffered_frame():
                return False
            spin = self._poller
            if spin is None:
                poller = select.poll()
                poller.register(self.wire.sock, select.POLLIN)
                poller.register(lane.sock, select.POLLIN)
                spin = self._poller = BusyPoll(poller, self.busy_poll)
            ready = spin.wait() or spin.poller.poll()
            if not any(fd == lane.sock.fileno() for fd, _ in ready):
                return False
        try:
            message = lane.read()
        except (OSError, ProtocolError):
            message = None
        if message is None or message.type is not MessageType.EXECUTE_REQUEST:
            # The host closed the lane (or broke it): calls go on over the channel.
            self.lane = None
            self._poller = None
            lane.sock.close()
            return True
        self.execute(message, lane)
        self.keep_apart(message)
        return True

    def keep_apart(self, request: Message) -> None:
        """After a call on the main thread: if the host polls on this CPU (it says
        so now and then) and so does this agent (it polls while it has a lane),
        move to another CPU."""
        cpu = request.header("cpu")
        if cpu is not None and self.busy_poll and self.lane is not None:
            self.spread.check(cpu)

    def dispatch(self, message: Message) -> bool:
        """Act on one message from the host; return True when told to stop."""
        kind = message.type
        if kind is MessageType.EXECUTE_REQUEST:
            if self.pool is not None:
                self.pool.submit(self.execute, message)
            else:
                self.execute(message)
                self.keep_apart(message)
        elif kind is MessageType.HEARTBEAT:
            if not message.header("reply"):
                self.wire.write(Message(MessageType.HEARTBEAT, message.request_id))
        elif kind is MessageType.SIGNAL:
            if message.header("signal") == "cancel":
                self.cancel_thread(message.request_id)
        elif kind is MessageType.CLOSE:
            return True
        return False

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def cancel_thread(self, rid: int) -> None:
        """Raise _Cancelled in the thread running call ``rid``, if any (once: a
        repeated cancel finds nothing to do).

        The main thread gets a signal, which also breaks a blocking C call
        (``time.sleep``, a socket read); a worker thread gets the exception at
        its next Python instruction.
        """
        if rid and rid == self.current and self.pool is not None:
            if rid not in self.cancel_wanted:
                self.cancel_wanted.add(rid)
                signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1)
            return
        ident = self.threads.pop(rid, None)
        if ident is None:
            return
        import ctypes

        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(ident), ctypes.py_object(_Cancelled)
        )

    def execute(
        self, request: Message, wire: WireLike | None = None, on_main: bool = False
    ) -> None:
        """Run one call and reply on ``wire`` (the channel unless told otherwise).

        ``on_main``: on the main thread although there is a pool (gRPC's lone
        call), so cancelled by a signal rather than in its thread.
        """
        rid = request.request_id
        reply: Message
        pooled = self.pool is not None and not on_main
        try:
            if pooled:
                self.threads[rid] = threading.get_ident()
            else:
                self.current = rid
            try:
                args, kwargs = pickle.loads(request.payload)
                result = self.fn(*args, **kwargs)
                if request.header("mode") == "stream":
                    result = self.stream(rid, result)
                payload = dumps(result)
            finally:
                self.current = 0
                if pooled:
                    self.threads.pop(rid, None)
                else:
                    self.cancel_wanted.discard(rid)
            reply = Message(MessageType.EXECUTE_RESPONSE, rid, payload, _OK)
        except _Cancelled:
            self.threads.pop(rid, None)
            reply = Message(MessageType.EXECUTE_RESPONSE, rid, b"", _CANCELLED)
        except (Exception, SystemExit, KeyboardInterrupt) as exc:
            # sys.exit() or a KeyboardInterrupt the function raised itself is its
            # error, like any other: the instance stays up (the host cancels with
            # _Cancelled, and SIGINT is ignored here).
            reply = error_reply(rid, exc)
        try:
            self.send_reply(reply, wire)
        except _Cancelled:  # a late cancel signal while replying
            self.send_reply(reply, wire)

    def send_reply(self, reply: Message, wire: WireLike | None = None) -> None:
        """Send a reply; one too large to send becomes an error reply instead."""
        out = self.wire if wire is None else wire
        try:
            out.write(reply)
        except PayloadTooLarge as exc:
            out.write(error_reply(reply.request_id, exc))

    def stream(self, rid: int, result: Any) -> int:
        """Send each item of an iterator as a stream chunk; return the count."""
        if not isinstance(result, Iterator) and not hasattr(result, "__iter__"):
            kind = type(result).__name__
            raise TypeError(f"a streamed function must return an iterator, not {kind}")
        count = 0
        for item in result:
            self.wire.write(Message(MessageType.STREAM_DATA, rid, dumps(item)))
            count += 1
        return count


def dumps(value: Any) -> bytes:
    """Pickle a value, falling back to cloudpickle for things pickle refuses."""
    try:
        return pickle.dumps(value, protocol=5)
    except (pickle.PicklingError, TypeError, AttributeError):
        if isinstance(value, (types.GeneratorType, types.AsyncGeneratorType)):
            raise TypeError(
                f"the function returned a {type(value).__name__}, which cannot be "
                "sent back; to get its items as they come, call it with "
                "session.stream(...) (or astream), or return a list of them"
            ) from None
        import cloudpickle

        try:
            return cloudpickle.dumps(value, protocol=5)
        except Exception as exc:
            # Raised without the pickler's frames: they say nothing useful.
            raise TypeError(
                f"the function returned a {type(value).__qualname__} that cannot be "
                f"pickled to send back ({exc}); return plain data instead, for "
                "example the values you need from it"
            ) from None


def error_reply(rid: int, exc: BaseException) -> Message:
    """An execute response that carries an exception and its traceback."""
    try:
        message = str(exc)
    except Exception:  # an exception whose __str__ fails still gets reported
        message = f"<{type(exc).__qualname__}: str() failed>"
    # The agent's own frames say nothing about the user's code: skip them.
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_AGENT_DIR):
        tb = tb.tb_next
    frames = [
        [f.filename, f.lineno or 0, f.name, f.line or ""]
        for f in traceback.extract_tb(tb)
    ]
    body = msgpack.packb(
        {
            "type": type(exc).__qualname__,
            "message": message,
            "traceback": "".join(traceback.format_exception(type(exc), exc, tb)),
            "frames": frames,
        },
        use_bin_type=True,
    )
    return Message(MessageType.EXECUTE_RESPONSE, rid, body, {"status": "error"})


def run(script_fn: Callable[..., Any] | None = None) -> int:
    """Connect, authenticate, load the function and serve; return the exit code."""
    env = dict(os.environ)
    name_process(env.get("SPEAR_INSTANCE_ID", ""))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The host interrupts inline calls with SIGUSR1 (the gRPC agent sends it to
    # itself); until a server installs its handler it is ignored.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    fallback_reason = ""
    if env.get("SPEAR_GRPC_ADDRESS"):
        try:
            die_with_parent(int(env.get("SPEAR_HOST_PID", "0")))
            from spear_nb.agent import _grpc_serve

            return _grpc_serve.serve(env, script_fn)
        except AgentError as exc:
            if not env.get("SPEAR_ADDRESS"):
                print(f"spear_nb agent: {exc}", file=sys.stderr)
                return EXIT_AUTH
            fallback_reason = f"grpc: {exc}"
            print(f"spear_nb agent: {exc}; dialling the host", file=sys.stderr)
    try:
        max_frame = int(env.get("SPEAR_MAX_FRAME", DEFAULT_MAX_FRAME))
        wire = Wire(connect(env), max_frame)
        bootstrap = authenticate(wire, env, fallback_reason)
        die_with_parent(int(env.get("SPEAR_HOST_PID", "0")))
    except AgentError as exc:
        print(f"spear_nb agent: {exc}", file=sys.stderr)
        return EXIT_AUTH
    interval = float(env.get("SPEAR_HEARTBEAT", "0"))
    stop = threading.Event()
    if interval > 0:
        # The host hears from us even while a long call blocks the main thread;
        # if it hears nothing (we are stopped or hung) it replaces this instance.
        beat = threading.Thread(
            target=heartbeat_forever, args=(wire, interval, stop), daemon=True
        )
        beat.start()
    try:
        fn = load_function(bootstrap, script_fn)
    except BaseException as exc:  # report any failure to load, then stop
        failure = error_reply(0, exc)
        failure.type = MessageType.ERROR
        # Said before the host hears it: then it may stop this process.
        print(
            f"spear_nb agent: cannot load the function: {exc!r}",
            file=sys.stderr,
            flush=True,
        )
        wire.write(failure)
        stop.set()
        return EXIT_LOAD
    concurrency = int(env.get("SPEAR_CONCURRENCY", "1"))
    lane = None
    if env.get("SPEAR_DIRECT") == "1" and concurrency <= 1:
        lane = open_lane(env, max_frame)  # before "ready": the first call may use it
    wire.write(Message(MessageType.SIGNAL, 0, b"", {"signal": "ready"}))
    server = Server(wire, fn, concurrency)
    server.lane = lane
    server.busy_poll = float(env.get("SPEAR_BUSY_POLL_US", "0")) * 1e-6
    signal.signal(signal.SIGUSR1, server.on_cancel_signal)
    try:
        return server.serve()
    except (ConnectionError, OSError):
        return EXIT_NO_HOST
    except ProtocolError as exc:
        print(f"spear_nb agent: the host broke the protocol: {exc}", file=sys.stderr)
        return EXIT_PROTOCOL
    finally:
        stop.set()


def open_lane(env: dict[str, str], max_frame: int) -> Wire | None:
    """Dial the host a second time for its direct lane; None if that fails.

    The lane is an optimisation: without it every call comes over the channel.
    """
    try:
        lane = Wire(connect(env), max_frame)
        request = Message(MessageType.AUTH_REQUEST, 0)
        request.headers = {
            "instance_id": env.get("SPEAR_INSTANCE_ID", ""),
            "secret": env.get("SPEAR_SECRET", ""),
            "pid": os.getpid(),
            "lane": True,
        }
        lane.write(request)
        reply = lane.read()
    except (AgentError, OSError, ProtocolError) as exc:
        print(f"spear_nb agent: no direct lane ({exc})", file=sys.stderr)
        return None
    if reply is None or not reply.header("ok"):
        print("spear_nb agent: the host refused the direct lane", file=sys.stderr)
        lane.sock.close()
        return None
    return lane


def heartbeat_forever(wire: WireLike, interval: float, stop: threading.Event) -> None:
    """Send a heartbeat every ``interval`` seconds until ``stop`` is set."""
    beat = Message(MessageType.HEARTBEAT, 0, b"", {"reply": True})
    while not stop.wait(interval):
        try:
            beat.timestamp = time.time()
            wire.write(beat)
        except OSError:
            return
