"""The WebAssembly runtime: each instance is a wasmtime instance in this process.

A module is compiled once per artifact and its compiled form is kept on disk, keyed
by content hash and wasmtime version, so a later session loads it instead of
compiling. Two guest conventions:

- **reactor** (spear ABI v1, ``spear_nb/samples/wasm/README.md``): the module
  exports ``memory``, ``spear_alloc`` and ``spear_handle``; one warm instance
  serves call after call.
- **WASI command**: the module exports ``_start``; every call instantiates it
  afresh with the payload as stdin and returns its stdout.

Every instance owns one worker thread, and only that thread ever touches the
instance's store, so a long guest never blocks the session's event loop. Calls
reach the worker over a :class:`~spear_nb.communication.memory.MemoryChannel`.
Deadlines use epoch interruption: one ticker thread per runtime advances the
epoch of the runtime's engines while calls run, and at each tick every running
store's epoch callback decides whether its guest goes on or stops (its deadline
passed, or it was cancelled, or its instance or the session is stopping).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import enum
import functools
import hashlib
import importlib.metadata
import logging
import os
import platform
import queue
import re
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from spear_nb.communication.channel import Channel
from spear_nb.communication.memory import MemoryChannel
from spear_nb.communication.protocol import Message, MessageType
from spear_nb.errors import (
    CommandFailed,
    ConfigurationError,
    ExecutionCancelled,
    ExecutionTimeout,
    InstanceCrashed,
    InstanceStartFailed,
    InvalidSpec,
    PayloadTooLarge,
    ProtocolError,
    RemoteError,
    SpearError,
    describe,
)
from spear_nb.execution.model import (
    ArtifactKind,
    ArtifactSpec,
    Execution,
    InvokeFunctionRequest,
    RuntimeType,
    TaskInstance,
)
from spear_nb.execution.spec import WASM_OPTIONS, unknown_keywords
from spear_nb.runtime.base import Runtime, RuntimeContext
from spear_nb.runtime.process import read_tail

try:
    import wasmtime
except ModuleNotFoundError as exc:
    raise ConfigurationError(
        "the WebAssembly runtime needs the wasmtime package: "
        "pip install 'spear_nb[wasm]'"
    ) from exc

logger = logging.getLogger(__name__)

T = TypeVar("T")

# wasmtime's epoch-deadline callback (its C API; wasmtime-py does not wrap it):
# called on the guest's thread when the store's deadline comes; it either moves
# the deadline on or returns an error, which stops the guest.
_EpochCallback = ctypes.CFUNCTYPE(
    ctypes.c_size_t,
    ctypes.POINTER(wasmtime._ffi.wasmtime_context_t),
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint64),
    ctypes.POINTER(wasmtime._ffi.wasmtime_update_deadline_kind_t),
)
_Finalizer = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_NO_FINALIZER = _Finalizer(lambda data: None)

TICK = 0.01  # seconds between two epoch ticks: the precision of deadlines
IDLE_TICKS = 100  # the ticker sleeps after this many ticks without a running call
EXPIRY_GRACE = 1.0  # the host gives up on a call this long after its deadline
LOG_LIMIT = 4096  # bytes kept of one guest log message
LOGS_PER_CALL = 100  # guest log messages kept per call
STDERR_TAIL = 2000
WASI = "wasi_snapshot_preview1"
HOST = "spear"
HOST_IMPORTS = {"log": (("i32", "i32"), ()), "now_ns": ((), ("i64",))}
OPTIONS = WASM_OPTIONS
PAGE = 65536
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF

try:
    WASMTIME_VERSION = importlib.metadata.version("wasmtime")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - odd installs
    WASMTIME_VERSION = "unknown"


class Convention(str, enum.Enum):
    """How a module is called."""

    REACTOR = "reactor"  # warm instance, spear ABI v1
    COMMAND = "command"  # WASI command: stdin in, stdout out, fresh per call


@dataclasses.dataclass(frozen=True)
class Limits:
    """The per-artifact limits given as register options."""

    memory_bytes: int | None = None
    fuel: int | None = None
    convention: Convention | None = None

    @classmethod
    def of(cls, spec: ArtifactSpec) -> Limits:
        options = dict(spec.options)
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise unknown_keywords(unknown, "wasm", OPTIONS)
        memory = options.get("memory_limit_mb")
        if memory is not None and (
            isinstance(memory, bool)
            or not isinstance(memory, (int, float))
            or not memory > 0
        ):
            raise InvalidSpec(
                f"memory_limit_mb must be a positive number, got {memory!r}"
            )
        fuel = options.get("fuel")
        if fuel is not None and (
            isinstance(fuel, bool) or not isinstance(fuel, int) or fuel <= 0
        ):
            raise InvalidSpec(f"fuel must be a positive integer, got {fuel!r}")
        convention = options.get("convention")
        if convention is not None:
            try:
                convention = Convention(convention)
            except ValueError:
                raise InvalidSpec(
                    f"convention must be 'reactor' or 'command', got {convention!r}"
                ) from None
        return cls(
            int(memory * 1024 * 1024) if memory is not None else None,
            fuel,
            convention,
        )


# -- compiling and caching -----------------------------------------------------------


@dataclasses.dataclass(eq=False)
class CompiledModule:
    """A module compiled for one engine, linked against the host imports."""

    digest: str
    module: wasmtime.Module
    pre: wasmtime.InstancePre
    flavour: Flavour
    convention: Convention
    uses_wasi: bool
    exports: dict[str, Any]  # name -> wasmtime type
    source: str  # "compiled" or "disk cache"


class Flavour:
    """An engine and its linker; modules compiled for fuel need their own."""

    def __init__(self, fuel: bool) -> None:
        config = wasmtime.Config()
        config.epoch_interruption = True
        config.consume_fuel = fuel
        self.name = "fuel" if fuel else "plain"
        self.fuel = fuel
        self.engine = wasmtime.Engine(config)
        self.linker = wasmtime.Linker(self.engine)
        self.linker.define_wasi()
        i32, i64 = wasmtime.ValType.i32(), wasmtime.ValType.i64()
        self.linker.define_func(
            HOST, "log", wasmtime.FuncType([i32, i32], []), _host_log, True
        )
        self.linker.define_func(
            HOST, "now_ns", wasmtime.FuncType([], [i64]), time.monotonic_ns
        )


def cache_directory(configured: str = "") -> str:
    """Where compiled modules are kept: ``<cache root>/wasm``.

    The root is ``configured`` (``SessionConfig.cache_dir``) if given, else
    ``$SPEAR_NB_CACHE``, else ``$XDG_CACHE_HOME/spear_nb`` or ``~/.cache/spear_nb``.
    """
    root = configured or os.environ.get("SPEAR_NB_CACHE", "")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
            os.path.expanduser("~"), ".cache"
        )
        root = os.path.join(base, "spear_nb")
    return os.path.join(root, "wasm")


class ModuleCache:
    """Compiled modules on disk, named by content hash, engine and wasmtime version.

    Any failure to read or write only logs a warning: the module is compiled
    instead, or simply not kept.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.hits = 0
        self.misses = 0
        self.write_failures = 0
        self._warned = False

    def path(self, digest: str, flavour: str) -> str:
        name = f"{digest[:40]}-{flavour}-wasmtime{WASMTIME_VERSION}"
        return os.path.join(self.directory, f"{name}-{platform.machine()}.cwasm")

    def load(self, engine: wasmtime.Engine, digest: str, flavour: str) -> Any:
        """The cached module, or None if there is none or it is unusable."""
        path = self.path(digest, flavour)
        try:
            info = os.stat(path)
        except OSError:
            self.misses += 1
            return None
        if hasattr(os, "getuid") and info.st_uid != os.getuid():
            self._warn(f"ignoring {path}: it belongs to another user")
            self.misses += 1
            return None
        try:
            module = wasmtime.Module.deserialize_file(engine, path)
        except wasmtime.WasmtimeError as exc:
            self._warn(f"ignoring the unusable cache file {path}: {_first_line(exc)}")
            self.misses += 1
            with contextlib.suppress(OSError):
                os.unlink(path)
            return None
        self.hits += 1
        return module

    def save(self, module: wasmtime.Module, digest: str, flavour: str) -> bool:
        """Write a compiled module atomically; False (and a warning) on failure."""
        tmp = ""
        try:
            data = module.serialize()
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path(digest, flavour))
        except (OSError, wasmtime.WasmtimeError) as exc:
            self.write_failures += 1
            self._warn(
                f"cannot write the compiled-module cache in {self.directory} "
                f"({_first_line(exc)}); going on without it"
            )
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            return False
        return True

    def _warn(self, message: str) -> None:
        if self._warned:
            logger.debug("%s", message)
            return
        self._warned = True
        logger.warning("%s", message)


def to_binary(code: bytes) -> bytes:
    """The WebAssembly binary of ``code`` (binary already, or WAT text)."""
    if code.startswith(b"\0asm"):
        return code
    try:
        text = code.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    head = text.lstrip()
    if not head.startswith(("(", ";;")):
        raise InvalidSpec(
            "the module is neither WebAssembly (it does not start with the "
            "'\\0asm' magic bytes) nor WAT text"
        )
    try:
        return bytes(wasmtime.wat2wasm(text))
    except wasmtime.WasmtimeError as exc:
        raise InvalidSpec(_wat_error(str(exc))) from exc


def _wat_error(message: str) -> str:
    lines = message.strip().splitlines()
    where = re.search(r"-->\s*\S*?:(\d+):(\d+)", message)
    if where is None:
        return f"the WAT text does not parse: {message.strip()}"
    snippet = [line for line in lines if re.match(r"\s*\d+\s*\|", line)]
    text = (
        f"the WAT text does not parse at line {where.group(1)}, column "
        f"{where.group(2)}: {lines[0]}"
    )
    return text + (f"\n{snippet[0].strip()}" if snippet else "")


def _first_line(exc: BaseException) -> str:
    """A one-line summary of a wasmtime error: its message and its causes."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if "Caused by:" not in lines:
        return lines[0]
    at = lines.index("Caused by:")
    causes = [re.sub(r"^\d+:\s*", "", line) for line in lines[at + 1 :]]
    head = lines[0].rstrip(":")
    if not causes:
        return head
    text = causes[-1]
    if len(causes) > 1:
        text += f" ({'; '.join(causes[:-1])})"
    if head.startswith("error while executing"):
        return text
    return f"{head}: {text}"


def _func_signature(ty: Any) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    if not isinstance(ty, wasmtime.FuncType):
        return None
    return tuple(str(p) for p in ty.params), tuple(str(r) for r in ty.results)


def _show(signature: tuple[tuple[str, ...], tuple[str, ...]]) -> str:
    params, results = signature
    return f"({', '.join(params)}) -> ({', '.join(results)})"


def _check_imports(module: wasmtime.Module) -> bool:
    """Refuse imports the host does not provide; return whether WASI is used."""
    uses_wasi = False
    for item in module.imports:
        name = f"{item.module}.{item.name}"
        if item.module == WASI:
            uses_wasi = True
            continue
        if item.module == HOST and item.name in HOST_IMPORTS:
            wanted = HOST_IMPORTS[item.name]
            if _func_signature(item.type) != wanted:
                raise InvalidSpec(
                    f"the module imports {name} with the wrong type; spear_nb "
                    f"provides it as a function {_show(wanted)}"
                )
            continue
        raise InvalidSpec(
            f"the module imports {name}, which spear_nb does not provide; "
            f"available: {', '.join(f'{HOST}.{n}' for n in HOST_IMPORTS)} and "
            f"WASI preview 1 ({WASI}.*)"
        )
    return uses_wasi


Signature = tuple[tuple[str, ...], tuple[str, ...]]
_REACTOR_EXPORTS: dict[str, Signature] = {
    "spear_alloc": (("i32",), ("i32",)),
    "spear_handle": (("i32", "i32"), ("i64",)),
}
_OPTIONAL_EXPORTS: dict[str, Signature] = {
    "spear_reset": ((), ()),
    "_initialize": ((), ()),
}


def _convention(exports: dict[str, Any], wanted: Convention | None) -> Convention:
    """The convention a module follows, checked against its exports' types."""
    if wanted is None:
        if "spear_handle" in exports:
            wanted = Convention.REACTOR
        elif "_start" in exports:
            wanted = Convention.COMMAND
        else:
            listed = ", ".join(sorted(exports)) or "nothing"
            raise InvalidSpec(
                "the module has no handler export: a reactor exports spear_handle "
                "(with spear_alloc and memory; spear ABI v1) and a WASI command "
                f"exports _start; this module exports {listed}"
            )
    if wanted is Convention.COMMAND:
        if _func_signature(exports.get("_start")) != ((), ()):
            raise InvalidSpec(
                "a WASI command must export _start as a function () -> ()"
            )
        return wanted
    for name, signature in _REACTOR_EXPORTS.items():
        if _func_signature(exports.get(name)) != signature:
            raise InvalidSpec(
                f"a reactor (spear ABI v1) must export {name} as a function "
                f"{_show(signature)}"
            )
    for name, signature in _OPTIONAL_EXPORTS.items():
        if name in exports and _func_signature(exports[name]) != signature:
            raise InvalidSpec(f"the export {name} must be a function () -> ()")
    if not isinstance(exports.get("memory"), wasmtime.MemoryType):
        raise InvalidSpec("a reactor (spear ABI v1) must export its memory")
    return wanted


# -- calling into a reactor ----------------------------------------------------------


def _load_ffi() -> Any:
    """wasmtime's ctypes layer, when it has what the fast call path uses."""
    try:
        from wasmtime import _ffi as ffi
    except ImportError:  # pragma: no cover - a wasmtime without the private module
        return None
    needed = (
        "wasmtime_func_call",
        "wasmtime_memory_data",
        "wasmtime_memory_data_size",
        "wasmtime_val_t",
        "wasm_trap_t",
        "WASMTIME_I32",
        "wasi_config_set_stdin_bytes",
        "wasm_byte_vec_new",
        "wasm_byte_vec_t",
    )
    if not all(hasattr(ffi, name) for name in needed):  # pragma: no cover
        return None
    return ffi


_ffi = _load_ffi()
FAST_CALLS = _ffi is not None  # tests turn it off to cover the public-API path


class PublicExports:
    """A reactor's exports, called through wasmtime's public Python API."""

    def __init__(
        self, store: wasmtime.Store, instance: wasmtime.Instance, reset: bool
    ) -> None:
        exports = instance.exports(store)
        self.store = store
        self.memory: wasmtime.Memory = exports["memory"]  # type: ignore[assignment]
        self._alloc: wasmtime.Func = exports["spear_alloc"]  # type: ignore[assignment]
        self._handle: wasmtime.Func = exports["spear_handle"]  # type: ignore[assignment]
        self._reset: wasmtime.Func | None = (
            exports["spear_reset"] if reset else None  # type: ignore[assignment]
        )

    def alloc(self, size: int) -> int:
        return int(self._alloc(self.store, size)) & _U32

    def handle(self, ptr: int, size: int) -> int:
        return int(self._handle(self.store, ptr, size)) & _U64

    def reset(self) -> None:
        if self._reset is not None:
            self._reset(self.store)

    def size(self) -> int:
        return self.memory.data_len(self.store)

    def write(self, ptr: int, data: bytes) -> None:
        if data:
            self.memory.write(self.store, data, ptr)

    def read(self, ptr: int, size: int) -> bytes:
        return bytes(self.memory.read(self.store, ptr, ptr + size))

    def read_from(self, caller: wasmtime.Caller, ptr: int, size: int) -> bytes | None:
        if ptr + size > self.memory.data_len(caller):
            return None
        return bytes(self.memory.read(caller, ptr, ptr + size))


class FastExports(PublicExports):
    """The same calls straight through wasmtime's C API, with reused buffers.

    A call through the public API looks up the function type and converts every
    value on each call; here the argument and result buffers are made once.
    """

    def __init__(
        self, store: wasmtime.Store, instance: wasmtime.Instance, reset: bool
    ) -> None:
        super().__init__(store, instance, reset)
        ffi = _ffi
        self._call = ffi.wasmtime_func_call
        self._data = ffi.wasmtime_memory_data
        self._data_size = ffi.wasmtime_memory_data_size
        self._trap_type = ctypes.POINTER(ffi.wasm_trap_t)
        self._ctx = store._context()
        self._mem = ctypes.byref(self.memory._memory)
        self._alloc_ref = ctypes.byref(self._alloc._func)
        self._handle_ref = ctypes.byref(self._handle._func)
        self._reset_ref = (
            ctypes.byref(self._reset._func) if self._reset is not None else None
        )
        self._one = (ffi.wasmtime_val_t * 1)()
        self._two = (ffi.wasmtime_val_t * 2)()
        self._one[0].kind = ffi.WASMTIME_I32
        self._two[0].kind = self._two[1].kind = ffi.WASMTIME_I32
        self._result = (ffi.wasmtime_val_t * 1)()

    def _invoke(self, func: Any, args: Any, nargs: int, nresults: int) -> None:
        trap = self._trap_type()
        result = self._result if nresults else None
        error = self._call(
            self._ctx, func, args, nargs, result, nresults, ctypes.byref(trap)
        )
        if error:
            raise wasmtime.WasmtimeError._from_ptr(error)
        if trap:
            raise wasmtime.Trap._from_ptr(trap)

    def alloc(self, size: int) -> int:
        self._one[0].of.i32 = size
        self._invoke(self._alloc_ref, self._one, 1, 1)
        return int(self._result[0].of.i32) & _U32

    def handle(self, ptr: int, size: int) -> int:
        args = self._two
        args[0].of.i32 = ptr
        args[1].of.i32 = size
        self._invoke(self._handle_ref, args, 2, 1)
        return int(self._result[0].of.i64) & _U64

    def reset(self) -> None:
        if self._reset_ref is not None:
            self._invoke(self._reset_ref, None, 0, 0)

    def size(self) -> int:
        return int(self._data_size(self._ctx, self._mem))

    def _base(self, ctx: Any) -> int:
        return ctypes.addressof(self._data(ctx, self._mem).contents)

    def write(self, ptr: int, data: bytes) -> None:
        ctypes.memmove(self._base(self._ctx) + ptr, data, len(data))

    def read(self, ptr: int, size: int) -> bytes:
        return ctypes.string_at(self._base(self._ctx) + ptr, size)

    def read_from(self, caller: wasmtime.Caller, ptr: int, size: int) -> bytes | None:
        ctx = caller._context()
        if ptr + size > self._data_size(ctx, self._mem):
            return None
        return ctypes.string_at(self._base(ctx) + ptr, size)


# -- the host imports ----------------------------------------------------------------

_worker_state = threading.local()  # .handle: the WasmHandle whose thread this is


def _host_log(caller: wasmtime.Caller, ptr: int, size: int) -> None:
    """``spear.log(ptr, len)``: keep a UTF-8 message for the session's events."""
    handle: WasmHandle | None = getattr(_worker_state, "handle", None)
    if handle is not None:
        try:
            handle.guest_log(caller, ptr & _U32, size & _U32)
        except Exception:  # a host import must never raise into the guest
            logger.exception("spear.log failed")


class _Output:
    """A WASI stdout or stderr kept in memory, up to a limit."""

    def __init__(self, limit: int, keep_tail: bool = False) -> None:
        self.limit = limit
        self.keep_tail = keep_tail
        self.chunks: list[bytes] = []
        self.kept = 0
        self.total = 0

    def write(self, data: bytes) -> None:
        self.total += len(data)
        if self.keep_tail:
            self.chunks.append(data)
            self.kept += len(data)
            while self.kept - len(self.chunks[0]) >= self.limit:
                self.kept -= len(self.chunks.pop(0))
        elif self.kept <= self.limit:
            self.chunks.append(data)
            self.kept += len(data)

    def value(self) -> bytes:
        data = b"".join(self.chunks)
        return data[-self.limit :] if self.keep_tail else data


def _set_stdin(wasi: wasmtime.WasiConfig, payload: bytes, workdir: str) -> None:
    if _ffi is not None:
        vec = _ffi.wasm_byte_vec_t()
        data = (ctypes.c_uint8 * len(payload)).from_buffer_copy(payload)
        _ffi.wasm_byte_vec_new(ctypes.byref(vec), len(payload), data)
        _ffi.wasi_config_set_stdin_bytes(wasi.ptr(), ctypes.byref(vec))
        return
    fd, path = tempfile.mkstemp(dir=workdir, suffix=".stdin")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        wasi.stdin_file = path  # opened here, so the name can go at once
    finally:
        os.unlink(path)


# -- the epoch ticker ----------------------------------------------------------------


class EpochTicker:
    """Advances the epoch of the runtime's engines while guests run.

    It sleeps after ``IDLE_TICKS`` ticks with no guest running and wakes when one
    starts, so an idle session costs nothing.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.engines: list[wasmtime.Engine] = []
        self.ticks = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._running = 0
        self._sleeping = True
        self._closed = False
        self._thread: threading.Thread | None = None

    def add(self, engine: wasmtime.Engine) -> None:
        with self._lock:
            self.engines.append(engine)

    def enter(self, store: wasmtime.Store) -> None:
        """A guest is about to run in ``store``: the next tick calls its epoch
        callback, which looks at its deadline and at a stop request (see
        :meth:`WasmHandle.on_epoch`), and so does every tick after.

        Under the lock, so that :meth:`interrupt_all` reaches every store armed
        before it, and no guest starts after it.
        """
        with self._lock:
            if self._closed:
                raise ExecutionCancelled("the session is closing; the call did not run")
            store.set_epoch_deadline(1)
            self._running += 1
            if self._sleeping:
                self._sleeping = False
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._main, name=self.name, daemon=True
                    )
                    self._thread.start()
                self._wake.set()

    def leave(self) -> None:
        with self._lock:
            self._running -= 1

    @property
    def closed(self) -> bool:
        """Whether :meth:`interrupt_all` has been called: guests must stop."""
        return self._closed

    def _main(self) -> None:
        idle = 0
        while not self._stopping.is_set():
            with self._lock:
                idle = idle + 1 if self._running == 0 else 0
                if idle >= IDLE_TICKS:
                    self._sleeping = True
                    self._wake.clear()
                sleeping = self._sleeping
            if sleeping:
                self._wake.wait()
                idle = 0
                continue
            if self._stopping.wait(TICK):
                return
            for engine in self.engines:
                engine.increment_epoch()
            self.ticks += 1

    def interrupt_all(self) -> None:
        """Refuse new guests, and tick every engine once: every running store's
        callback then sees :attr:`closed` and stops its guest.

        Called at close.
        """
        with self._lock:
            self._closed = True
            for engine in self.engines:
                engine.increment_epoch()

    def close(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


# -- one instance --------------------------------------------------------------------


class WasmHandle:
    """One WebAssembly instance and the worker thread that alone touches its store.

    Reactor instances keep a store, instance and looked-up exports for their
    lifetime; command instances make a fresh store per call. ``put`` is the inbox
    of the instance's memory channel.
    """

    def __init__(
        self,
        runtime: WasmRuntime,
        instance: TaskInstance,
        compiled: CompiledModule,
        limits: Limits,
    ) -> None:
        self.runtime = runtime
        self.instance_id = instance.instance_id
        self.name = instance.task.name
        self.env = instance.task.artifact.spec.env
        self.compiled = compiled
        self.limits = limits
        self.max_frame = runtime.context.config.max_frame_size
        self.ticker = runtime.ticker
        self.loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[None] = self.loop.create_future()
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.thread = threading.Thread(
            target=self._main, name=f"spear_nb-wasm-{self.instance_id}", daemon=True
        )
        self.store: wasmtime.Store | None = None
        self.exports: PublicExports | None = None
        self.logs: list[str] = []
        self.limit = 0.0  # the timeout of the running call, for messages
        self._gate = threading.Lock()  # orders starting a call against cancelling it
        self._running: Message | None = None
        # When the guest running now must stop (time.monotonic()), and why it
        # was stopped: "deadline", "cancel" or "stop"; read by on_epoch.
        self.deadline = 0.0
        self.stop_wanted = ""
        self.stopped_by = ""
        self._on_epoch = _EpochCallback(self.on_epoch)  # kept: C holds it
        self.broken = ""
        self.calls = 0
        self.memory_bytes = 0
        self.last_exit_code: int | None = None
        self.stderr_tail = ""
        workdir = runtime.context.workdir
        self.stdout_path = os.path.join(workdir, f"{self.instance_id}.stdout")
        self.stderr_path = os.path.join(workdir, f"{self.instance_id}.stderr")
        self.workdir = workdir

    # -- loop side --------------------------------------------------------------------

    def put(self, item: Any) -> None:
        self.inbox.put(item)

    def start(self) -> None:
        self.thread.start()

    async def run(self, job: Callable[[], T], timeout: float) -> T:
        """Run ``job`` on the worker thread and wait for its result."""
        future: asyncio.Future[T] = self.loop.create_future()
        loop = self.loop

        def wrapped() -> None:
            try:
                result = job()
            except BaseException as exc:  # handed to the loop, raised there
                _call_soon(loop, _set_exception, future, exc)
            else:
                _call_soon(loop, _set_result, future, result)

        self.inbox.put(wrapped)
        # Not asyncio.wait_for, which before Python 3.12 loses a cancel that
        # comes in the same loop turn as the result.
        timer = loop.call_later(timeout, _set_exception, future, asyncio.TimeoutError())
        try:
            return await future
        finally:
            timer.cancel()

    def stop(self) -> None:
        """Ask the worker to close the store and end; a running guest is
        stopped at the next tick."""
        self.stop_wanted = "stop"
        self.inbox.put(None)

    def _arm(self, store: wasmtime.Store, seconds: float) -> None:
        """Before a guest runs: its deadline, checked at each tick by on_epoch."""
        self.deadline = time.monotonic() + seconds
        self.stopped_by = ""
        self.ticker.enter(store)

    def on_epoch(self, context: Any, data: Any, delta: Any, kind: Any) -> int:
        """The epoch callback of this instance's stores (the guest's thread): go
        on for another tick, or stop the guest for its deadline, a cancel, the
        instance's stop or the session's close."""
        why = self.stop_wanted
        if not why:
            if self.ticker.closed:
                why = "stop"
            elif time.monotonic() >= self.deadline:
                why = "deadline"
        if not why:
            delta[0] = 1
            kind[0] = 0  # WASMTIME_UPDATE_DEADLINE_CONTINUE
            return 0
        self.stopped_by = why
        error = wasmtime._ffi.wasmtime_error_new(f"spear_nb: {why}".encode())
        return ctypes.cast(error, ctypes.c_void_p).value or 0

    # -- worker side ------------------------------------------------------------------

    def _main(self) -> None:
        _worker_state.handle = self
        inbox = self.inbox
        try:
            while True:
                item = inbox.get()
                if item is None:
                    break
                if type(item) is tuple:
                    self._serve(*item)
                else:
                    item()
        finally:
            self._close_store()
            _call_soon(self.loop, _set_result, self.exited, None)

    def _close_store(self) -> None:
        self.exports = None
        store, self.store = self.store, None
        if store is not None:
            store.close()

    def _new_store(self, for_call: bool) -> wasmtime.Store:
        store = wasmtime.Store(self.compiled.flavour.engine)
        wasmtime._ffi.wasmtime_store_epoch_deadline_callback(
            store.ptr(), self._on_epoch, None, _NO_FINALIZER
        )
        if self.limits.memory_bytes is not None:
            store.set_limits(memory_size=self.limits.memory_bytes)
        if self.compiled.flavour.fuel:
            store.set_fuel(self.limits.fuel or 2**63 - 1)
        if self.compiled.uses_wasi and not for_call:
            wasi = wasmtime.WasiConfig()
            wasi.stdout_file = self.stdout_path
            wasi.stderr_file = self.stderr_path
            store.set_wasi(wasi)
        return store

    def instantiate(self, seconds: float) -> list[str]:
        """Make the warm reactor instance; return what it logged meanwhile."""
        self.logs = []
        try:
            store = self._new_store(for_call=False)
        except wasmtime.WasmtimeError as exc:
            raise InstanceStartFailed(
                f"instance {self.instance_id} could not get a store: {_first_line(exc)}"
            ) from exc
        self.store = store
        self._arm(store, seconds)
        try:
            instance = self.compiled.pre.instantiate(store)
            if "_initialize" in self.compiled.exports:
                init = instance.exports(store)["_initialize"]
                assert isinstance(init, wasmtime.Func)
                init(store)
            kind = FastExports if FAST_CALLS else PublicExports
            reset = "spear_reset" in self.compiled.exports
            self.exports = kind(store, instance, reset)
            self.memory_bytes = self.exports.size()
        except (wasmtime.WasmtimeError, wasmtime.Trap) as exc:
            reason = self._explain(exc)
            self._close_store()
            raise InstanceStartFailed(
                f"instance {self.instance_id} could not be instantiated: {reason}"
            ) from exc
        finally:
            self.ticker.leave()
        return self.logs

    def guest_log(self, caller: wasmtime.Caller, ptr: int, size: int) -> None:
        logs = self.logs
        if len(logs) >= LOGS_PER_CALL:
            return
        keep = min(size, LOG_LIMIT)
        data: bytes | None
        if self.exports is not None:
            data = self.exports.read_from(caller, ptr, keep)
        else:
            memory = caller.get("memory")
            data = None
            if isinstance(memory, wasmtime.Memory) and (
                ptr + keep <= memory.data_len(caller)
            ):
                data = bytes(memory.read(caller, ptr, ptr + keep))
        if data is None:
            logs.append(f"<log message out of bounds: ptr {ptr}, len {size}>")
            return
        text = data.decode("utf-8", "replace")
        if size > keep:
            text += f" ... ({size - keep} more bytes)"
        logs.append(text)

    def _serve(self, channel: MemoryChannel, message: Message) -> None:
        """Run one call and answer it on the channel; answer heartbeats."""
        if message.type is not MessageType.EXECUTE_REQUEST:
            if message.type is MessageType.HEARTBEAT:
                channel.reply(Message(MessageType.HEARTBEAT, 0))
            return  # close and signals need nothing: the host stops the worker
        rid = message.request_id
        headers = message.headers or {}
        with self._gate:
            if headers.get("cancelled"):
                return
            self._running = message
            if self.stop_wanted == "cancel":  # meant for a call that has ended
                self.stop_wanted = ""
        self.logs = []
        self.limit = headers.get("limit", 300.0)
        timeout = headers.get("deadline", time.monotonic() + self.limit)
        timeout -= time.monotonic()
        try:
            if timeout <= 0:
                raise ExecutionTimeout(
                    f"the call on instance {self.instance_id} waited past its "
                    f"timeout of {self.limit:g} s before it could start"
                )
            if self.compiled.convention is Convention.REACTOR:
                result = self._call_reactor(message.payload, timeout)
            else:
                result = self._call_command(message.payload, timeout)
        except SpearError as exc:
            answer: dict[str, Any] = {"error": exc, "logs": self.logs}
            channel.reply(Message(MessageType.ERROR, rid, b"", answer))
            return
        except Exception as exc:
            self.broken = describe(exc)
            error = InstanceCrashed(
                f"instance {self.instance_id} failed while serving a call: "
                f"{describe(exc)}; the next call gets a new instance"
            )
            error.__cause__ = exc
            answer = {"error": error, "logs": self.logs}
            channel.reply(Message(MessageType.ERROR, rid, b"", answer))
            return
        finally:
            self.calls += 1
            self._running = None
        logs = self.logs
        reply_headers = {"logs": logs} if logs else None
        channel.reply(Message(MessageType.EXECUTE_RESPONSE, rid, result, reply_headers))

    def cancel(self, message: Message) -> bool:
        """Drop a call that has not started (from the loop); True if it runs,
        and then its guest is stopped at the next tick."""
        with self._gate:
            if self._running is message:
                self.stop_wanted = "cancel"
                return True
            if message.headers is not None:
                message.headers["cancelled"] = True
            return False

    def _call_reactor(self, payload: bytes, timeout: float) -> bytes:
        exports = self.exports
        store = self.store
        if exports is None or store is None:
            raise InstanceCrashed(
                f"instance {self.instance_id} has no live WebAssembly instance"
            )
        self._arm(store, timeout)
        try:
            if self.limits.fuel is not None:
                store.set_fuel(self.limits.fuel)
            size = len(payload)
            ptr = exports.alloc(size)
            memory = exports.size()
            if ptr + size > memory:
                raise self._abi_error(
                    f"spear_alloc({size}) returned offset {ptr}, outside its "
                    f"{memory}-byte memory"
                )
            exports.write(ptr, payload)
            packed = exports.handle(ptr, size)
            try:
                return self._result(exports, packed)
            finally:
                exports.reset()
        except (wasmtime.WasmtimeError, wasmtime.Trap) as exc:
            self.broken = _first_line(exc)
            raise self._translate(exc, timeout) from exc
        finally:
            self.ticker.leave()

    def _result(self, exports: PublicExports, packed: int) -> bytes:
        out_ptr, out_len = packed >> 32, packed & _U32
        memory = exports.size()
        self.memory_bytes = memory
        if out_len > self.max_frame:
            raise PayloadTooLarge(
                f"the guest returned {out_len} bytes, more than the maximum "
                f"frame size of {self.max_frame}"
            )
        if out_ptr + out_len > memory:
            raise self._abi_error(
                f"spear_handle returned the result [{out_ptr}, "
                f"{out_ptr + out_len}), outside its {memory}-byte memory"
            )
        return exports.read(out_ptr, out_len)

    def _abi_error(self, text: str) -> ProtocolError:
        self.broken = text
        return ProtocolError(
            f"instance {self.instance_id} broke the spear ABI: {text}; it is replaced"
        )

    def _call_command(self, payload: bytes, timeout: float) -> bytes:
        stdout = _Output(self.max_frame)
        stderr = _Output(STDERR_TAIL, keep_tail=True)
        try:
            wasi = wasmtime.WasiConfig()
            _set_stdin(wasi, payload, self.workdir)
            wasi.stdout_custom = stdout.write
            wasi.stderr_custom = stderr.write
            wasi.argv = [self.name]
            wasi.env = [list(pair) for pair in self.env]
            store = self._new_store(for_call=True)
        except wasmtime.WasmtimeError as exc:
            raise self._translate(exc, timeout) from exc
        try:
            self._arm(store, timeout)
        except ExecutionCancelled:
            store.close()
            raise
        code = 0
        try:
            store.set_wasi(wasi)
            instance = self.compiled.pre.instantiate(store)
            start = instance.exports(store)["_start"]
            assert isinstance(start, wasmtime.Func)
            self.memory_bytes = _memory_size(store, instance)
            try:
                start(store)
            except wasmtime.ExitTrap as exc:
                code = exc.code
        except (wasmtime.WasmtimeError, wasmtime.Trap) as exc:
            raise self._translate(exc, timeout) from exc
        finally:
            self.ticker.leave()
            store.close()  # never let a store with custom output outlive the call
        tail = stderr.value().decode("utf-8", "replace").rstrip()
        self.last_exit_code = code
        self.stderr_tail = tail
        if code != 0:
            raise CommandFailed(
                f"the WASI command {self.name!r} exited with code {code}"
                + (f"; stderr ends with:\n{tail}" if tail else " and wrote no stderr"),
                code,
                tail,
            )
        if stdout.total > self.max_frame:
            raise PayloadTooLarge(
                f"the WASI command {self.name!r} wrote {stdout.total} bytes to "
                f"stdout, more than the maximum frame size of {self.max_frame}"
            )
        return stdout.value()

    def _translate(
        self, exc: wasmtime.WasmtimeError | wasmtime.Trap, timeout: float
    ) -> SpearError:
        """The spear_nb error for what wasmtime raised during a call."""
        reactor = self.compiled.convention is Convention.REACTOR
        after = "; the instance is replaced" if reactor else ""
        code = exc.trap_code if isinstance(exc, wasmtime.Trap) else None
        stopped_by, self.stopped_by = self.stopped_by, ""
        if stopped_by in ("cancel", "stop"):
            return ExecutionCancelled(
                f"the call on instance {self.instance_id} was cancelled; the guest "
                f"was stopped{after}"
            )
        if stopped_by == "deadline" or code is wasmtime.TrapCode.INTERRUPT:
            return ExecutionTimeout(
                f"the call on instance {self.instance_id} ran past its timeout of "
                f"{self.limit:g} s; the guest was interrupted{after}"
            )
        if code is wasmtime.TrapCode.OUT_OF_FUEL:
            return ExecutionTimeout(
                f"the call on instance {self.instance_id} used up its fuel of "
                f"{self.limits.fuel} units and was stopped{after}"
            )
        if isinstance(exc, wasmtime.ExitTrap):
            return RemoteError(
                "Exit",
                f"the reactor called proc_exit({exc.code}) during a call{after}",
                str(exc),
            )
        kind = "Trap" if isinstance(exc, wasmtime.Trap) else "WasmtimeError"
        return RemoteError(kind, self._explain(exc) + after, str(exc).rstrip())

    def _explain(self, exc: BaseException) -> str:
        """The first line of a wasmtime error, with a hint if memory ran out."""
        text = _first_line(exc)
        cap = self.limits.memory_bytes
        if cap is None:
            return text
        used = self.exports.size() if self.exports is not None else self.memory_bytes
        limit = f"memory_limit_mb of {cap / 2**20:g} MiB"
        if "memory limits" in text or used + PAGE > cap:
            return f"{text} (the guest reached its {limit})"
        # memory.grow past the cap returns -1, which guests often answer with a
        # trap; a grow of several pages fails while the memory is below the cap
        return f"{text} (memory in use: {used // 1024} KiB of its {limit})"


def _memory_size(store: wasmtime.Store, instance: wasmtime.Instance) -> int:
    memory = instance.exports(store).get("memory")
    return memory.data_len(store) if isinstance(memory, wasmtime.Memory) else 0


def _call_soon(
    loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any
) -> None:
    with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
        loop.call_soon_threadsafe(fn, *args)


def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _expire(future: asyncio.Future[Message], instance_id: str, seconds: float) -> None:
    if not future.done():
        future.set_exception(
            ExecutionTimeout(
                f"the call on instance {instance_id} did not end {seconds:g} s "
                "after its deadline; the instance is replaced"
            )
        )


# -- the runtime ---------------------------------------------------------------------


class WasmRuntime(Runtime):
    """Runs WebAssembly modules in wasmtime instances inside this process."""

    type = RuntimeType.WASM

    def __init__(self, context: RuntimeContext) -> None:
        super().__init__(context)
        self.cache = ModuleCache(cache_directory(context.config.cache_dir))
        self.ticker = EpochTicker(f"spear_nb-wasm-epoch-{context.session_id}")
        self._flavours: dict[bool, Flavour] = {}
        # (content hash, fuel, convention asked for) -> compiled module
        self._modules: dict[tuple[str, bool, Convention | None], CompiledModule] = {}
        self._handles: set[WasmHandle] = set()

    # -- registration -----------------------------------------------------------------

    def validate(self, spec: ArtifactSpec) -> None:
        if spec.kind is not ArtifactKind.WASM:
            raise InvalidSpec(
                f"the wasm runtime runs WebAssembly modules, not a {spec.kind.value}; "
                "register with wasm=..."
            )
        if spec.channel not in ("", "memory"):
            raise InvalidSpec(
                "WebAssembly instances live in this process and are reached over "
                f"the 'memory' channel, not {spec.channel!r}"
            )
        self.compiled(spec)

    def _flavour(self, fuel: bool) -> Flavour:
        flavour = self._flavours.get(fuel)
        if flavour is None:
            try:
                flavour = Flavour(fuel)
            except wasmtime.WasmtimeError as exc:
                raise ConfigurationError(
                    f"wasmtime could not make an engine: {_first_line(exc)}"
                ) from exc
            self._flavours[fuel] = flavour
            self.ticker.add(flavour.engine)
        return flavour

    def compiled(self, spec: ArtifactSpec) -> CompiledModule:
        """The compiled module of an artifact: from memory, the disk cache, or new."""
        limits = Limits.of(spec)
        fuel = limits.fuel is not None
        digest = hashlib.sha256(spec.code).hexdigest()
        key = (digest, fuel, limits.convention)
        known = self._modules.get(key)
        if known is not None:
            return known
        flavour = self._flavour(fuel)
        started = time.perf_counter()
        module = self.cache.load(flavour.engine, digest, flavour.name)
        source = "disk cache"
        if module is None:
            binary = to_binary(spec.code)
            try:
                module = wasmtime.Module(flavour.engine, binary)
            except wasmtime.WasmtimeError as exc:
                raise InvalidSpec(
                    f"the bytes are not a valid WebAssembly module: {_first_line(exc)}"
                ) from exc
            source = "compiled"
        uses_wasi = _check_imports(module)
        exports = {item.name: item.type for item in module.exports}
        convention = _convention(exports, limits.convention)
        try:
            pre = flavour.linker.instantiate_pre(module)
        except wasmtime.WasmtimeError as exc:
            raise InvalidSpec(
                f"the module's imports cannot be linked: {_first_line(exc)}"
            ) from exc
        compiled = CompiledModule(
            digest, module, pre, flavour, convention, uses_wasi, exports, source
        )
        if source == "compiled":
            saved = self.cache.save(module, digest, flavour.name)
            detail = f"{convention.value} module {digest[:12]} compiled; " + (
                "saved to the disk cache" if saved else "the disk cache is unavailable"
            )
            self.context.events.emit("module_compiled", started, detail=detail)
        else:
            detail = (
                f"{convention.value} module {digest[:12]} loaded from the disk cache"
            )
            self.context.events.emit("module_loaded", started, detail=detail)
        self._modules[key] = compiled
        return compiled

    # -- start and stop ---------------------------------------------------------------

    async def start_instance(self, instance: TaskInstance) -> None:
        spec = instance.task.artifact.spec
        compiled = self.compiled(spec)
        handle = WasmHandle(self, instance, compiled, Limits.of(spec))
        instance.handle = handle
        instance.channel_type = "memory"
        self._handles.add(handle)
        handle.exited.add_done_callback(lambda _: self._handles.discard(handle))
        handle.start()
        if compiled.convention is Convention.REACTOR:
            timeout = instance.task.settings.start_timeout
            try:
                logs = await handle.run(
                    functools.partial(handle.instantiate, timeout), timeout + 1
                )
            except (SpearError, asyncio.TimeoutError) as exc:
                await self.stop_instance(instance)
                if isinstance(exc, SpearError):
                    raise
                raise InstanceStartFailed(
                    f"instance {instance.instance_id} was not instantiated within "
                    f"{timeout:g} s"
                ) from None
            self._note_logs(instance, logs, "")
        loop = asyncio.get_running_loop()
        self.context.factory.set_connector(
            instance.instance_id, functools.partial(self._connect, handle, loop)
        )

    async def _connect(
        self, handle: WasmHandle, loop: asyncio.AbstractEventLoop
    ) -> Channel:
        return MemoryChannel(handle.instance_id, handle, loop)

    async def stop_instance(self, instance: TaskInstance) -> None:
        self.context.factory.release(instance.instance_id)
        handle = instance.handle
        if not isinstance(handle, WasmHandle) or not handle.thread.is_alive():
            return
        handle.stop()
        grace = self.context.config.stop_grace
        try:
            await asyncio.wait_for(asyncio.shield(handle.exited), grace)
        except asyncio.TimeoutError:
            logger.warning(
                "instance %s is still running a call; its thread ends at that "
                "call's deadline",
                instance.instance_id,
            )
            return
        handle.thread.join(timeout=grace)

    async def close(self) -> None:
        handles = list(self._handles)
        self.ticker.interrupt_all()
        for handle in handles:
            handle.stop()
        pending = [h.exited for h in handles if not h.exited.done()]
        if pending:
            await asyncio.wait(pending, timeout=self.context.config.stop_grace * 2)
        for handle in handles:
            handle.thread.join(timeout=1.0)
        self.ticker.close()
        if any(h.thread.is_alive() for h in handles):
            logger.warning("a WebAssembly worker thread did not end; leaving it be")
            return
        self._release()

    def _release(self) -> None:
        """Free the compiled modules and engines now (their memory images hold
        file descriptors) rather than whenever the session is collected."""
        modules, self._modules = list(self._modules.values()), {}
        for compiled in modules:
            compiled.pre.close()
            compiled.module.close()
        flavours, self._flavours = list(self._flavours.values()), {}
        for flavour in flavours:
            flavour.linker.close()
            flavour.engine.close()

    async def health_check(self, instance: TaskInstance) -> bool:
        handle = instance.handle
        return (
            isinstance(handle, WasmHandle)
            and handle.thread.is_alive()
            and not handle.broken
        )

    # -- execute ----------------------------------------------------------------------

    async def execute(
        self,
        instance: TaskInstance,
        channel: Channel | None,
        request: InvokeFunctionRequest,
        execution: Execution,
        timeout: float,
    ) -> Any:
        assert channel is not None
        payload = request.payload if request.payload is not None else b""
        max_frame = self.context.config.max_frame_size
        if len(payload) > max_frame:
            raise PayloadTooLarge(
                f"the payload of {len(payload)} bytes is larger than the maximum "
                f"frame size of {max_frame}"
            )
        limit = request.timeout or instance.task.settings.timeout
        deadline = time.monotonic() + timeout
        message = Message(
            MessageType.EXECUTE_REQUEST,
            0,
            payload,
            {"deadline": deadline, "limit": limit},
        )
        future = channel.start_request(message)
        rid = message.request_id
        loop = asyncio.get_running_loop()
        timer = loop.call_later(
            timeout + EXPIRY_GRACE, _expire, future, instance.instance_id, EXPIRY_GRACE
        )
        try:
            reply = await future
        except asyncio.CancelledError:
            self._abandon(
                instance, message, "a call was cancelled while it ran", always=False
            )
            raise
        except ExecutionTimeout:
            self._abandon(instance, message, "a call did not end at its deadline")
            raise
        finally:
            timer.cancel()
            channel.forget(rid)
        headers = reply.headers
        if headers is None:
            return reply.payload
        logs = headers.get("logs")
        if logs:
            self._note_logs(instance, logs, execution.execution_id)
        error = headers.get("error")
        if error is None:
            return reply.payload
        handle = instance.handle
        if isinstance(handle, WasmHandle) and handle.broken:
            self.context.on_instance_lost(instance, handle.broken)
        raise error

    def _abandon(
        self, instance: TaskInstance, message: Message, reason: str, always: bool = True
    ) -> None:
        """Nobody waits for the call any more: drop it, or stop its guest.

        A running guest stops at the next epoch tick. A reactor stopped in the
        middle of a call may have left its memory half-updated, so its instance
        is replaced; a command's store ends with the call, so its instance
        serves on (unless ``always``: the guest outran its deadline).
        """
        handle = instance.handle
        if (
            isinstance(handle, WasmHandle)
            and handle.cancel(message)
            and (always or handle.compiled.convention is Convention.REACTOR)
        ):
            handle.broken = reason
            self.context.on_instance_lost(instance, reason)

    def _note_logs(
        self, instance: TaskInstance, logs: list[str], execution_id: str
    ) -> None:
        note = self.context.events.note
        for text in logs:
            note(
                "guest_log",
                text,
                execution_id=execution_id,
                task_id=instance.task.task_id,
                instance_id=instance.instance_id,
            )

    # -- display ----------------------------------------------------------------------

    def describe_instance(self, instance: TaskInstance) -> dict[str, Any]:
        return {"pid": None}

    def inspect_instance(self, instance: TaskInstance) -> dict[str, Any]:
        handle = instance.handle
        if not isinstance(handle, WasmHandle):
            return {}
        compiled = handle.compiled
        limits = handle.limits
        info: dict[str, Any] = {
            "convention": compiled.convention.value,
            "module": compiled.digest[:12],
            "module_source": compiled.source,
            "wasmtime": WASMTIME_VERSION,
            "calls": handle.calls,
            "memory_bytes": handle.memory_bytes,
            "memory_limit_mb": (
                limits.memory_bytes / 2**20 if limits.memory_bytes is not None else None
            ),
            "fuel": limits.fuel,
            "thread": handle.thread.name,
        }
        if compiled.convention is Convention.COMMAND:
            info["last_exit_code"] = handle.last_exit_code
            info["stderr_tail"] = handle.stderr_tail
        elif compiled.uses_wasi:
            info["stdout_tail"] = read_tail(handle.stdout_path)
            info["stderr_tail"] = read_tail(handle.stderr_path)
        if handle.broken:
            info["broken"] = handle.broken
        return info
