"""Session-wide settings, with the defaults of the system spear_nb comes from."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from spear_nb.communication.protocol import DEFAULT_MAX_FRAME, ENVELOPE_ALLOWANCE
from spear_nb.errors import ConfigurationError, did_you_mean
from spear_nb.execution.model import QueuePolicy, TaskSettings
from spear_nb.execution.scheduler import POLICIES

# The smallest max_frame_size a session takes: smaller, no instance could start.
MIN_FRAME = 4096
# The largest frame every channel can carry: gRPC's message limits are 32-bit
# signed integers, and its envelope allowance goes on top.
MAX_FRAME = 2**31 - 1 - ENVELOPE_ALLOWANCE


@dataclasses.dataclass(frozen=True)
class SessionConfig:
    """How a session runs its instances.

    Every field has a default; a function's own settings (``register(...,
    timeout=...)``) override the task defaults given here.
    """

    def __new__(cls, *args: Any, **settings: Any) -> SessionConfig:
        # Before the generated __init__, whose TypeError would name no fix.
        check_settings(settings)
        return super().__new__(cls)

    max_instances_per_task: int = 50
    max_concurrency_per_instance: int = 1
    execution_timeout: float = 300.0
    instance_start_timeout: float = 30.0
    instance_idle_timeout: float = 120.0
    health_check_interval: float = 10.0
    health_check_failures: int = 3
    heartbeat_interval: float = 1.0  # seconds between heartbeats on each channel
    heartbeat_misses: int = 3  # silent intervals before a channel counts as lost
    queue_policy: str = "wait"
    max_queue: int = 1024
    scheduler: str = "least_connections"
    max_frame_size: int = DEFAULT_MAX_FRAME
    stop_grace: float = 2.0
    # Session.invoke from a thread talks to an idle process instance itself, over
    # the instance's direct lane, instead of through the session's loop.
    direct_calls: bool = True
    # How long (microseconds) a direct call and its instance poll for the next
    # message before they sleep: waking a sleeping CPU costs more. Long enough for
    # a quick call's round trip on a busy machine, or neither end's polls pay and
    # both back off. 0 turns it off; it is always off on a single CPU.
    busy_poll_us: float = 200.0
    event_log_size: int = 10_000
    execution_log_size: int = 10_000
    python: str = ""  # interpreter for process instances; "" means sys.executable
    start_method: str = "fork"  # "fork": from a warm zygote; "spawn": a new python
    cache_dir: str = ""  # compiled WASM modules; "" means $SPEAR_NB_CACHE or ~/.cache
    # kubernetes runtime: "" means $KUBECONFIG or ~/.kube/config, else in-cluster
    kubeconfig: str = ""
    kube_context: str = ""  # "" means the kubeconfig's current context
    kube_namespace: str = ""  # "" means the context's namespace, else "default"
    kube_port_forward: bool = False  # reach pods through the API server's port-forward

    def __post_init__(self) -> None:
        positive = (
            "max_instances_per_task",
            "max_concurrency_per_instance",
            "execution_timeout",
            "instance_start_timeout",
            "instance_idle_timeout",
            "health_check_interval",
            "health_check_failures",
            "heartbeat_interval",
            "heartbeat_misses",
            "max_frame_size",
            "event_log_size",
            "execution_log_size",
        )
        whole = {
            "max_instances_per_task",
            "max_concurrency_per_instance",
            "health_check_failures",
            "heartbeat_misses",
            "max_frame_size",
            "event_log_size",
            "execution_log_size",
            "max_queue",
        }
        for name in (*positive, "stop_grace", "max_queue", "busy_poll_us"):
            value: float = getattr(self, name)
            kinds: tuple[type, ...] = (int,) if name in whole else (int, float)
            if isinstance(value, bool) or not isinstance(value, kinds):
                kind = "an integer" if name in whole else "a number"
                raise ConfigurationError(
                    f"SessionConfig.{name} must be {kind}, got {value!r}"
                )
            if value < 0 or (value == 0 and name in positive):
                bound = "positive" if name in positive else "zero or more"
                raise ConfigurationError(
                    f"SessionConfig.{name} must be {bound}, got {value!r}"
                )
        if self.max_frame_size < MIN_FRAME:
            raise ConfigurationError(
                f"SessionConfig.max_frame_size must be at least {MIN_FRAME} bytes "
                f"(the auth request and the function's code travel in one frame), "
                f"got {self.max_frame_size!r}"
            )
        if self.max_frame_size > MAX_FRAME:
            raise ConfigurationError(
                f"SessionConfig.max_frame_size must be at most {MAX_FRAME} bytes "
                f"(2 GiB less {ENVELOPE_ALLOWANCE}: the largest message gRPC "
                f"carries), got {self.max_frame_size!r}; send larger data in "
                "several calls"
            )
        for name in ("direct_calls", "kube_port_forward"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigurationError(
                    f"SessionConfig.{name} must be True or False, got "
                    f"{getattr(self, name)!r}"
                )
        if self.queue_policy not in {p.value for p in QueuePolicy}:
            raise ConfigurationError(
                f"SessionConfig.queue_policy must be 'wait' or 'reject', got "
                f"{self.queue_policy!r}"
            )
        if self.start_method not in ("fork", "spawn"):
            raise ConfigurationError(
                f"SessionConfig.start_method must be 'fork' or 'spawn', got "
                f"{self.start_method!r}"
            )
        if self.scheduler not in POLICIES:
            raise ConfigurationError(
                f"SessionConfig.scheduler must be one of {', '.join(sorted(POLICIES))},"
                f" got {self.scheduler!r}"
            )

    def task_settings(self) -> TaskSettings:
        """The task settings a function gets unless it says otherwise."""
        return TaskSettings(
            timeout=self.execution_timeout,
            max_instances=self.max_instances_per_task,
            max_concurrency=self.max_concurrency_per_instance,
            idle_timeout=self.instance_idle_timeout,
            start_timeout=self.instance_start_timeout,
            queue_policy=QueuePolicy(self.queue_policy),
            max_queue=self.max_queue,
            scheduler=self.scheduler,
        )


def check_settings(settings: Mapping[str, Any]) -> None:
    """Refuse settings that SessionConfig does not have, naming the closest."""
    known = [f.name for f in dataclasses.fields(SessionConfig)]
    unknown = [name for name in settings if name not in known]
    if not unknown:
        return
    described = [f"{name!r}{did_you_mean(name, known, cutoff=0.5)}" for name in unknown]
    raise ConfigurationError(
        f"there is no session setting {', '.join(described)}; the settings are "
        f"{', '.join(known)} (see spear_nb.SessionConfig)"
    )
