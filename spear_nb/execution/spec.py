"""Turn the arguments of ``Session.register`` into an artifact spec and settings."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import cloudpickle

from spear_nb.errors import InvalidSpec, did_you_mean
from spear_nb.execution.model import (
    ArtifactKind,
    ArtifactSpec,
    QueuePolicy,
    RuntimeType,
    TaskSettings,
)
from spear_nb.execution.scheduler import POLICIES

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,62}$")
CHANNEL_TYPES = ("unix", "tcp", "grpc", "memory")


# Options (further keywords of Session.register) of each kind of function.
# register(..., pipeline=True): calls run one after another on the instance's main
# thread, up to max_concurrency of them in flight.
PROCESS_OPTIONS = frozenset({"pipeline"})
WASM_OPTIONS = ("convention", "fuel", "memory_limit_mb")
# Options of register(..., runtime="kubernetes").
KUBERNETES_OPTIONS = frozenset(
    {
        "image",  # the container image (spear_nb installed); kind IMAGE uses target
        "image_pull_policy",  # Always, IfNotPresent or Never
        "cpu",  # CPU request, e.g. "250m"
        "memory",  # memory request, e.g. "256Mi"
        "cpu_limit",
        "memory_limit",
        "resources",  # a whole V1ResourceRequirements dict instead of the four above
        "pod_template",  # a pod manifest (dict) the pod is built on
        "port",  # the agent's gRPC port in the pod; default: a free local port
        "labels",
        "annotations",
    }
)
# Where a keyword that one kind of function lacks belongs, for the error.
_OPTION_OWNERS = (
    ("wasm", WASM_OPTIONS, "wasm="),
    ("kubernetes", KUBERNETES_OPTIONS, "image="),
    ("process", PROCESS_OPTIONS, "a callable, handler= or script="),
)

# The keywords of Session.register that every kind of function takes.
REGISTER_KEYWORDS = (
    "command",
    "handler",
    "script",
    "wasm",
    "image",
    "runtime",
    "channel",
    "env",
    "cwd",
    "timeout",
    "max_instances",
    "max_concurrency",
    "idle_timeout",
    "queue_policy",
    "scheduler",
)


def unknown_keywords(
    names: Sequence[str], kind: str, options: Sequence[str]
) -> InvalidSpec:
    """The error for keywords of ``register`` that neither it nor the runtime
    knows, with the closest known name for each (a typo, most of the time)."""
    known = [*REGISTER_KEYWORDS, *options]
    described = [f"{name!r}{did_you_mean(name, known)}" for name in names]
    text = (
        f"register() got an unknown keyword {', '.join(described)}; every function "
        f"takes {', '.join(REGISTER_KEYWORDS)}"
    )
    extra = sorted(set(options) - set(REGISTER_KEYWORDS))
    if kind:
        text += (
            f", and a {kind} function also takes {', '.join(extra)}"
            if extra
            else f"; a {kind} function takes no other options"
        )
    for owner, owned, how in _OPTION_OWNERS:
        theirs = [name for name in names if name in owned and owner != kind]
        if theirs:
            text += (
                f". {', '.join(map(repr, theirs))}: an option of {owner} functions "
                f"(registered with {how})"
            )
    return InvalidSpec(text)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidSpec(
            f"{name!r} is not a usable function name: use letters, digits, '_', '-' "
            "or '.', starting with a letter or '_', at most 63 characters"
        )
    return name


def name_of(fn: Callable[..., Any]) -> str:
    """A registration name for a callable invoked directly."""
    raw = getattr(fn, "__name__", "") or type(fn).__name__
    cleaned = re.sub(r"[^A-Za-z0-9_.\-]", "", raw) or "function"
    if not cleaned[0].isalpha() and cleaned[0] != "_":
        cleaned = f"fn_{cleaned}"
    return cleaned[:63]


def build_spec(
    fn: Callable[..., Any] | None = None,
    *,
    command: str | Sequence[str] | None = None,
    handler: str | None = None,
    script: str | os.PathLike[str] | None = None,
    wasm: str | bytes | os.PathLike[str] | None = None,
    image: str | None = None,
    runtime: str | None = None,
    channel: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    options: Mapping[str, Any] | None = None,
) -> ArtifactSpec:
    """Validate what the user gave and build the artifact spec."""
    given = {
        "a callable": fn is not None,
        "command=": command is not None,
        "handler=": handler is not None,
        "script=": script is not None,
        "wasm=": wasm is not None,
    }
    chosen = [k for k, v in given.items() if v]
    if not chosen and image is None and options:
        raise unknown_keywords(sorted(options), "", ())
    if len(chosen) != 1 and not (image is not None and len(chosen) <= 1):
        raise InvalidSpec(
            "register needs exactly one of: a callable, command=, handler=, script= "
            f"or wasm= (got {', '.join(chosen) if chosen else 'none'})"
        )
    env_items = _env(env)
    cwd_text = _path("cwd", cwd) if cwd is not None else ""
    if image is not None and not isinstance(image, str):
        raise InvalidSpec(f"image must be a string, got {image!r}")
    if channel is not None and channel not in CHANNEL_TYPES:
        raise InvalidSpec(
            f"unknown channel type {channel!r}; a process function or pod takes "
            "channel='unix', 'tcp' or 'grpc' (WASM functions always use 'memory', "
            "commands 'stdio')"
        )
    runtime_type = _runtime(runtime, wasm is not None, image is not None)
    if image is not None and runtime_type is not RuntimeType.KUBERNETES:
        given_with = "wasm=" if wasm is not None else f"runtime={runtime!r}"
        raise InvalidSpec(
            f"image= names the container of a Kubernetes pod, and {given_with} "
            "runs elsewhere; drop one of them (a pod runs a callable or a "
            "handler= in that image, or the image's own command)"
        )
    all_options = dict(options or {})
    if image is not None and chosen:
        all_options["image"] = image  # the container a callable or handler runs in
    common: dict[str, Any] = {
        "runtime": runtime_type,
        "env": env_items,
        "cwd": cwd_text,
        "channel": channel or "",
        "options": tuple(sorted(all_options.items())),
    }
    if fn is not None:
        if not callable(fn):
            raise InvalidSpec(
                f"{fn!r} is not callable; pass a function, or command=[...] for a "
                "program"
            )
        return ArtifactSpec(
            kind=ArtifactKind.CALLABLE, code=pickle_callable(fn), **common
        )
    if command is not None:
        argv = _argv(command)
        if not argv or not all(isinstance(a, str) and a for a in argv):
            raise InvalidSpec(
                "command must be a program and its arguments, as a non-empty list "
                f"of strings or one string (split like a shell line), got {command!r}"
            )
        return ArtifactSpec(kind=ArtifactKind.COMMAND, command=tuple(argv), **common)
    if handler is not None:
        if not isinstance(handler, str) or ":" not in handler:
            raise InvalidSpec(
                f"handler must be 'package.module:function', got {handler!r}"
            )
        return ArtifactSpec(kind=ArtifactKind.HANDLER, target=handler, **common)
    if script is not None:
        script_path = _path("script", script)
        # A relative script is looked for in cwd= first, as the instance runs there.
        path = os.path.abspath(
            os.path.join(cwd_text, script_path) if cwd_text else script_path
        )
        if cwd_text and not os.path.isfile(path):
            path = os.path.abspath(script_path)
        if not os.path.isfile(path):
            where = f" (nor in cwd={cwd_text!r})" if cwd_text else ""
            raise InvalidSpec(f"the script {path!r} does not exist{where}")
        return ArtifactSpec(kind=ArtifactKind.SCRIPT, target=path, **common)
    if wasm is not None:
        return ArtifactSpec(kind=ArtifactKind.WASM, code=_wasm_bytes(wasm), **common)
    assert image is not None
    return ArtifactSpec(kind=ArtifactKind.IMAGE, target=image, **common)


def pickle_callable(fn: Callable[..., Any]) -> bytes:
    """cloudpickle a callable, explaining what to do when that is impossible."""
    try:
        return cloudpickle.dumps(fn, protocol=5)
    except Exception as exc:
        raise InvalidSpec(
            f"{getattr(fn, '__name__', fn)!r} cannot be sent to an instance because "
            f"it cannot be pickled ({type(exc).__name__}: {exc}); it probably "
            "captures an open file, lock, socket or similar. Create such objects "
            "inside the function instead"
        ) from exc


def _env(env: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    if env is None:
        return ()
    if not isinstance(env, Mapping):
        raise InvalidSpec(f"env must map strings to strings, got {env!r}")
    items = []
    for key, value in env.items():
        if not isinstance(key, str) or not isinstance(value, str) or not key:
            raise InvalidSpec(
                f"env must map strings to strings, got {key!r}: {value!r}"
            )
        items.append((key, value))
    return tuple(sorted(items))


def _runtime(runtime: str | None, is_wasm: bool, is_image: bool) -> RuntimeType:
    if runtime is None:
        if is_wasm:
            return RuntimeType.WASM
        if is_image:
            return RuntimeType.KUBERNETES
        return RuntimeType.PROCESS
    try:
        return RuntimeType(runtime)
    except ValueError:
        raise InvalidSpec(
            f"unknown runtime {runtime!r}; use 'process', 'wasm' or 'kubernetes'"
        ) from None


def _wasm_bytes(wasm: str | bytes | os.PathLike[str]) -> bytes:
    if isinstance(wasm, (bytes, bytearray, memoryview)):
        return bytes(wasm)
    if isinstance(wasm, str) and wasm.lstrip().startswith(("(", ";;")):
        return wasm.encode()  # WAT given inline
    if not isinstance(wasm, (str, os.PathLike)):
        raise InvalidSpec(
            f"wasm must be a path to a .wasm or .wat file, WAT text or the module's "
            f"bytes, got {wasm!r}"
        )
    text = _path("wasm", wasm)
    try:
        with open(text, "rb") as f:
            return f.read()
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        raise InvalidSpec(f"cannot read the WASM module {text!r}: {exc}") from exc


def _argv(command: str | Sequence[str]) -> list[str]:
    """The argument vector of a command given as a string or a sequence."""
    if isinstance(command, str):
        try:
            return shlex.split(command)
        except ValueError as exc:  # an unclosed quote
            raise InvalidSpec(f"cannot split the command {command!r}: {exc}") from None
    if not isinstance(command, Sequence):
        raise InvalidSpec(
            f"command must be a string or a list of strings, got {command!r}"
        )
    return list(command)


def _path(what: str, value: object) -> str:
    """A path argument as text, refusing what is not a path."""
    try:
        text = os.fspath(value)  # type: ignore[call-overload]
    except TypeError:
        text = None
    if not isinstance(text, str):
        raise InvalidSpec(f"{what} must be a path (str), got {value!r}")
    return text


def build_settings(defaults: TaskSettings, **overrides: Any) -> TaskSettings:
    """The task settings: session defaults with the function's own overrides."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if "queue_policy" in given:
        try:
            given["queue_policy"] = QueuePolicy(given["queue_policy"])
        except ValueError:
            policy = given["queue_policy"]
            raise InvalidSpec(
                f"queue_policy must be 'wait' or 'reject', got {policy!r}"
            ) from None
    scheduler = given.get("scheduler")
    if "scheduler" in given and not (
        isinstance(scheduler, str) and scheduler in POLICIES
    ):
        raise InvalidSpec(
            f"scheduler must be one of {', '.join(sorted(POLICIES))}, got {scheduler!r}"
        )
    for key in ("timeout", "idle_timeout", "start_timeout"):
        value = given.get(key)
        if key in given and (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not value > 0
        ):
            raise InvalidSpec(
                f"{key} must be a positive number of seconds, got {value!r}"
            )
    for key in ("max_instances", "max_concurrency"):
        value = given.get(key)
        if key in given and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise InvalidSpec(f"{key} must be a positive integer, got {value!r}")
    return dataclasses.replace(defaults, **given)
