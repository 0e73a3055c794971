"""Every error spear_nb raises, in one tree.

Errors from the libraries underneath (sockets, msgpack, cloudpickle, wasmtime, grpc,
kubernetes) are translated at the boundary into the most specific type here, with the
original kept as ``__cause__``::

    SpearError
    ├── ConfigurationError          a setting or argument is invalid
    │   ├── InvalidSpec             a function's spec cannot be registered
    │   └── InvalidArguments        a call's arguments cannot be sent as given
    ├── FunctionNotFound            no function, task, instance or execution of that id
    ├── SessionClosed               the session was closed
    ├── ResourceExhausted           every instance is busy and the queue is full
    ├── WaitTimeout                 a wait for a result gave up; the call goes on
    ├── ProtocolError               a peer sent something the wire protocol forbids
    │   └── PayloadTooLarge         a message is larger than the maximum frame size
    ├── ChannelError                a channel could not be opened or was lost
    │   └── AuthenticationFailed    a peer presented a wrong or missing secret
    ├── InstanceError               an instance could not be created, started or kept
    │   ├── InstanceStartFailed     it did not start or did not connect in time
    │   ├── InstanceCrashed         it died while serving a call
    │   └── ClusterError            the Kubernetes API refused or cannot be reached
    └── ExecutionError              a call did not produce a result
        ├── RemoteError             the function raised; carries the remote traceback
        ├── CommandFailed           a command exited non-zero; carries code and stderr
        ├── ExecutionTimeout        the call ran past its timeout
        └── ExecutionCancelled      the call was cancelled
"""

from __future__ import annotations

__all__ = [
    "AuthenticationFailed",
    "ChannelError",
    "ClusterError",
    "CommandFailed",
    "ConfigurationError",
    "ExecutionCancelled",
    "ExecutionError",
    "ExecutionTimeout",
    "FunctionNotFound",
    "InstanceCrashed",
    "InstanceError",
    "InstanceStartFailed",
    "InvalidArguments",
    "InvalidSpec",
    "PayloadTooLarge",
    "ProtocolError",
    "RemoteError",
    "ResourceExhausted",
    "SessionClosed",
    "SpearError",
    "WaitTimeout",
]


def did_you_mean(name: str, known: list[str], cutoff: float = 0.6) -> str:
    """`` (did you mean 'x'?)`` for the known name closest to a mistyped one,
    or ``''``: the hint every "no such name" error here ends with."""
    import difflib

    close = difflib.get_close_matches(name, known, n=1, cutoff=cutoff)
    return f" (did you mean {close[0]!r}?)" if close else ""


class SpearError(Exception):
    """Base class of every error raised by spear_nb."""


class WaitTimeout(SpearError, TimeoutError):
    """A wait for a result (``handle.result(timeout=...)``) gave up; the call
    itself goes on and can be waited for again or cancelled."""


class ConfigurationError(SpearError, ValueError):
    """A setting or an argument has a value spear_nb cannot use."""


class InvalidSpec(ConfigurationError):
    """A function cannot be registered as given."""


class InvalidArguments(ConfigurationError):
    """A call cannot be made with these arguments: the wrong number or type for
    the function, or values that cannot be pickled to send to its instance."""


class FunctionNotFound(SpearError, KeyError):
    """No function, task, instance or execution goes by the given name or id."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"


class SessionClosed(SpearError, RuntimeError):
    """The session is closed; create a new one."""


class ResourceExhausted(SpearError):
    """Every instance of a task is busy, the cap is reached and the queue is full."""


class ProtocolError(SpearError):
    """A peer broke the wire protocol: bad frame, unknown message, wrong version."""


class PayloadTooLarge(ProtocolError):
    """A message is larger than the maximum frame size of the channel."""


class ChannelError(SpearError, ConnectionError):
    """A channel to an instance could not be opened, or it was lost."""


class AuthenticationFailed(ChannelError):
    """A peer presented a wrong or missing instance secret."""


class InstanceError(SpearError):
    """An instance could not be created, started or kept alive."""


class InstanceStartFailed(InstanceError):
    """An instance did not start, or did not connect back in time."""


class InstanceCrashed(InstanceError):
    """An instance died while it was serving a call."""


class ClusterError(InstanceError):
    """The Kubernetes API server refused a request, or could not be reached.

    ``status`` is the HTTP status it answered (403, 404, 422, ...; 0 when it could
    not be reached) and ``reason`` its reason word (``Forbidden``, ``NotFound``).
    """

    def __init__(self, message: str, status: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class ExecutionError(SpearError):
    """A call did not produce a result."""


class RemoteError(ExecutionError):
    """The function raised inside its instance.

    ``remote_type`` is the name of the exception class raised there and
    ``remote_traceback`` the traceback text as formatted inside the instance.
    IPython shows the remote traceback instead of the local one.
    """

    def __init__(self, remote_type: str, message: str, remote_traceback: str) -> None:
        super().__init__(f"{remote_type}: {message}")
        self.remote_type = remote_type
        self.remote_message = message
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        head = f"{self.remote_type}: {self.remote_message}"
        if "Traceback (most recent call last)" not in self.remote_traceback:
            return head  # no frames to show: the text would only repeat the head
        return f"{head}\n\nRemote traceback:\n{self.remote_traceback.rstrip()}"

    def _render_traceback_(self) -> list[str]:
        # IPython calls this instead of printing the local (uninteresting) frames.
        lines = ["RemoteError: the function raised inside its instance."]
        lines.extend(self.remote_traceback.rstrip().splitlines())
        return lines


class CommandFailed(ExecutionError):
    """A command exited with a non-zero code; carries the code and stderr tail."""

    def __init__(self, message: str, returncode: int, stderr_tail: str) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr_tail = stderr_tail


class ExecutionTimeout(ExecutionError, TimeoutError):
    """A call ran past its timeout and was stopped."""


class ExecutionCancelled(ExecutionError):
    """A call was cancelled before it produced a result."""


def describe(exc: BaseException) -> str:
    """Return ``Type: message`` for logs and DataFrames."""
    return f"{type(exc).__name__}: {exc}".split("\n", 1)[0]


def wrap(exc: BaseException, kind: type[SpearError], message: str) -> SpearError:
    """Build a spear_nb error of ``kind`` whose cause is ``exc``."""
    err = kind(f"{message}: {describe(exc)}")
    err.__cause__ = exc
    return err
