"""The process runtime: each instance is a local OS process.

Python callables, handlers and scripts run in a long-lived agent process that dials
the host's channel and serves many calls. Commands run as one process per call, fed
the payload on stdin; their instance is a warm slot that limits how many run at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.machinery
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import msgpack
import psutil

from spear_nb.communication.channel import Channel
from spear_nb.communication.factory import MAX_UNIX_PATH
from spear_nb.communication.lane import DirectLane, LaneLost, LaneTimeout
from spear_nb.communication.protocol import Message, MessageType
from spear_nb.communication.stream import StreamChannel
from spear_nb.errors import (
    ChannelError,
    CommandFailed,
    ExecutionTimeout,
    InstanceCrashed,
    InstanceStartFailed,
    InvalidArguments,
    InvalidSpec,
    PayloadTooLarge,
    SpearError,
)
from spear_nb.execution.model import (
    ArtifactKind,
    ArtifactSpec,
    Execution,
    Health,
    InstanceStatus,
    InvokeFunctionRequest,
    RuntimeType,
    TaskInstance,
)
from spear_nb.execution.spec import PROCESS_OPTIONS, unknown_keywords
from spear_nb.runtime._agentcall import call_agent, decode_reply, dumps_arguments
from spear_nb.runtime.base import Runtime, RuntimeContext
from spear_nb.runtime.zygote import Zygote

logger = logging.getLogger(__name__)
# The directory that holds the spear_nb package (this is spear_nb/runtime/...).
_PACKAGE_ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)

STDERR_TAIL = 2000
# register(..., pipeline=True): up to max_concurrency calls in flight to one
# instance, run one after another on its main thread (cheapest per call for quick
# functions); without it they run in a thread pool of that size.


@dataclasses.dataclass(eq=False)
class ProcessHandle:
    """The OS side of an agent instance: forked by the zygote or spawned."""

    pid: int
    log_path: str
    exited: asyncio.Future[int]
    popen: subprocess.Popen[bytes] | None = None
    pidfd: int = -1

    @property
    def forked(self) -> bool:
        return self.popen is None


@dataclasses.dataclass(eq=False)
class CommandHandle:
    """A command instance: the processes of the calls running now."""

    running: set[asyncio.subprocess.Process] = dataclasses.field(default_factory=set)
    launched: int = 0


def read_tail(path: str, limit: int = STDERR_TAIL) -> str:
    """The last ``limit`` characters of a log file, or '' if there is none."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class ProcessRuntime(Runtime):
    """Runs instances as local processes."""

    type = RuntimeType.PROCESS

    def __init__(self, context: RuntimeContext) -> None:
        super().__init__(context)
        self._zygote: Zygote | None = None

    async def close(self) -> None:
        if self._zygote is not None:
            await self._zygote.close()
            self._zygote = None

    # -- registration ------------------------------------------------------------

    def validate(self, spec: ArtifactSpec) -> None:
        unknown = sorted(set(dict(spec.options)) - PROCESS_OPTIONS)
        if unknown:
            raise unknown_keywords(unknown, "process", sorted(PROCESS_OPTIONS))
        if spec.cwd and not os.path.isdir(spec.cwd):
            raise InvalidSpec(
                f"cwd={spec.cwd!r} is not a directory (relative to "
                f"{os.getcwd()}); pass the directory the function should run in"
            )
        if spec.kind is ArtifactKind.COMMAND:
            if not spec.command:
                raise InvalidSpec("a command needs at least the program to run")
            if spec.channel:
                raise InvalidSpec(
                    "a command reads stdin and writes stdout; it takes no channel type"
                )
            return
        if spec.kind is ArtifactKind.SCRIPT and not os.path.isfile(spec.target):
            raise InvalidSpec(f"the script {spec.target!r} does not exist")
        if spec.kind is ArtifactKind.HANDLER:
            if ":" not in spec.target:
                raise InvalidSpec(
                    f"a handler is 'package.module:function', got {spec.target!r}"
                )
            if not self.context.config.python:  # else its path is not known here
                _check_handler_module(spec)
        if spec.kind not in (
            ArtifactKind.CALLABLE,
            ArtifactKind.HANDLER,
            ArtifactKind.SCRIPT,
        ):
            raise InvalidSpec(f"the process runtime cannot run a {spec.kind.value}")
        if spec.channel and spec.channel not in ("unix", "tcp", "grpc"):
            raise InvalidSpec(
                f"the process runtime cannot use a {spec.channel!r} channel; "
                "use 'unix', 'tcp' or 'grpc'"
            )
        if spec.channel == "grpc":
            try:
                import spear_nb.communication.grpc_channel  # noqa: F401
            except ImportError:
                raise InvalidSpec(
                    "channel='grpc' needs grpcio: pip install 'spear_nb[grpc]'"
                ) from None
        if self._can_fork(spec):
            self._ensure_zygote()  # warm it up before the first call needs it

    def uses_channel(self, instance: TaskInstance) -> bool:
        return instance.task.artifact.spec.kind is not ArtifactKind.COMMAND

    # -- start -------------------------------------------------------------------

    async def start_instance(self, instance: TaskInstance) -> None:
        spec = instance.task.artifact.spec
        if spec.kind is ArtifactKind.COMMAND:
            instance.handle = CommandHandle()
            instance.channel_type = "stdio"
            return
        ctx = self.context
        factory = ctx.factory
        types = factory.strategy("process", spec.channel)
        dial_out = types[0] == "grpc"
        bootstrap = self._bootstrap(spec)
        env = await factory.listen_for(
            instance.instance_id,
            instance.secret,
            bootstrap,
            tuple(t for t in types if t != "grpc"),
            standby=dial_out,
        )
        instance.channel_type = env["SPEAR_CHANNEL"]
        if dial_out:
            env["SPEAR_GRPC_ADDRESS"] = grpc_address(ctx.workdir, instance.instance_id)
        handle = await self._spawn(instance, spec, env)
        instance.handle = handle
        timeout = instance.task.settings.start_timeout
        try:
            if dial_out:
                channel = await self._dial_grpc(
                    instance, env["SPEAR_GRPC_ADDRESS"], bootstrap, timeout
                )
            else:
                channel = await factory.wait_connected(
                    instance.instance_id,
                    timeout,
                    handle.exited,  # type: ignore[arg-type]
                )
            instance.channel_type = channel.type.value
            waiters: set[asyncio.Future[Any]] = {
                channel.expect_ready(),
                handle.exited,
            }
            done, _ = await asyncio.wait(
                waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            ready = channel.expect_ready()
            if ready in done:
                ready.result()
                channel.on_lost(
                    lambda lost: self.context.on_instance_lost(
                        instance, f"its channel was lost: {lost.close_reason}"
                    )
                )
                factory.set_busy_check(instance.instance_id, _BusyCheck(handle.pid))
            elif not done:
                raise InstanceStartFailed(
                    f"instance {instance.instance_id} did not load its function "
                    f"within {timeout:g} s"
                )
            else:
                raise InstanceStartFailed(
                    f"instance {instance.instance_id} exited before it was ready"
                )
        except SpearError as exc:
            await self.stop_instance(instance)
            raise self._start_failure(instance, exc) from exc

    async def _dial_grpc(
        self, instance: TaskInstance, address: str, bootstrap: bytes, timeout: float
    ) -> Channel:
        """Dial the agent's gRPC server; take its dial-in instead if it fell back."""
        from spear_nb.communication.grpc_channel import GrpcChannel

        factory = self.context.factory
        handle = instance.handle
        assert isinstance(handle, ProcessHandle)
        grpc_channel = GrpcChannel(
            instance.instance_id, address, self.context.config.max_frame_size
        )
        loop = asyncio.get_running_loop()
        dialing = loop.create_task(
            grpc_channel.connect(instance.secret, bootstrap, timeout)
        )
        dial_in = factory.expectation(instance.instance_id)
        waiters: set[asyncio.Future[Any]] = {dialing, dial_in, handle.exited}
        done, _ = await asyncio.wait(
            waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if dialing in done and dialing.exception() is None:
            factory.adopt(instance.instance_id, grpc_channel)
            return grpc_channel
        dialing.cancel()
        with contextlib.suppress(BaseException):
            await dialing
        if dial_in in done:
            channel = dial_in.result()
            reason = str(channel.peer_info.get("fallback_reason", "grpc failed"))
            factory.fell_back(instance.instance_id, channel, [reason])
            return channel
        if dialing in done:
            error = dialing.exception()
            assert error is not None
            raise InstanceStartFailed(
                f"instance {instance.instance_id} could not be reached over gRPC: "
                f"{error}"
            ) from error
        if handle.exited.done():
            raise InstanceStartFailed(
                f"instance {instance.instance_id} exited before connecting"
            )
        raise InstanceStartFailed(
            f"instance {instance.instance_id} did not connect within {timeout:g} s"
        )

    def _bootstrap(self, spec: ArtifactSpec) -> bytes:
        if spec.kind is ArtifactKind.CALLABLE:
            body: dict[str, Any] = {"kind": "callable", "code": spec.code}
        elif spec.kind is ArtifactKind.HANDLER:
            body = {"kind": "handler", "target": spec.target}
        else:
            body = {"kind": "script"}
        return msgpack.packb(body, use_bin_type=True)

    def _environment(
        self, instance: TaskInstance, spec: ArtifactSpec, channel_env: dict[str, str]
    ) -> tuple[dict[str, str], str]:
        """The environment and working directory of an instance."""
        env = dict(os.environ)
        env.update(dict(spec.env))
        env.update(channel_env)
        env.update(
            {
                "SPEAR_INSTANCE_ID": instance.instance_id,
                "SPEAR_SECRET": instance.secret,
                "SPEAR_MAX_FRAME": str(self.context.config.max_frame_size),
                "SPEAR_HOST_PID": str(os.getpid()),
                "SPEAR_HEARTBEAT": str(self.context.config.heartbeat_interval),
                # Pipelined calls share one thread in the instance, in order.
                "SPEAR_CONCURRENCY": (
                    "1" if spec.option("pipeline") else str(instance.capacity)
                ),
                # One call at a time: a lane for the session's blocking calls.
                "SPEAR_DIRECT": (
                    "1"
                    if self.context.config.direct_calls and instance.capacity == 1
                    else "0"
                ),
                "SPEAR_BUSY_POLL_US": str(self.context.factory.busy_poll * 1e6),
                "PYTHONUNBUFFERED": "1",
            }
        )
        cwd = _cwd(spec) or os.getcwd()
        _add_python_path(env, cwd)
        return env, cwd

    def _can_fork(self, spec: ArtifactSpec) -> bool:
        config = self.context.config
        return (
            config.start_method == "fork"
            and not config.python
            and spec.kind in (ArtifactKind.CALLABLE, ArtifactKind.HANDLER)
            and hasattr(os, "fork")
        )

    def _ensure_zygote(self) -> Zygote:
        zygote = self._zygote
        if zygote is not None and zygote.alive:
            return zygote
        env = dict(os.environ)
        env["SPEAR_HOST_PID"] = str(os.getpid())
        env["PYTHONUNBUFFERED"] = "1"
        _add_python_path(env, os.getcwd())
        log_path = os.path.join(self.context.workdir, "zygote.log")
        zygote = Zygote(sys.executable, env, log_path)
        zygote.start(self.context.watchdog)
        self._zygote = zygote
        return zygote

    async def _spawn(
        self, instance: TaskInstance, spec: ArtifactSpec, channel_env: dict[str, str]
    ) -> ProcessHandle:
        ctx = self.context
        env, cwd = self._environment(instance, spec, channel_env)
        log_path = os.path.join(ctx.workdir, f"{instance.instance_id}.log")
        if self._can_fork(spec):
            pid, exited = await self._ensure_zygote().fork(
                instance.instance_id, env, cwd, log_path
            )
            handle = ProcessHandle(pid, log_path, exited)
            exited.add_done_callback(lambda _: self._exited(instance, handle))
            how = "forked"
        else:
            handle = self._popen(instance, spec, env, cwd, log_path)
            how = "spawned"
        ctx.watchdog.tell(f"pgid {handle.pid}")
        ctx.events.note(
            f"process_{how}",
            f"pid {handle.pid}",
            instance_id=instance.instance_id,
            task_id=instance.task.task_id,
        )
        return handle

    def _popen(
        self,
        instance: TaskInstance,
        spec: ArtifactSpec,
        env: dict[str, str],
        cwd: str,
        log_path: str,
    ) -> ProcessHandle:
        python = self.context.config.python or sys.executable
        if spec.kind is ArtifactKind.SCRIPT:
            argv = [python, spec.target]
        else:
            argv = [python, "-m", "spear_nb.agent"]
        with open(log_path, "ab") as log:
            try:
                process = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env=env,
                    cwd=cwd,
                    start_new_session=True,
                )
            except OSError as exc:
                raise InstanceStartFailed(
                    f"cannot start {argv[0]} for instance {instance.instance_id}: {exc}"
                ) from exc
        loop = asyncio.get_running_loop()
        handle = ProcessHandle(process.pid, log_path, loop.create_future(), process)
        try:
            handle.pidfd = os.pidfd_open(process.pid)
        except (AttributeError, OSError):
            loop.run_in_executor(None, process.wait).add_done_callback(
                lambda _: self._reaped(instance, handle)
            )
        else:
            loop.add_reader(handle.pidfd, self._reaped, instance, handle)
        return handle

    def _reaped(self, instance: TaskInstance, handle: ProcessHandle) -> None:
        """A spawned process ended: collect its exit code."""
        if handle.pidfd >= 0:
            asyncio.get_running_loop().remove_reader(handle.pidfd)
            os.close(handle.pidfd)
            handle.pidfd = -1
        assert handle.popen is not None
        code = handle.popen.wait()
        if not handle.exited.done():
            handle.exited.set_result(code)
        self._exited(instance, handle)

    def _exited(self, instance: TaskInstance, handle: ProcessHandle) -> None:
        self.context.watchdog.tell(f"forget {handle.pid}")
        code = handle.exited.result()
        reason = f"process {handle.pid} {describe_exit(code)}"
        self.context.events.note(
            "process_exited",
            reason,
            task_id=instance.task.task_id,
            instance_id=instance.instance_id,
        )
        if instance.failure.startswith("its channel was lost"):
            if "paused or hung" in instance.failure:
                # The session killed it for its silence: that stays the reason.
                instance.failure += f"; then {reason}"
            else:
                # The socket broke a moment before the exit was seen; the exit
                # is the better explanation.
                instance.failure = reason
        self.context.on_instance_lost(instance, reason)

    def _start_failure(self, instance: TaskInstance, exc: SpearError) -> SpearError:
        handle = instance.handle
        # What went wrong and what to do first; the remote traceback after it.
        detail, remote, trace = str(exc).partition("\n\nRemote traceback:")
        if isinstance(handle, ProcessHandle):
            if handle.exited.done():
                detail += f"; the process {describe_exit(handle.exited.result())}"
            detail += _load_hint(detail, instance.task.artifact.spec)
            detail += remote + trace
            tail = read_tail(handle.log_path)
            if tail.strip():
                detail += f"\n--- its output ends with ---\n{tail.rstrip()}"
        else:
            detail += remote + trace
        if isinstance(exc, InstanceStartFailed):
            exc.args = (detail,)
            return exc
        return InstanceStartFailed(
            f"instance {instance.instance_id} could not start: {detail}"
        )

    # -- execute -------------------------------------------------------------------

    async def execute(
        self,
        instance: TaskInstance,
        channel: Channel | None,
        request: InvokeFunctionRequest,
        execution: Execution,
        timeout: float,
    ) -> Any:
        if isinstance(instance.handle, CommandHandle):
            return await self._run_command(instance, request, timeout)
        assert channel is not None
        handle = instance.handle
        assert isinstance(handle, ProcessHandle)

        def give_up(reason: str) -> None:
            logger.warning("%s; killing it", reason)
            self._kill(handle)
            # Out of service now: the next call must not be sent to it.
            self.context.on_instance_lost(instance, f"{reason}; it was killed")

        return await call_agent(
            instance,
            channel,
            request,
            execution,
            timeout,
            self.context.config.stop_grace,
            lambda exc: self._lost_during_call(instance, exc),
            give_up,
            lambda: self.interrupt(instance),
            self._poller_for(channel),
        )

    def _poller_for(self, channel: Channel) -> Callable[[], None] | None:
        """For the only call running in the session, over a socket channel:
        poll briefly for its reply before the loop sleeps (see the direct lane:
        a halted CPU is slow to wake)."""
        seconds = self.context.factory.busy_poll
        if not seconds or not isinstance(channel, StreamChannel):
            return None
        if self.context.calls_running() != 1:
            return None
        return lambda: channel.poll_for_reply(seconds)

    def interrupt(self, instance: TaskInstance) -> None:
        """Interrupt the call running on an agent's main thread (SIGUSR1): it
        breaks blocking C calls (sleep, I/O) too."""
        handle = instance.handle
        if isinstance(handle, ProcessHandle) and not handle.exited.done():
            with contextlib.suppress(ProcessLookupError):
                os.kill(handle.pid, signal.SIGUSR1)

    def call_direct(
        self,
        instance: TaskInstance,
        lane: DirectLane,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        deadline: float,
        loop: asyncio.AbstractEventLoop,
        execution: Execution,
    ) -> Any:
        handle = instance.handle
        assert isinstance(handle, ProcessHandle)
        try:
            payload = dumps_arguments(args, kwargs)
        except InvalidArguments:
            execution.refused = True
            raise
        message = Message(MessageType.EXECUTE_REQUEST, 0, payload)

        def check() -> str:
            # Read from this thread, written on the loop: a stale answer only
            # delays the verdict by one read slice.
            if handle.exited.done() or instance.status is not InstanceStatus.READY:
                return instance.failure or f"instance {instance.instance_id} stopped"
            return ""

        try:
            reply = lane.call(message, deadline, check)
        except PayloadTooLarge:  # from encoding it: nothing was sent
            execution.refused = True
            raise
        except LaneTimeout:
            self._stop_direct(instance, handle, lane, message.request_id, loop)
            raise ExecutionTimeout(
                f"the call on instance {instance.instance_id} ran past its timeout "
                f"of {instance.task.settings.timeout:g} s and was cancelled"
            ) from None
        except KeyboardInterrupt:
            self._stop_direct(instance, handle, lane, message.request_id, loop)
            raise
        except LaneLost as exc:
            lane.close(str(exc))
            raise self._explain_direct(instance, str(exc), loop) from None
        return decode_reply(reply, instance)

    def _stop_direct(
        self,
        instance: TaskInstance,
        handle: ProcessHandle,
        lane: DirectLane,
        rid: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """Interrupt a direct call and wait for the instance to confirm; kill the
        instance if it does not (it is replaced, as on the channel)."""
        if lane.broken or handle.exited.done():
            return
        grace = self.context.config.stop_grace

        def again() -> str:
            # Each read slice: a signal that came before the call started in
            # the instance found nothing to stop there.
            self.interrupt(instance)
            return ""

        again()
        try:
            lane.reply(rid, time.perf_counter() + grace, again)
            return
        except (LaneLost, LaneTimeout, KeyboardInterrupt):
            pass
        reason = (
            f"instance {instance.instance_id} did not stop a cancelled call "
            f"within {grace:g} s"
        )
        lane.close(reason)
        logger.warning("%s; killing it", reason)
        self._kill(handle)
        # Out of service at once (the loop takes it out of its task next), so
        # that the next call from this thread does not pick it.
        instance.health = Health.UNHEALTHY
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(
                self.context.on_instance_lost, instance, f"{reason}; it was killed"
            )

    def _explain_direct(
        self, instance: TaskInstance, reason: str, loop: asyncio.AbstractEventLoop
    ) -> SpearError:
        """The clearest error for a lane lost mid-call, such as the exit code."""
        lost = ChannelError(
            f"the direct lane to instance {instance.instance_id} was lost: {reason}"
        )
        try:
            future = asyncio.run_coroutine_threadsafe(
                self._lost_during_call(instance, lost), loop
            )
            return future.result(timeout=5.0)
        except Exception:  # the loop is closing: say what the lane saw
            return lost

    async def _lost_during_call(
        self, instance: TaskInstance, exc: ChannelError
    ) -> SpearError:
        handle = instance.handle
        assert isinstance(handle, ProcessHandle)
        # The socket usually breaks a moment before the exit is reaped.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(handle.exited), 0.5)
        if handle.exited.done():
            how = describe_exit(handle.exited.result())
            tail = read_tail(handle.log_path, 500).rstrip()
            text = f"instance {instance.instance_id} (pid {handle.pid}) {how} "
            text += "during the call; the next call gets a new instance"
            if tail:
                text += f"\n--- its output ends with ---\n{tail}"
            return InstanceCrashed(text)
        return exc

    async def _run_command(
        self, instance: TaskInstance, request: InvokeFunctionRequest, timeout: float
    ) -> bytes:
        handle = instance.handle
        assert isinstance(handle, CommandHandle)
        spec = instance.task.artifact.spec
        payload = request.payload if request.payload is not None else b""
        env = dict(os.environ)
        env.update(dict(spec.env))
        try:
            process = await asyncio.create_subprocess_exec(
                *spec.command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=_cwd(spec) or None,
                start_new_session=True,
            )
        except OSError as exc:
            raise CommandFailed(
                f"cannot run {list(spec.command)!r}: {exc.strerror or exc}", -1, ""
            ) from exc
        handle.launched += 1
        handle.running.add(process)
        self.context.watchdog.tell(f"pgid {process.pid}")
        try:
            stdout, stderr = await asyncio.wait_for(
                _communicate(process, payload), timeout
            )
        except asyncio.TimeoutError:
            _kill_group(process.pid)
            await process.wait()
            # The configured limit, not what was left of it when the call began.
            limit = request.timeout or instance.task.settings.timeout
            raise ExecutionTimeout(
                f"the command {list(spec.command)!r} ran past its timeout of "
                f"{limit:g} s and was killed"
            ) from None
        except asyncio.CancelledError:
            _kill_group(process.pid)
            await process.wait()
            raise
        finally:
            handle.running.discard(process)
            self.context.watchdog.tell(f"forget {process.pid}")
        code = process.returncode
        assert code is not None
        if len(stdout) > self.context.config.max_frame_size:
            raise PayloadTooLarge(
                f"the command wrote {len(stdout):,} bytes, more than the maximum "
                f"frame size of {self.context.config.max_frame_size:,} bytes; have "
                "it write less per call, or raise max_frame_size in the session's "
                "configuration"
            )
        if code != 0:
            tail = stderr[-STDERR_TAIL:].decode("utf-8", "replace").rstrip()
            raise CommandFailed(
                f"the command {list(spec.command)!r} {describe_exit(code)}"
                + (f"; stderr ends with:\n{tail}" if tail else " and wrote no stderr"),
                code,
                tail,
            )
        return stdout

    # -- stop and health -----------------------------------------------------------

    async def stop_instance(self, instance: TaskInstance) -> None:
        handle = instance.handle
        factory = self.context.factory
        if isinstance(handle, CommandHandle):
            for process in list(handle.running):
                _kill_group(process.pid)
            return
        if not isinstance(handle, ProcessHandle):
            factory.release(instance.instance_id)
            return
        channel = factory.pooled(instance.instance_id)
        if channel is not None and channel.connected and not handle.exited.done():
            with contextlib.suppress(ChannelError):
                channel.send(Message(MessageType.CLOSE, 0))
        factory.release(instance.instance_id)
        grace = self.context.config.stop_grace
        if not await _wait_exit(handle, grace):
            _kill_group(handle.pid, signal.SIGTERM)
            if not await _wait_exit(handle, grace):
                self._kill(handle)
                await _wait_exit(handle, grace)

    def _kill(self, handle: ProcessHandle) -> None:
        _kill_group(handle.pid)

    async def health_check(self, instance: TaskInstance) -> bool:
        handle = instance.handle
        if isinstance(handle, CommandHandle):
            return True
        if not isinstance(handle, ProcessHandle) or handle.exited.done():
            return False
        channel = self.context.factory.pooled(instance.instance_id)
        return channel is not None and channel.connected

    # -- display -----------------------------------------------------------------

    def describe_instance(self, instance: TaskInstance) -> dict[str, Any]:
        handle = instance.handle
        if isinstance(handle, ProcessHandle):
            return {"pid": handle.pid}
        if isinstance(handle, CommandHandle):
            running = [p.pid for p in handle.running]
            return {"pid": running[0] if running else None}
        return {"pid": None}

    def inspect_instance(self, instance: TaskInstance) -> dict[str, Any]:
        info = self.describe_instance(instance)
        handle = instance.handle
        if isinstance(handle, ProcessHandle):
            info["log_path"] = handle.log_path
            info["log_tail"] = read_tail(handle.log_path)
            if handle.exited.done():
                info["exit"] = describe_exit(handle.exited.result())
        elif isinstance(handle, CommandHandle):
            info["processes_launched"] = handle.launched
        return info


async def _communicate(
    process: asyncio.subprocess.Process, payload: bytes
) -> tuple[bytes, bytes]:
    """Feed stdin and read stdout and stderr to the end.

    A command may exit without reading its input; writing to its closed stdin is
    then not an error (``communicate`` can raise there, depending on the loop).
    """
    assert process.stdin and process.stdout and process.stderr

    async def feed(stdin: asyncio.StreamWriter) -> None:
        try:
            stdin.write(payload)
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError, RuntimeError):
            pass
        finally:
            with contextlib.suppress(
                BrokenPipeError, ConnectionResetError, RuntimeError
            ):
                stdin.close()

    stdout, stderr, _ = await asyncio.gather(
        process.stdout.read(), process.stderr.read(), feed(process.stdin)
    )
    await process.wait()
    return stdout, stderr


def _kill_group(pgid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _wait_exit(handle: ProcessHandle, timeout: float) -> bool:
    if handle.exited.done():
        return True
    try:
        await asyncio.wait_for(asyncio.shield(handle.exited), timeout)
    except asyncio.TimeoutError:
        return False
    return True


def _cwd(spec: ArtifactSpec) -> str:
    """The function's ``cwd=`` made absolute against the session's own working
    directory ("" if none): a forked instance changes into it, then imports
    from it."""
    return os.path.abspath(spec.cwd) if spec.cwd else ""


def _load_hint(detail: str, spec: ArtifactSpec) -> str:
    """What to check when an instance could not load its function."""
    if "ModuleNotFoundError" in detail:
        return (
            "; check the module's name: an instance imports from its cwd=, "
            "PYTHONPATH and the session's sys.path (pass cwd= the directory that "
            "holds the module, or env={'PYTHONPATH': ...})"
        )
    if spec.kind is ArtifactKind.HANDLER and "AttributeError" in detail:
        return f"; check the function's name after the ':' in {spec.target!r}"
    return ""


class _BusyCheck:
    """Whether a silent instance's process is busy, not paused: it runs (it is
    not stopped, SIGSTOP, nor gone) and its CPU time grows between two looks.
    Such a process can miss heartbeats while one C call holds its GIL (a long
    ``sum(range(...))``), and its call should run on to its timeout."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._seen: tuple[float, float] | None = None  # (monotonic, CPU seconds)

    def __call__(self) -> bool:
        try:
            process = psutil.Process(self.pid)
            with process.oneshot():
                status = process.status()
                times = process.cpu_times()
        except psutil.Error:
            return False
        now, cpu = time.monotonic(), times.user + times.system
        seen, self._seen = self._seen, (now, cpu)
        if status in _NOT_RUNNING:
            return False
        if seen is None or now - seen[0] > _BUSY_LOOK_GAP:
            # A first look (of this silence): whether it runs on a CPU now.
            return bool(status == psutil.STATUS_RUNNING)
        return cpu > seen[1]


# Looks further apart than this (seconds) belong to different silences.
_BUSY_LOOK_GAP = 30.0


_NOT_RUNNING = frozenset(
    {
        psutil.STATUS_STOPPED,
        psutil.STATUS_TRACING_STOP,
        psutil.STATUS_ZOMBIE,
        psutil.STATUS_DEAD,
    }
)


def _check_handler_module(spec: ArtifactSpec) -> None:
    """Refuse a handler whose module an instance could not find: it would
    register, and fail only at its first call. Nothing is imported here (that
    would run the user's module in the session); the module's top-level name is
    looked up where an instance looks, and wherever this process does."""
    module = spec.target.split(":", 1)[0]
    top = module.split(".", 1)[0]
    if not all(part.isidentifier() for part in module.split(".")):
        raise InvalidSpec(
            f"a handler is 'package.module:function', got {spec.target!r}"
        )
    if top in sys.builtin_module_names or top in sys.modules:
        return
    cwd = _cwd(spec) or os.getcwd()
    env = {**os.environ, **dict(spec.env)}  # as _environment builds it
    _add_python_path(env, cwd)
    paths = env["PYTHONPATH"].split(os.pathsep)
    paths += [p or os.getcwd() for p in sys.path]  # the interpreter's own
    found = importlib.machinery.PathFinder.find_spec(top, paths)
    if found is None and importlib.machinery.FrozenImporter.find_spec(top) is None:
        raise InvalidSpec(
            f"the handler {spec.target!r} names a module {top!r} that is neither in "
            f"{cwd} nor on the Python path; check the name, pass cwd= the directory "
            "that holds it, or install it"
        )


def _add_python_path(env: dict[str, str], cwd: str) -> None:
    """Let instances import the user's modules in ``cwd`` first, then from what
    PYTHONPATH says, then from what the session's own ``sys.path`` has that a new
    interpreter would not (see :func:`_added_paths`), then from the directory
    that holds spear_nb if that is a checkout (never the package's own
    directory, whose modules would hide installed ones of the same names). The
    interpreter's own directories (the standard library, then site-packages)
    follow in their usual order."""
    parts = [cwd]
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    added = _added_paths()
    if not _interpreters_own(_PACKAGE_ROOT):
        added.append(_PACKAGE_ROOT)
    parts += [p for p in added if p not in parts]
    env["PYTHONPATH"] = os.pathsep.join(parts)


def _interpreters_own(path: str) -> bool:
    """Whether ``path`` is under this interpreter's prefixes (its standard
    library, its site-packages, a virtualenv's)."""
    real = os.path.realpath(path)
    for prefix in {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}:
        own = os.path.realpath(prefix)
        if real == own or real.startswith(own + os.sep):
            return True
    return False


def _added_paths() -> list[str]:
    """The directories on this process's ``sys.path`` that are not the
    interpreter's own: the script's directory, and any a notebook added
    (``sys.path.insert(0, "src")``), so that a function imported from there can
    be imported in its instance too. Read when each instance starts."""
    added: list[str] = []
    for entry in sys.path:
        path = os.path.abspath(entry or os.getcwd())
        if _interpreters_own(path) or not os.path.exists(path):
            continue
        if path not in added:
            added.append(path)
    return added


def grpc_address(workdir: str, instance_id: str) -> str:
    """Where an instance's agent serves gRPC: a Unix socket in the session's
    directory, or a loopback TCP port when that path would be longer than the
    OS allows (a long TMPDIR or function name). gRPC would not refuse such a
    path but hang on it."""
    path = os.path.join(workdir, f"{instance_id}.grpc.sock")
    if len(os.fsencode(path)) <= MAX_UNIX_PATH:
        return f"unix:{path}"
    logger.info(
        "the socket path %s is too long; instance %s serves gRPC on TCP",
        path,
        instance_id,
    )
    # A port free now; should another process take it first, the agent cannot
    # serve and dials the host instead (a fallback the factory records).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"127.0.0.1:{port}"
