"""The one small interface every inference engine implements, and what each declares.

An engine loads an ONNX PtychoNN model and turns a float32 batch
``(n, 1, H, W)`` of preprocessed diffraction frames into float32 phase images
``(n, 1, H, W)`` in radians, for any ``1 <= n <= max_batch``. Engines are
created in the consumer's own process (``start()``), never at import time, and
import their heavy libraries (onnxruntime, torch, tensorrt) lazily.

Each engine class carries an :class:`EngineSpec` (``SPEC``): the libraries it
imports, the devices and precisions it offers, which precisions run natively on
which CPUs, and where ``engine: auto`` ranks it. The registry, ``auto`` and the
bench read only that. An engine class may also define ``count_gpus()`` (how many
GPUs its library sees; default :func:`edge_ptychonn.devices.visible_gpu_count`).

Optional asynchronous pair: an engine may offer ``submit(batch) -> ticket``
(returns once the work is queued; the batch may be reused at once) and
``collect(ticket) -> array`` (waits for that result), with at most
``max_in_flight`` tickets outstanding, collected in submission order, both
called from one thread at a time (the pipeline's batch runner). A caller
that submits batch k+1 before collecting batch k overlaps k+1's copy-in with k's
compute. ``infer(batch)`` is always ``collect(submit(batch))`` for such engines.
Such an engine may also offer ``done(ticket) -> bool``: whether ``collect`` would
return at once, never waiting (the GPU engines: the batch's event reached; CPU
workers): the pipeline then leaves a batch in flight while it receives frames.
"""

from __future__ import annotations

import importlib
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

# Every precision some engine offers; each engine declares its own subset.
PRECISIONS = ("fp32", "tf32", "fp16", "bf16")


@dataclass(frozen=True)
class AutoCandidate:
    """One way ``engine: auto`` may run this engine.

    ``rank``: higher wins among the candidates that can run here. CPU ranks are
    frames/s relative to ONNX Runtime fp32 measured on the development CPU
    (docs/benchmarks.md); GPU ranks only order the GPU engines (TensorRT first).
    Only precisions whose results stay within the tolerance below are listed.
    """

    device: str  # 'cpu' or 'cuda'
    precision: str
    rank: float


# The tolerance a reduced precision must meet, against fp32 on the shipped model, for
# 'auto' to pick it: per-frame RMS phase difference <= 0.05 rad (the phase spans about
# 1.5 rad) and the stitched phase's SSIM against the truth within 0.01. Measured for
# bf16 on the CPU: 0.017 rad RMS, SSIM 0.7616 vs 0.7605 (docs/benchmarks.md).
AUTO_PHASE_RMS_TOLERANCE_RAD = 0.05
AUTO_SSIM_TOLERANCE = 0.01


@dataclass(frozen=True)
class EngineSpec:
    """What an engine needs and offers; read by the registry, ``auto`` and the bench."""

    name: str
    summary: str
    requires: tuple[str, ...] = ()  # importable modules it needs
    install: str = ""  # how to get them, for error messages
    devices: tuple[str, ...] = ("cpu",)  # 'cpu' and/or 'cuda'
    precisions: tuple[str, ...] = ("fp32",)
    # precision -> CPU flags (/proc/cpuinfo) of which any makes it run natively on the
    # CPU; a CPU precision not listed is emulated (slow). fp32 is always native.
    cpu_native: dict[str, tuple[str, ...]] = field(default_factory=dict)
    gpu_only: tuple[str, ...] = ()  # precisions offered on a GPU only (e.g. tf32)
    auto: tuple[AutoCandidate, ...] = ()
    computes_model: bool = True  # False: a stand-in that does not run the network

    def native_on_cpu(self, precision: str, flags: frozenset[str] | None = None) -> bool:
        """Whether ``precision`` runs natively (not emulated) on this CPU with this engine."""
        if precision in ("fp32", "tf32") or not self.computes_model:
            return True
        needs = self.cpu_native.get(precision)
        if not needs:
            return False
        if flags is None:
            from edge_ptychonn.devices import cpu_flags

            flags = cpu_flags()
        return any(flag in flags for flag in needs)

    def precisions_on(self, device_kind: str) -> tuple[str, ...]:
        """The precisions offered on ``device_kind`` ('cpu' or 'cuda'); () if the device is not."""
        if device_kind not in self.devices:
            return ()
        return tuple(p for p in self.precisions if device_kind == "cuda" or p not in self.gpu_only)

    def check_precision(self, precision: str) -> None:
        if precision not in self.precisions:
            raise EngineUnavailable(
                f"the {self.name} engine offers precisions {', '.join(self.precisions)}, not {precision!r}"
            )


@dataclass(frozen=True)
class EngineOptions:
    """What every engine factory receives."""

    model_path: Path
    device: str = "auto"  # see edge_ptychonn.devices: 'auto', 'cpu', 'cuda', 'cuda:N', 'cuda:A,B,...'
    precision: str = "fp32"  # one of the engine's SPEC.precisions; 'auto' only with engine 'auto'
    max_batch: int = 8
    cpu_threads: int = 0  # threads per worker; 0: cpu_layout() chooses
    cpu_workers: int = 1  # batches at once on the CPU, each on its own engine copy (engines.workers); 0: cpu_layout()
    consumers: int = 1  # consumers sharing this machine's cores (cpu_layout's share)
    processor_id: int = 1  # picks the GPU with device='auto': (id - 1) % n_gpus
    plan_cache_dir: Path | None = None  # TensorRT plans; None: default_plan_cache_dir()
    cuda_graphs: bool = True  # torch on a GPU: replay a captured CUDA graph for full batches

    def __post_init__(self) -> None:
        """ValueError naming the option for values no engine can run with (before: a batch size
        of 0 failed in the warm-up as 'batch size must be 1..0', or the zero engine took it)."""
        for name, lowest in (("max_batch", 1), ("cpu_threads", 0), ("cpu_workers", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lowest:
                raise ValueError(f"{name} must be an integer >= {lowest}, got {value!r}")


@runtime_checkable
class Engine(Protocol):
    name: str  # registry name, e.g. 'onnxruntime'
    device: str  # where it runs, e.g. 'cpu' or 'cuda:0 (NVIDIA RTX A6000)'; create_engine adds the CPU layout
    precision: str
    input_shape: tuple[int, int]  # (H, W) of one frame
    max_batch: int

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """(n, 1, H, W) float32 -> (n, 1, H, W) float32, 1 <= n <= max_batch."""
        ...

    def close(self) -> None:
        """Release the engine's resources; infer() must not be called after."""
        ...


# Default workers per consumer at most: beyond, the cores go to more threads per worker
# (each batch in flight holds one of the pipeline's queueBatches + 2 batch buffers).
MAX_DEFAULT_WORKERS = 4


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (``taskset``, ``numactl``, a
    container's cpuset), not every core of the host (``os.cpu_count()``)."""
    import os

    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no affinity API (macOS)
        return os.cpu_count() or 1


def cpu_layout(threads: int = 0, workers: int = 0, consumers: int = 1, cores: int | None = None) -> tuple[int, int]:
    """(workers, threads per worker) of one consumer's engine on the CPU; 0 = choose.

    The consumer's share of the cores is ``cores // consumers`` (at least 1), where
    ``cores`` defaults to :func:`usable_cores` (the cores this process may run on). By
    default it runs as workers of one thread each (at most
    :data:`MAX_DEFAULT_WORKERS`; more cores give each worker more threads): copies
    of the engine, each with its own batch (``engines.workers``), which do not wait
    for each other when PvaPy's threads take a core, where one engine's threads
    do. Measured on 2 cores, one consumer, torch bf16: 1 worker x 1 thread kept
    up with 0.41 of the engine alone, 1 x 2 threads lost frames from 300 frames/s,
    2 workers x 1 thread 0.70-0.73 (docs/benchmarks.md). A value given for one
    of the two sets the other to fill the share.
    """
    share = max(1, (cores or usable_cores()) // max(1, consumers))
    if threads and workers:
        return workers, threads
    if threads:
        return max(1, share // threads), threads
    if not workers:
        workers = min(share, MAX_DEFAULT_WORKERS)
    return workers, max(1, share // workers)


def cpu_layout_device(device: str, workers: int, threads: int) -> str:
    """``device`` with the CPU layout it runs, e.g. ``"cpu (1 worker x 2 threads)"`` or
    ``"cpu (2 workers x 1 thread)"``: what a consumer's statistics call its ``device``."""
    return f"{device} ({workers} worker{'s' if workers != 1 else ''} x {threads} thread{'s' if threads != 1 else ''})"


def default_cpu_threads() -> int:
    """Threads of an engine class created directly with ``cpu_threads`` 0 (``create_engine``
    resolves them first, with :func:`cpu_layout`): all usable cores, as one worker."""
    return cpu_layout(workers=1)[1]


# glibc mallopt() parameters
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed memory for reuse instead of returning it to the OS.

    PyTorch's CPU allocator frees every intermediate tensor, and glibc unmaps large
    blocks on free; the next batch faults the same pages in again. With the shipped
    model (torch bf16, batch 8, 1 thread) that was about 2,900 page faults and 16 %
    of the time per batch (197 -> 236 frames/s with this set, 0 faults per batch).
    Raises the mmap threshold to glibc's maximum (32 MiB) and keeps up to 1 GiB free
    at the top of the heap. Process-wide; a no-op (False) where the C library is not glibc.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    settings = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20))
    return all(mallopt(key, value) == 1 for key, value in settings)


class EngineUnavailable(RuntimeError):
    """The engine cannot run here (library or device missing); says what to install."""


def import_libraries(spec: EngineSpec, *modules: str) -> tuple:
    """Import ``modules`` (an engine's libraries, e.g. ``"pycuda.driver"``), in order; the modules.

    EngineUnavailable, one line, when one cannot be imported: a module missing
    (ModuleNotFoundError: the library itself, or a module it needs) says which is not
    installed and how to install (``spec.install``); any other ImportError (the library is
    there, but its import failed: a native library missing, the import interrupted by
    Ctrl-C) says that it is installed but cannot be imported, with the import's own error."""
    loaded = []
    for module in modules:
        library = module.partition(".")[0]
        try:
            loaded.append(importlib.import_module(module))
        except ImportError as exc:
            needs = f"the {spec.name} engine needs {' and '.join(spec.requires)}"
            if isinstance(exc, ModuleNotFoundError):
                missing = exc.name or module
                what = (f"{library} is not installed" if missing.partition(".")[0] == library
                        else f"{library} needs {missing}, which is not installed")
                raise EngineUnavailable(f"{needs}; {what}: {spec.install}") from exc
            error = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
            raise EngineUnavailable(f"{needs}; {library} is installed but cannot be imported: "
                                    f"{type(exc).__name__}" + (f": {error}" if error else "")) from exc
    return tuple(loaded)


class ModelNotSupported(EngineUnavailable, ValueError):
    """This engine cannot run this model (e.g. the torch engine and a graph that is not
    PtychoNN's); another engine may, so ``engine: auto`` tries the next candidate."""


# precision -> the lowest CUDA compute capability that runs it natively (tf32 and bf16: Ampere)
MIN_COMPUTE_CAPABILITY = {"fp32": (0, 0), "tf32": (8, 0), "fp16": (5, 3), "bf16": (8, 0)}


def check_compute_capability(precision: str, gpu_name: str, capability: tuple[int, int]) -> None:
    """EngineUnavailable (one line, naming what to use instead) unless a GPU of compute capability
    ``capability`` (major, minor) runs ``precision`` natively; read before any work on the GPU."""
    major, minor = capability
    need = MIN_COMPUTE_CAPABILITY.get(precision, (0, 0))
    if (major, minor) < need:
        raise EngineUnavailable(
            f"{precision} needs compute capability {need[0]}.{need[1]} or later; "
            f"{gpu_name} has {major}.{minor}: use fp32" + (" or fp16" if (major, minor) >= (5, 3) else "")
        )


def engine_device(spec: EngineSpec, options: EngineOptions, n_gpus: int) -> str:
    """The one device (``'cpu'`` or ``'cuda:N'``) this engine runs on for this consumer."""
    from edge_ptychonn.devices import DeviceUnavailable, resolve_device

    try:
        return resolve_device(
            options.device, options.processor_id, n_gpus, supports_cuda="cuda" in spec.devices,
            supports_cpu="cpu" in spec.devices, engine=f"the {spec.name} engine",
        )
    except DeviceUnavailable as exc:
        raise EngineUnavailable(str(exc)) from exc


def check_batch(engine: Engine, batch: np.ndarray) -> None:
    """Raise ValueError unless ``batch`` fits ``engine``."""
    h, w = engine.input_shape
    if batch.ndim != 4 or batch.shape[1:] != (1, h, w):
        raise ValueError(f"batch must be (n, 1, {h}, {w}), got {batch.shape}")
    if not 1 <= batch.shape[0] <= engine.max_batch:
        raise ValueError(f"batch size must be 1..{engine.max_batch}, got {batch.shape[0]}")


class FixedBatchRunner:
    """Runs any batch through a model whose batch size is fixed at ``fixed``.

    Partial batches are padded with zeros (into a preallocated buffer) and larger
    ones split into chunks; only the real frames' results are returned.
    """

    def __init__(self, fixed: int, frame_shape: tuple[int, int]):
        self.fixed = fixed
        self._pad = np.zeros((fixed, 1, *frame_shape), dtype=np.float32)

    def run(self, batch: np.ndarray, run_fixed) -> np.ndarray:
        outputs = []
        for start in range(0, batch.shape[0], self.fixed):
            chunk = batch[start : start + self.fixed]
            n = chunk.shape[0]
            if n < self.fixed:
                self._pad[:n] = chunk
                self._pad[n:] = 0.0
                chunk = self._pad
            outputs.append(run_fixed(chunk)[:n])
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)


@dataclass(frozen=True)
class Ticket:
    """A batch submitted to an asynchronous engine: which buffer set, how many frames."""

    seq: int
    slot: int
    n: int


class SlotRing:
    """Round-robin buffer sets behind ``submit``/``collect``.

    With two sets, the copy-in of batch k+1 (into set B) can overlap the compute
    of batch k (set A). A set is reused only after its previous ticket has been
    collected, so host and device buffers are never overwritten while in use: at
    most ``n_slots`` tickets are outstanding, and they are collected in order.
    """

    def __init__(self, n_slots: int = 2):
        if n_slots < 1:
            raise ValueError(f"n_slots must be >= 1, got {n_slots}")
        self.n_slots = n_slots
        self._seq = 0
        self._pending: list[Ticket] = []

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def acquire(self, n: int) -> Ticket:
        if len(self._pending) >= self.n_slots:
            raise RuntimeError(
                f"{self.n_slots} batches already in flight: collect() the oldest before submitting another"
            )
        ticket = Ticket(self._seq, self._seq % self.n_slots, n)
        self._seq += 1
        self._pending.append(ticket)
        return ticket

    def release(self, ticket: Ticket) -> None:
        if not self._pending or self._pending[0] != ticket:
            raise RuntimeError("collect() tickets in the order they were submitted")
        self._pending.pop(0)

    def cancel(self, ticket: Ticket) -> None:
        """Undo the latest ``acquire`` (a submit that failed): its slot and sequence
        number are reused by the next ticket, so batches still in flight keep theirs."""
        if not self._pending or self._pending[-1] != ticket:
            raise RuntimeError("only the most recently acquired ticket can be cancelled")
        self._pending.pop()
        self._seq -= 1
