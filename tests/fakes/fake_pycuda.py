"""A faithful stand-in for the part of ``pycuda.driver`` the TensorRT engine uses.

Names and signatures follow pycuda 2024-2026 (``init``, ``Device(n)`` with
``count``/``name``/``compute_capability``/``retain_primary_context``, ``Context``
``push``/``pop``/``detach``, ``Stream`` with ``handle``/``synchronize``/
``wait_for_event``, ``Event`` ``record``/``synchronize``/``query``, ``mem_alloc``,
``pagelocked_empty``, ``memcpy_htod_async``/``memcpy_dtoh_async``).

What it checks, as CUDA would: device memory calls need a current context in the
calling thread (a per-thread context stack); async copies need page-locked host
memory. What it simulates: work queued on a stream runs only when something
waits for it (``Event.synchronize``, ``Stream.synchronize``, or a stream that
waits on an event), so code that reads results before waiting, or overwrites a
host buffer while its copy is still queued, gets wrong numbers here too. Every
call is recorded in ``FakeCuda.calls``, and so is each ``Stream`` and ``Event``
destroyed (``("Stream.free", handle, live)``, ``("Event.free", id, live)``):
``live`` is False where pycuda's destructor would skip the cleanup (no live
context current in the destroying thread). ``Context.detach()`` releases the
primary context only in the thread that retained it, or where it is current,
as pycuda's does; elsewhere it does nothing (recorded as ``("detach", device,
False)``).
"""

from __future__ import annotations

import importlib.machinery
import itertools
import threading
import types
import weakref

import numpy as np


class Error(Exception):
    """pycuda.driver.Error: the base of the driver's errors (not a RuntimeError)."""


class LogicError(Error):
    pass


class CudaMemoryError(Error):
    """pycuda.driver.MemoryError (e.g. cuMemAlloc failed: out of memory)."""


class FakeCuda:
    """Shared state of the fake driver: GPUs, device memory, streams, recorded calls."""

    def __init__(self, gpus=(("NVIDIA RTX A6000", (8, 6)),)):
        self.gpus = [tuple(g) for g in gpus]
        self.calls: list[tuple] = []
        self.memory: dict[int, np.ndarray] = {}  # base address -> uint8 buffer
        self._next_address = itertools.count(0x7F0000000000, 0x100000)
        self.streams: "weakref.WeakValueDictionary[int, Stream]" = weakref.WeakValueDictionary()
        self.pinned: list[np.ndarray] = []
        self.local = threading.local()
        self.initialised = False
        self.retained: dict[int, int] = {}  # device -> retain count

    # -- helpers used by the fake tensorrt ------------------------------------------------
    def stack(self) -> list:
        if not hasattr(self.local, "stack"):
            self.local.stack = []
        return self.local.stack

    def current_device(self) -> int:
        stack = self.stack()
        if not stack:
            raise LogicError("no CUDA context is current in this thread (cuCtxGetCurrent returned NULL)")
        return stack[-1].device

    def buffer(self, address: int, nbytes: int) -> np.ndarray:
        for base, buf in self.memory.items():
            if base <= address and address + nbytes <= base + buf.nbytes:
                return buf[address - base: address - base + nbytes]
        raise LogicError(f"address {address:#x} (+{nbytes} bytes) is not inside any device allocation")

    def is_pinned(self, array: np.ndarray) -> bool:
        base = array
        while isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        return any(base is p for p in self.pinned)

    def record(self, *call) -> None:
        self.calls.append(call)

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def context_live(self) -> bool:
        """Whether a context that is not detached is current in this thread."""
        stack = self.stack()
        return bool(stack) and not stack[-1].detached


def make_modules(state: FakeCuda) -> tuple[types.ModuleType, types.ModuleType]:
    """(``pycuda`` package, ``pycuda.driver``) modules bound to ``state``."""

    def require_init():
        if not state.initialised:
            raise LogicError("cuInit has not been called: call pycuda.driver.init() first")

    def require_context():
        require_init()
        return state.current_device()

    class Context:
        def __init__(self, device: int):
            self.device = device
            self.detached = False
            self.thread = threading.get_ident()  # the thread that retained it

        def push(self):
            if self.detached:
                raise LogicError("context was detached")
            state.stack().append(self)
            state.record("push", self.device)

        @staticmethod
        def pop():
            stack = state.stack()
            if not stack:
                raise LogicError("cuCtxPopCurrent failed: no current context")
            ctx = stack.pop()
            state.record("pop", ctx.device)

        def detach(self):
            stack = state.stack()
            released = not self.detached and (self.thread == threading.get_ident() or (stack and stack[-1] is self))
            if released:
                state.retained[self.device] -= 1
                if stack and stack[-1] is self:
                    stack.pop()
            self.detached = True
            state.record("detach", self.device, bool(released))

        @staticmethod
        def get_current():
            stack = state.stack()
            return stack[-1] if stack else None

    class Device:
        def __init__(self, number: int):
            require_init()
            if not 0 <= number < len(state.gpus):
                raise LogicError(f"cuDeviceGet failed: invalid device ordinal {number}")
            self.number = number

        @staticmethod
        def count() -> int:
            require_init()
            return len(state.gpus)

        def name(self) -> str:
            return state.gpus[self.number][0]

        def compute_capability(self) -> tuple[int, int]:
            return tuple(state.gpus[self.number][1])

        def retain_primary_context(self) -> Context:
            state.retained[self.number] = state.retained.get(self.number, 0) + 1
            state.record("retain_primary_context", self.number)
            return Context(self.number)

        def make_context(self, *args, **kwargs):
            raise AssertionError("the engine must share the primary context (retain_primary_context), not make its own")

    class Stream:
        _handles = itertools.count(0x5000)

        def __init__(self, flags: int = 0):
            self.device = require_context()
            self.handle = next(self._handles)
            self.queue: list = []  # pending closures
            self.done = 0  # closures run so far
            self.queued = 0
            state.streams[self.handle] = self
            state.record("Stream", self.handle)

        def enqueue(self, fn) -> None:
            self.queue.append(fn)
            self.queued += 1

        def run_until(self, position: int) -> None:
            while self.done < position:
                fn = self.queue.pop(0)
                self.done += 1
                fn()

        def synchronize(self):
            state.record("Stream.synchronize", self.handle)
            self.run_until(self.queued)

        def is_done(self) -> bool:
            return self.done == self.queued

        def __del__(self):
            if hasattr(self, "handle"):  # else __init__ failed: nothing was created
                state.record("Stream.free", self.handle, state.context_live())

        def wait_for_event(self, event: "Event"):
            state.record("Stream.wait_for_event", self.handle, event.id)
            target = (event.stream, event.position)
            if target[0] is not None:
                self.enqueue(lambda: target[0].run_until(target[1]))

    class Event:
        _ids = itertools.count(1)

        def __init__(self, flags: int = 0):
            self.id = next(self._ids)
            self.stream = None
            self.position = 0

        def record(self, stream: Stream | None = None):
            if stream is None:
                raise AssertionError("record events on the engine's own streams, not the default stream")
            self.stream, self.position = stream, stream.queued
            state.record("Event.record", self.id, stream.handle)
            return self

        def synchronize(self):
            state.record("Event.synchronize", self.id)
            if self.stream is not None:
                self.stream.run_until(self.position)
            return self

        def query(self) -> bool:
            return self.stream is None or self.stream.done >= self.position

        def __del__(self):
            state.record("Event.free", self.id, state.context_live())

    class DeviceAllocation:
        def __init__(self, address: int, nbytes: int):
            self.address, self.nbytes = address, nbytes

        def __int__(self):
            return self.address

        __index__ = __int__

        def free(self):
            state.memory.pop(self.address, None)

    def mem_alloc(nbytes: int) -> DeviceAllocation:
        require_context()
        address = next(state._next_address)
        state.memory[address] = np.zeros(int(nbytes), np.uint8)
        state.record("mem_alloc", int(nbytes))
        return DeviceAllocation(address, int(nbytes))

    def pagelocked_empty(shape, dtype, order="C", mem_flags=0) -> np.ndarray:
        require_context()
        array = np.empty(shape, dtype, order=order)
        state.pinned.append(array)
        state.record("pagelocked_empty", tuple(np.atleast_1d(shape)), np.dtype(dtype).name)
        return array

    def _check_async(host: np.ndarray, stream) -> None:
        require_context()
        if not isinstance(stream, Stream):
            raise AssertionError("async copies must go to one of the engine's streams")
        if not state.is_pinned(host):
            raise LogicError("async copy with pageable host memory: use pagelocked_empty buffers")
        if not host.flags.c_contiguous:
            raise LogicError("host buffer must be contiguous")

    def memcpy_htod_async(dest, src: np.ndarray, stream=None):
        _check_async(src, stream)
        address, nbytes = int(dest), src.nbytes
        state.buffer(address, nbytes)  # bounds check now
        state.record("memcpy_htod_async", address, nbytes, stream.handle)
        # reads the host buffer when the copy runs, as the DMA engine would
        stream.enqueue(lambda: state.buffer(address, nbytes).__setitem__(slice(None), src.reshape(-1).view(np.uint8)))

    def memcpy_dtoh_async(dest: np.ndarray, src, stream=None):
        _check_async(dest, stream)
        address, nbytes = int(src), dest.nbytes
        state.buffer(address, nbytes)
        state.record("memcpy_dtoh_async", address, nbytes, stream.handle)
        stream.enqueue(lambda: dest.reshape(-1).view(np.uint8).__setitem__(slice(None), state.buffer(address, nbytes)))

    def init(flags: int = 0):
        state.initialised = True
        state.record("init")

    driver = types.ModuleType("pycuda.driver")
    for name, value in dict(
        init=init, Device=Device, Context=Context, Stream=Stream, Event=Event, DeviceAllocation=DeviceAllocation,
        mem_alloc=mem_alloc, pagelocked_empty=pagelocked_empty, memcpy_htod_async=memcpy_htod_async,
        memcpy_dtoh_async=memcpy_dtoh_async, LogicError=LogicError, MemoryError=CudaMemoryError, Error=Error,
    ).items():
        setattr(driver, name, value)
    driver.__spec__ = importlib.machinery.ModuleSpec("pycuda.driver", None)
    package = types.ModuleType("pycuda")
    package.driver = driver
    package.VERSION = (2026, 1)
    package.__path__ = []
    package.__spec__ = importlib.machinery.ModuleSpec("pycuda", None, is_package=True)
    return package, driver
