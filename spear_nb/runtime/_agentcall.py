"""One call to an agent over its channel: what every agent-backed runtime does.

Process instances and pods both run the agent; a call is the same there: pickle
the arguments, send an execute request, arm the timeout, route stream chunks,
await the reply and decode it. On cancel or timeout the agent is asked to stop the
call; if it does not confirm within the grace period, the runtime gives up on the
instance. Only those two reactions differ per runtime, and are passed in.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
from collections.abc import Awaitable, Callable
from typing import Any

import cloudpickle

from spear_nb.communication.channel import Channel, remote_error
from spear_nb.communication.protocol import Message, MessageType
from spear_nb.errors import (
    ChannelError,
    ExecutionCancelled,
    ExecutionTimeout,
    InvalidArguments,
    PayloadTooLarge,
    SpearError,
)
from spear_nb.execution.model import (
    Execution,
    ExecutionMode,
    InvokeFunctionRequest,
    TaskInstance,
)

# Called when a call is cancelled, before waiting for the agent to confirm
# (a local process also gets a signal that interrupts blocking C calls).
Interrupt = Callable[[], None]
# While it waits for the agent to confirm a cancel, the cancel is sent again
# this often (seconds).
RESIGNAL = 0.25
# Called when the agent did not confirm a cancel within the grace period.
GiveUp = Callable[[str], None]
# Turns a lost channel into the clearest error (a crash with its exit code...).
Explain = Callable[[ChannelError], Awaitable[SpearError]]


def dumps_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Pickle call arguments, with cloudpickle for what plain pickle refuses."""
    try:
        return pickle.dumps((args, kwargs), protocol=5)
    except (pickle.PicklingError, TypeError, AttributeError):
        try:
            return cloudpickle.dumps((args, kwargs), protocol=5)
        except Exception as exc:
            raise InvalidArguments(
                f"the arguments cannot be pickled to send to the instance: {exc}"
            ) from exc


async def call_agent(
    instance: TaskInstance,
    channel: Channel,
    request: InvokeFunctionRequest,
    execution: Execution,
    timeout: float,
    grace: float,
    explain: Explain,
    give_up: GiveUp,
    interrupt: Interrupt | None = None,
    after_send: Callable[[], None] | None = None,
) -> Any:
    """Run one call on an agent instance and return its result.

    ``after_send`` runs once the request is on its way, before the wait.
    """
    stream = request.mode is ExecutionMode.STREAM
    on_chunk = request.on_chunk
    on_stream = None
    if stream and on_chunk is not None:
        on_stream = lambda m: on_chunk(pickle.loads(m.payload))  # noqa: E731
    try:
        message = Message(
            MessageType.EXECUTE_REQUEST,
            0,
            dumps_arguments(request.args, request.kwargs),
            {"mode": "stream"} if stream else None,
        )
        future = channel.start_request(message, on_stream)
    except (InvalidArguments, PayloadTooLarge):
        execution.refused = True  # nothing was sent
        raise
    rid = message.request_id
    if after_send is not None:
        after_send()
    timer = asyncio.get_running_loop().call_later(
        timeout, _expire, future, instance, execution.timeout or timeout
    )
    try:
        reply = await future
    except (asyncio.CancelledError, ExecutionTimeout):
        if not (future.done() and not future.cancelled() and not future.exception()):
            await _cancel(instance, channel, rid, grace, give_up, interrupt)
        # else the reply came just before the cancel: nothing runs any more
        raise
    except ChannelError as exc:
        raise await explain(exc) from exc
    finally:
        timer.cancel()
        channel.forget(rid)
    return decode_reply(reply, instance)


async def _cancel(
    instance: TaskInstance,
    channel: Channel,
    rid: int,
    grace: float,
    give_up: GiveUp,
    interrupt: Interrupt | None,
) -> None:
    """Ask the agent to stop call ``rid`` and wait for it to confirm."""
    if not channel.connected or channel.answered(rid):
        return

    def send_cancel() -> None:
        with contextlib.suppress(ChannelError):
            channel.send(Message(MessageType.SIGNAL, rid, b"", {"signal": "cancel"}))
        if interrupt is not None:
            interrupt()

    send_cancel()
    # A fresh future for the confirmation: the call's own one is already done.
    confirm: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
    channel.forget(rid)
    channel.expect_reply(rid, confirm)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    try:
        while True:
            left = deadline - loop.time()
            try:
                await asyncio.wait_for(asyncio.shield(confirm), min(RESIGNAL, left))
                break
            except asyncio.TimeoutError:
                if left <= RESIGNAL:
                    raise
                # A cancel that came before the call started in the instance
                # found nothing to stop there: send it again.
                send_cancel()
    except (asyncio.TimeoutError, ChannelError, asyncio.CancelledError):
        give_up(
            f"instance {instance.instance_id} did not stop a cancelled call "
            f"within {grace:g} s"
        )
    finally:
        channel.forget(rid)


def decode_reply(reply: Message, instance: TaskInstance) -> Any:
    """The value of an execute response, or the error it carries."""
    status = reply.header("status")
    if status == "ok":
        return pickle.loads(reply.payload)
    if status == "cancelled":
        raise ExecutionCancelled(
            f"the call on instance {instance.instance_id} was cancelled"
        )
    error = remote_error(reply.payload)
    if error.remote_type == "PayloadTooLarge":
        raise PayloadTooLarge(
            f"the result of the call on instance {instance.instance_id} is too "
            f"large to send back: {error.remote_message}"
        )
    raise error


def _expire(future: asyncio.Future[Message], instance: TaskInstance, t: float) -> None:
    if not future.done():
        future.set_exception(
            ExecutionTimeout(
                f"the call on instance {instance.instance_id} ran past its timeout "
                f"of {t:g} s and was cancelled"
            )
        )
