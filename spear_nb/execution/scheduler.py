"""Choose which ready instance of a task serves the next call."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from spear_nb.errors import ConfigurationError
from spear_nb.execution.model import TaskInstance

Policy = Callable[[Sequence[TaskInstance], int], TaskInstance]


def _round_robin(candidates: Sequence[TaskInstance], turn: int) -> TaskInstance:
    return candidates[turn % len(candidates)]


def _least_connections(candidates: Sequence[TaskInstance], turn: int) -> TaskInstance:
    # Ties go to the oldest instance, which keeps few instances warm.
    return min(candidates, key=lambda i: i.metrics.active)


def _least_response_time(candidates: Sequence[TaskInstance], turn: int) -> TaskInstance:
    def key(instance: TaskInstance) -> tuple[int, float]:
        mean = instance.metrics.latency_mean
        return (instance.metrics.active, 0.0 if mean != mean else mean)

    return min(candidates, key=key)


def _random(candidates: Sequence[TaskInstance], turn: int) -> TaskInstance:
    return random.choice(candidates)


POLICIES: dict[str, Policy] = {
    "round_robin": _round_robin,
    "least_connections": _least_connections,
    "least_response_time": _least_response_time,
    "random": _random,
}


class Scheduler:
    """Picks an available instance by a named policy."""

    def __init__(self, policy: str = "least_connections") -> None:
        if policy not in POLICIES:
            raise ConfigurationError(
                f"unknown scheduler policy {policy!r}; use one of "
                + ", ".join(sorted(POLICIES))
            )
        self.policy = policy
        self._choose = POLICIES[policy]
        self._turn = 0

    def select(self, instances: Sequence[TaskInstance]) -> TaskInstance | None:
        """Return an instance that can take one more call, or None."""
        if len(instances) == 1:  # the common warm case, without building a list
            only = instances[0]
            return only if only.available else None
        candidates = [i for i in instances if i.available]
        if not candidates:
            return None
        self._turn += 1
        return self._choose(candidates, self._turn)
