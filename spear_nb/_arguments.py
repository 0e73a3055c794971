"""Arguments of spear_nb's own methods checked before they run: a mistake gets
:class:`~spear_nb.errors.InvalidArguments` naming what was wrong, never Python's
``TypeError`` from deep inside."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from spear_nb.errors import InvalidArguments, did_you_mean

P = ParamSpec("P")
T = TypeVar("T")


def checked(method: Callable[P, T]) -> Callable[P, T]:
    """Refuse a call of ``method`` whose arguments do not fit its signature with
    :class:`InvalidArguments` naming the closest real keyword, instead of
    Python's ``TypeError``. For methods whose arguments are all spear_nb's own
    (not those of invoke and submit, which go to the user's function)."""
    signature = inspect.signature(method)
    keywords = [
        name
        for name, parameter in signature.parameters.items()
        if parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD)
        and name != "self"
    ]
    label = f"{method.__name__}()"

    def check(args: Any, kwargs: Any) -> None:
        try:
            signature.bind(*args, **kwargs)
        except TypeError as exc:
            unknown = [name for name in kwargs if name not in keywords]
            if unknown:
                name = unknown[0]
                message = (
                    f"{label} has no keyword {name!r}"
                    f"{did_you_mean(name, keywords, cutoff=0.5)}; it takes "
                    + (", ".join(keywords) or "no arguments")
                )
            else:
                message = f"{label}: {exc}"
            raise InvalidArguments(message) from None

    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def checked_async(*args: P.args, **kwargs: P.kwargs) -> Any:
            check(args, kwargs)
            return await method(*args, **kwargs)

        return checked_async  # type: ignore[return-value]

    @functools.wraps(method)
    def checked(*args: P.args, **kwargs: P.kwargs) -> T:
        check(args, kwargs)
        return method(*args, **kwargs)

    return checked


def seconds(value: Any, what: str) -> float | None:
    """``value`` as a number of seconds, None staying None; anything else (a
    string, a negative or not-a-number value) is refused."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArguments(
            f"{what} is a number of seconds (or None), not {value!r}"
        )
    if math.isnan(value) or value < 0:
        raise InvalidArguments(f"{what} must be 0 or more seconds, not {value!r}")
    return float(value)


def whole(value: Any, what: str, least: int = 0) -> int:
    """``value`` as a whole number of at least ``least``; anything else refused."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise InvalidArguments(
            f"{what} must be a whole number of at least {least}, not {value!r}"
        )
    return value
