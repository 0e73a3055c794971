"""spear_nb: run functions in warm task instances and watch the flow from Jupyter.

Names are imported lazily, so that the agent inside an instance (which imports
``spear_nb.agent``) starts without loading pandas and the rest of the host side.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

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
    "Session",
    "SessionClosed",
    "SessionConfig",
    "SpearError",
    "WaitTimeout",
    "__version__",
]

_WHERE = {
    "Session": "spear_nb.session",
    "SessionConfig": "spear_nb.config",
}

if TYPE_CHECKING:
    from spear_nb.config import SessionConfig
    from spear_nb.errors import (
        AuthenticationFailed,
        ChannelError,
        ClusterError,
        CommandFailed,
        ConfigurationError,
        ExecutionCancelled,
        ExecutionError,
        ExecutionTimeout,
        FunctionNotFound,
        InstanceCrashed,
        InstanceError,
        InstanceStartFailed,
        InvalidArguments,
        InvalidSpec,
        PayloadTooLarge,
        ProtocolError,
        RemoteError,
        ResourceExhausted,
        SessionClosed,
        SpearError,
        WaitTimeout,
    )
    from spear_nb.session import Session


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    if name in __all__:
        return getattr(importlib.import_module("spear_nb.errors"), name)
    if name == "testing":
        return importlib.import_module("spear_nb.testing")
    raise AttributeError(f"module 'spear_nb' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
