"""TensorRT engine (TensorRT 10 and 11 Python API) with pycuda buffers and a plan cache.

Build: the ONNX model is parsed into a network (strongly typed where the API has
the flag; TensorRT 11 networks always are), with one optimisation profile for
batches ``1..max_batch`` (opt = max), so partial batches run at their own size
without padding (models exported with a fixed batch run padded at that batch).
Precisions: ``fp32`` (TF32 off), ``tf32`` (compute capability >= 8.0), ``fp16``
and ``bf16`` (>= 8.0): the reduced ones by converting the ONNX graph's types
(:mod:`engines.onnx_precision`, float32 inputs and outputs kept), since TensorRT
11 removed ``BuilderFlag.FP16``/``BF16``. ``build_serialized_network`` makes the
plan; the calls used are listed in :data:`TRT_API` and pinned by contract tests.

Plan cache: plans are stored in ``planCacheDir`` (default
:func:`default_plan_cache_dir`), named by a key of TensorRT version, GPU name,
compute capability, the ONNX file's SHA-256, the profile and the precision (and
the precision's conversion recipe, :func:`engines.onnx_precision.recipe`); a JSON
sidecar holds the key. A plan whose sidecar does not match, that cannot be read,
or that TensorRT will not deserialize is rebuilt, with a log line. Concurrent consumers on one host take a
file lock, so one builds and the others load. A cache folder this process cannot
write (a shared, prebuilt one) is read without the lock; a plan that must be
built there runs without being cached, with a log line (``plan_source`` ends in
``, not cached``). ``edge-ptychonn build-engine`` builds plans ahead of time so
that a consumer starts in seconds.

Run: pycuda on the device's primary context (``Device(n).retain_primary_context()``,
retained once per process and device by :func:`primary_context`, pushed in the
calling thread for every call; never ``pycuda.autoinit``), so it shares the
context with PyTorch. Two buffer sets (page-locked host input and output, device
input and outputs), a copy stream and a compute stream: the copy-in of the next
batch overlaps the compute of this one; ``submit`` returns once the work is
queued, ``collect`` waits for its result (``infer`` = both). ``close`` frees the
buffers, streams and events with the context current (from any thread).

Log: TensorRT's own messages go to this module's Python logger (``engines.tensorrt_engine``),
through :func:`tensorrt_logger` (a ``trt.ILogger`` subclass), with the consumer's other log
lines: its errors and warnings at ERROR (CRITICAL for internal errors) and WARNING, its
information at DEBUG and its verbose build details at :data:`TRT_VERBOSE`, below DEBUG.

Honesty: no TensorRT or GPU is reachable where this project is developed; this
module has run only against the stand-in in ``tests/fakes`` (the 10/11 API
names and signatures, recorded calls, outputs computed with ONNX Runtime).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import threading
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edge_ptychonn.files import remove_stale_partials, write_bytes_whole

from .base import (
    AutoCandidate, EngineOptions, EngineSpec, EngineUnavailable, FixedBatchRunner, SlotRing, Ticket, check_batch,
    check_compute_capability, engine_device, import_libraries,
)
from .onnx_model import read_signature
from .onnx_precision import recipe

log = logging.getLogger(__name__)

# The TensorRT Python API this engine uses (10.x and 11.x); nothing removed in 10 or 11.
TRT_API = {
    "module": ("__version__", "ILogger", "Builder", "OnnxParser", "Runtime", "MemoryPoolType", "BuilderFlag",
               "TensorIOMode", "NetworkDefinitionCreationFlag", "nptype"),
    "ILogger": ("Severity", "log"),
    "ILogger.Severity": ("INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"),
    "Builder": ("create_network", "create_builder_config", "create_optimization_profile", "build_serialized_network"),
    "OnnxParser": ("parse", "num_errors", "get_error"),
    "IBuilderConfig": ("set_memory_pool_limit", "set_flag", "clear_flag", "add_optimization_profile"),
    "IOptimizationProfile": ("set_shape",),
    "Runtime": ("deserialize_cuda_engine",),
    "ICudaEngine": ("num_io_tensors", "get_tensor_name", "get_tensor_mode", "get_tensor_dtype",
                    "create_execution_context"),
    "IExecutionContext": ("set_input_shape", "get_tensor_shape", "set_tensor_address", "execute_async_v3"),
    "MemoryPoolType": ("WORKSPACE",),
    "BuilderFlag": ("TF32",),
    "TensorIOMode": ("INPUT", "OUTPUT"),
}
# Removed from TensorRT 10 or 11: never used here (the contract tests check this file).
TRT_REMOVED = ("build_engine", "execute_async_v2", "max_workspace_size", "EXPLICIT_BATCH", "BuilderFlag.FP16",
               "BuilderFlag.BF16", "get_binding", "num_bindings", "binding_is_input")
PYCUDA_API = {
    "driver": ("init", "Device", "Stream", "Event", "mem_alloc", "pagelocked_empty", "memcpy_htod_async",
               "memcpy_dtoh_async"),
    "Device": ("count", "name", "compute_capability", "retain_primary_context"),
    "Context": ("push", "pop"),
    "Stream": ("handle", "synchronize", "wait_for_event"),
    "Event": ("record", "synchronize"),
}

WORKSPACE_BYTES = 1 << 30

# TensorRT's verbose messages are logged at this level, below DEBUG: a build makes thousands
# of them (one or more per layer and tactic), which would bury the DEBUG log of everything else
TRT_VERBOSE = 5
# Python logging level for each TensorRT severity (ILogger.Severity's members, by name)
TRT_LOG_LEVELS = {
    "INTERNAL_ERROR": logging.CRITICAL, "ERROR": logging.ERROR, "WARNING": logging.WARNING,
    "INFO": logging.DEBUG, "VERBOSE": TRT_VERBOSE,
}

# tensorrt module -> the process's one logger for it (see tensorrt_logger)
_TRT_LOGGERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TRT_LOGGER_LOCK = threading.Lock()


def _logging_bridge_class(trt):
    """A ``trt.ILogger`` subclass that hands TensorRT's messages to a Python logger (made
    here: ``trt`` is imported only when the engine starts)."""
    members = trt.ILogger.Severity

    class LoggingBridge(trt.ILogger):
        """TensorRT's messages as Python log records of ``target``, prefixed ``TensorRT:``.

        TensorRT calls ``log`` for every message, whatever its severity, so the levels of
        :data:`TRT_LOG_LEVELS` and ``target``'s own level do the filtering: errors and
        warnings reach a consumer's usual log; TensorRT's information (memory use, timing
        cache, plan sizes: a few dozen lines per build) is at DEBUG, so that the INFO log
        keeps this engine's own lines about building and loading plans, not TensorRT's
        chatter; its verbose messages are at TRT_VERBOSE. To see them:
        ``logging.getLogger("engines.tensorrt_engine").setLevel(TRT_VERBOSE)``.

        TensorRT may call ``log`` from any thread (logging is thread-safe), and an exception
        must not get back to it: it cannot take one (the message then goes to stderr).
        """

        def __init__(self, target: logging.Logger):
            trt.ILogger.__init__(self)
            self.target = target
            self.levels = {getattr(members, name): level for name, level in TRT_LOG_LEVELS.items()}

        def log(self, severity, msg):
            try:
                level = self.levels.get(severity, logging.WARNING)
                if self.target.isEnabledFor(level):
                    self.target.log(level, "TensorRT: %s", str(msg).rstrip())
            except Exception:
                with contextlib.suppress(Exception):
                    print(f"TensorRT: {msg}", file=sys.stderr)

    return LoggingBridge


def tensorrt_logger(trt):
    """The logger every TensorRT builder, parser and runtime of this process is given: one
    per ``tensorrt`` module, made on first use, kept for as long as the module is (TensorRT
    needs a logger to outlive everything made through it, and its older versions asked for
    one logger per process). It sends TensorRT's messages to this module's logger:
    see ``LoggingBridge`` in :func:`_logging_bridge_class`."""
    with _TRT_LOGGER_LOCK:
        logger = _TRT_LOGGERS.get(trt)
        if logger is None:
            logger = _TRT_LOGGERS[trt] = _logging_bridge_class(trt)(log)
        return logger


# pycuda driver module -> {device number: its primary context, retained once}
_PRIMARY_CONTEXTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PRIMARY_LOCK = threading.Lock()


def primary_context(cuda, number: int):
    """Device ``number``'s primary context, retained once per process (and pycuda
    driver module) and never detached; every engine on that device shares it.

    Why not retain and detach per engine: pycuda's ``Context.detach()`` releases the
    context only on the thread that retained it (elsewhere it does nothing), and a
    model swap closes the old engine on the inference thread, not the configure
    thread that created it; and the primary context is PyTorch's too, so releasing
    it gains nothing while the process lives. Thread-safe.
    """
    with _PRIMARY_LOCK:
        contexts = _PRIMARY_CONTEXTS.setdefault(cuda, {})
        if number not in contexts:
            contexts[number] = cuda.Device(number).retain_primary_context()
        return contexts[number]


def default_plan_cache_dir() -> Path:
    """``$EDGE_PTYCHONN_PLAN_CACHE``, else ``$XDG_CACHE_HOME/edge-ptychonn/tensorrt``
    (``~/.cache/edge-ptychonn/tensorrt``)."""
    if os.environ.get("EDGE_PTYCHONN_PLAN_CACHE"):
        return Path(os.environ["EDGE_PTYCHONN_PLAN_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "edge-ptychonn" / "tensorrt"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class PlanKey:
    """Everything a serialized plan is valid for."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # e.g. '8.6'
    onnx_sha256: str
    profile: str  # 'input:1x1x128x128/8x1x128x128/8x1x128x128' (min/opt/max)
    precision: str
    recipe: str

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    def file_name(self, stem: str) -> str:
        return f"{stem}-{self.precision}-{self.digest()[:20]}.plan"


# PlanCache.store's files are written under hidden names of this process (one per process):
# two threads storing the same plan at once (where the file lock is not to be had) would write
# one file together
_STORE_LOCK = threading.Lock()


class PlanCache:
    """Serialized plans on disk: ``<name>.plan`` beside ``<name>.json`` (the key)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def path(self, key: PlanKey, stem: str) -> Path:
        return self.directory / key.file_name(stem)

    def load(self, key: PlanKey, stem: str) -> bytes | None:
        """The cached plan for ``key``, or None (missing, stale or unreadable: logged)."""
        path = self.path(key, stem)
        if not path.exists():
            return None
        try:
            stored = json.loads(path.with_suffix(".json").read_text())
            plan = path.read_bytes()
        except (OSError, ValueError) as exc:
            log.warning("TensorRT plan %s is unreadable (%s); rebuilding it", path, exc)
            return None
        if not isinstance(stored, dict):
            log.warning("TensorRT plan %s has no key in its sidecar (%s); rebuilding it", path, type(stored).__name__)
            return None
        if stored != asdict(key):
            changed = sorted(k for k in asdict(key) if stored.get(k) != asdict(key)[k])
            log.warning("TensorRT plan %s is stale (%s differ); rebuilding it", path, ", ".join(changed) or "key")
            return None
        return plan

    def store(self, key: PlanKey, stem: str, plan: bytes) -> Path:
        """Write atomically (a reader never sees half a plan): each file under a hidden name of
        this process, then renamed; the sidecar first, so that a plan is never seen without
        its key. Stores in one process take turns: their hidden names are the same."""
        with _STORE_LOCK:
            self.directory.mkdir(parents=True, exist_ok=True)
            remove_stale_partials(self.directory, log)
            path = self.path(key, stem)
            for target, data in ((path.with_suffix(".json"), json.dumps(asdict(key), indent=1).encode()),
                                 (path, plan)):
                write_bytes_whole(target, data)
            return path

    @contextlib.contextmanager
    def lock(self, key: PlanKey, stem: str):
        """An exclusive lock per plan, so concurrent consumers build it once; yields whether
        it is held. A cache this process may read but not write (a shared, prebuilt one)
        is used without the lock where its lock file cannot be opened (plans are written
        whole: a reader never sees half of one)."""
        import fcntl

        path = self.path(key, stem).with_suffix(".lock")
        fd = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            with contextlib.suppress(OSError):  # an existing lock file: still wait for a build under way
                fd = os.open(path, os.O_RDONLY)
        if fd is None:
            log.debug("TensorRT plan cache %s: cannot open or create %s; reading it without a lock", self.directory,
                      path.name)
            yield False
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:  # e.g. a file system without locks
                log.debug("TensorRT plan cache %s: cannot lock %s (%s)", self.directory, path.name, exc)
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _network_flags(trt) -> int:
    """Strongly typed: the flag's bit is 1 in 10.x and 0 in 11.x (there deprecated and ignored:
    TensorRT 11 networks always are strongly typed); none where the flag is gone."""
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 1 << int(strongly) if strongly is not None else 0


def onnx_for_precision(model_path: Path, precision: str) -> bytes:
    """The ONNX bytes TensorRT parses: the file itself, or its fp16/bf16 conversion."""
    data = Path(model_path).read_bytes()
    if precision in ("fp32", "tf32"):
        return data
    import onnx

    from .onnx_precision import to_low_precision

    try:
        return to_low_precision(onnx.load_from_string(data), precision).SerializeToString()
    except ValueError as exc:
        raise EngineUnavailable(f"{model_path}: {exc}") from exc


def build_plan(trt, logger, onnx_bytes: bytes, input_name: str, shapes: tuple, precision: str,
               workspace_bytes: int = WORKSPACE_BYTES, source: str = "model") -> bytes:
    """Parse and build; EngineUnavailable with TensorRT's reasons when either fails."""
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineUnavailable(f"TensorRT cannot parse {source}: {errors or 'no reason given'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if precision == "tf32":
        config.set_flag(trt.BuilderFlag.TF32)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, *shapes)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineUnavailable(f"TensorRT could not build a {precision} plan for {source} "
                                "(see TensorRT's messages logged above)")
    return bytes(plan)


class TensorRTEngine:
    """PtychoNN on an NVIDIA GPU with TensorRT: cached plans, pycuda buffers, async submit/collect."""

    SPEC = EngineSpec(
        name="tensorrt",
        summary="TensorRT 10/11 on an NVIDIA GPU: plan cache, pinned buffers, copy/compute overlap",
        requires=("tensorrt", "pycuda"),
        install="pip install 'edge-ptychonn[gpu]' (needs the NVIDIA driver; pycuda builds with the CUDA toolkit)",
        devices=("cuda",),
        precisions=("fp32", "tf32", "fp16", "bf16"),
        gpu_only=("tf32",),
        auto=(AutoCandidate("cuda", "fp16", 2.0),),
    )
    name = "tensorrt"
    max_in_flight = 2

    @staticmethod
    def count_gpus() -> int:
        import pycuda.driver as cuda

        cuda.init()
        return cuda.Device.count()

    def __init__(self, options: EngineOptions, *, workspace_bytes: int = WORKSPACE_BYTES):
        cuda, trt = import_libraries(self.SPEC, "pycuda.driver", "tensorrt")
        self.SPEC.check_precision(options.precision)
        t0 = time.perf_counter()
        self._trt, self._cuda = trt, cuda
        self.precision = options.precision
        self.max_batch = options.max_batch
        signature = read_signature(options.model_path)
        self.input_shape = signature.input_shape
        self._input_name = signature.input_name
        self._phase_name = signature.phase_output
        # A fixed-batch model runs at its batch (partial batches padded, larger ones split).
        self._capacity = signature.fixed_batch or options.max_batch
        self._fixed = FixedBatchRunner(signature.fixed_batch, self.input_shape) if signature.fixed_batch else None
        try:
            cuda.init()
            n_gpus = cuda.Device.count()
        except cuda.Error as exc:  # no driver, or no device it can use
            raise EngineUnavailable(f"CUDA cannot start: {type(exc).__name__}: {exc}") from exc
        device = engine_device(self.SPEC, options, n_gpus)
        self._gpu = int(device.partition(":")[2])
        dev = cuda.Device(self._gpu)
        try:
            self._context = primary_context(cuda, self._gpu)
        except cuda.Error as exc:  # e.g. a GPU in exclusive-process mode that another process holds
            raise EngineUnavailable(f"CUDA cannot start on {device}: {type(exc).__name__}: {exc}") from exc
        self._ring = SlotRing(self.max_in_flight)
        self._sync_results: dict[int, np.ndarray] = {}
        self._closed = False
        try:
            self._start(options, trt, dev, device, workspace_bytes)
            self.start_s = time.perf_counter() - t0
            log.info("tensorrt %s %s on %s: plan %s (%s) in %.2f s", trt.__version__, self.precision, self.device,
                     self.plan_path, self.plan_source, self.start_s)
            try:
                self.infer(np.zeros((min(self.max_batch, self._capacity), 1, *self.input_shape), np.float32))  # warm-up
            except RuntimeError as exc:  # TensorRT refused to run the plan: 'auto' tries the next engine
                if isinstance(exc, EngineUnavailable):
                    raise
                raise EngineUnavailable(f"TensorRT cannot run its plan on {device}: {exc}") from exc
        except cuda.Error as exc:  # the driver refused (e.g. GPU memory full): 'auto' tries the next engine
            self._close_after_failure()  # frees what was made
            raise EngineUnavailable(f"CUDA failed on {device}: {type(exc).__name__}: {exc}") from exc
        except BaseException:
            self._close_after_failure()  # frees what was made
            raise

    def _close_after_failure(self) -> None:
        """close() after a failed start; its own failure (a sticky CUDA error fails every later
        call) is logged, so that the error that stopped the start is the one raised."""
        try:
            self.close()
        except Exception as exc:
            log.warning("tensorrt: cleaning up after a failed start also failed: %s: %s", type(exc).__name__, exc)

    def _start(self, options: EngineOptions, trt, dev, device: str, workspace_bytes: int) -> None:
        with self._active():
            name = dev.name()
            major, minor = dev.compute_capability()
            check_compute_capability(self.precision, name, (major, minor))
            self.device = f"{device} ({name})"
            self._logger = tensorrt_logger(trt)
            batch_shape = lambda n: (n, 1, *self.input_shape)  # noqa: E731
            shapes = ((batch_shape(self._capacity),) * 3 if self._fixed
                      else (batch_shape(1), batch_shape(self._capacity), batch_shape(self._capacity)))
            key = PlanKey(
                tensorrt_version=str(trt.__version__), gpu_name=name, compute_capability=f"{major}.{minor}",
                onnx_sha256=file_sha256(options.model_path),
                profile=f"{self._input_name}:" + "/".join("x".join(map(str, s)) for s in shapes),
                precision=self.precision, recipe=recipe(self.precision),
            )
            cache = PlanCache(options.plan_cache_dir or default_plan_cache_dir())
            stem = Path(options.model_path).stem
            self.plan_path = cache.path(key, stem)
            self._engine, self.plan_source = self._load_or_build(
                cache, key, stem, options.model_path, shapes, workspace_bytes)
            self._setup_buffers()

    @contextlib.contextmanager
    def _active(self):
        """The device's primary context, current in this thread for the duration."""
        self._context.push()
        try:
            yield
        finally:
            self._cuda.Context.pop()

    def _load_or_build(self, cache: PlanCache, key: PlanKey, stem: str, model_path: Path, shapes, workspace_bytes):
        trt = self._trt
        runtime = trt.Runtime(self._logger)
        self._runtime = runtime
        with cache.lock(key, stem):
            plan = cache.load(key, stem)
            source = "cache"
            if plan is not None:
                try:
                    engine = runtime.deserialize_cuda_engine(plan)
                except (RuntimeError, TypeError, ValueError) as exc:  # some versions raise instead of None
                    log.warning("TensorRT deserialization raised %s: %s", type(exc).__name__, exc)
                    engine = None
                if engine is not None:
                    return engine, source
                log.warning("TensorRT could not deserialize plan %s; rebuilding it", cache.path(key, stem))
                source = "rebuilt"
            else:
                source = "built"
            t0 = time.perf_counter()
            log.info("building the TensorRT %s plan for %s (batch 1..%d); takes a while once",
                     key.precision, model_path, self._capacity)
            plan = build_plan(trt, self._logger, onnx_for_precision(model_path, key.precision), self._input_name,
                              shapes, key.precision, workspace_bytes, source=str(model_path))
            try:
                path = cache.store(key, stem, plan)
            except OSError as exc:  # a cache folder this process may not write: run the plan uncached
                log.warning("TensorRT plan built in %.1f s, but the plan cache %s is not writable (%s): running it "
                            "without caching it, so every start builds it again; run 'edge-ptychonn build-engine "
                            "--plan-cache-dir %s' as a user who may write there", time.perf_counter() - t0,
                            cache.directory, exc, cache.directory)
                path, source = None, f"{source}, not cached"
            else:
                log.info("TensorRT plan built in %.1f s: %s", time.perf_counter() - t0, path)
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise EngineUnavailable(f"TensorRT could not deserialize the plan it has just built"
                                    + (f" ({path})" if path else ""))
        return engine, source

    def _setup_buffers(self) -> None:
        trt, cuda, engine = self._trt, self._cuda, self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if inputs != [self._input_name] or self._phase_name not in self._outputs:
            raise EngineUnavailable(
                f"the plan's tensors {inputs} -> {self._outputs} do not match the model's "
                f"{self._input_name} -> {self._phase_name}"
            )
        self._exec = engine.create_execution_context()
        if self._exec is None:  # TensorRT returns None when it cannot (e.g. too little GPU memory)
            raise EngineUnavailable("TensorRT could not create an execution context "
                                    "(see TensorRT's messages logged above)")
        full = (self._capacity, 1, *self.input_shape)
        if not self._exec.set_input_shape(self._input_name, full):
            raise EngineUnavailable(f"TensorRT refused input shape {full}")
        in_dtype = self._numpy_dtype(self._input_name)
        out_shapes = {n: tuple(self._exec.get_tensor_shape(n)) for n in self._outputs}
        out_dtypes = {n: self._numpy_dtype(n) for n in self._outputs}
        if out_shapes[self._phase_name][1:] != (1, *self.input_shape):
            raise EngineUnavailable(f"phase output shape {out_shapes[self._phase_name]} is not (n, 1, *input)")
        slots = range(self.max_in_flight)
        self._h_in = [cuda.pagelocked_empty(full, in_dtype) for _ in slots]
        self._d_in = [cuda.mem_alloc(self._h_in[0].nbytes) for _ in slots]
        self._h_out = [cuda.pagelocked_empty(out_shapes[self._phase_name], out_dtypes[self._phase_name]) for _ in slots]
        self._d_out = [
            {n: cuda.mem_alloc(int(np.prod(out_shapes[n])) * out_dtypes[n].itemsize) for n in self._outputs}
            for _ in slots
        ]
        self._copy_stream = cuda.Stream()
        self._compute_stream = cuda.Stream()
        self._copied = [cuda.Event() for _ in slots]
        self._done = [cuda.Event() for _ in slots]
        for event in self._done:
            event.record(self._compute_stream)

    def _numpy_dtype(self, name: str) -> np.dtype:
        """The numpy type of I/O tensor ``name``; EngineUnavailable where it has none
        (``trt.nptype`` raises TypeError for e.g. a bf16 output of the model)."""
        dtype = self._engine.get_tensor_dtype(name)
        try:
            return np.dtype(self._trt.nptype(dtype))
        except TypeError as exc:
            raise EngineUnavailable(f"the plan's tensor {name} is {dtype}, which has no numpy type: {exc}") from exc

    # -- Engine protocol ---------------------------------------------------------------
    def submit(self, batch: np.ndarray) -> Ticket:
        """Queue ``batch`` (copy-in, inference, copy-out) and return at once; ``batch``
        may be reused when this returns. collect() the tickets in order.

        A fixed-batch model given another batch size (a partial batch, padded; or a
        larger one, split) runs here at once, chunk by chunk through this ticket's
        buffer set, and collect() returns the stored result: the batch in flight on
        the other set is left alone and the tickets stay in submission order."""
        check_batch(self, batch)
        n = batch.shape[0]
        ticket = self._ring.acquire(n)
        try:
            with self._active():
                if self._fixed is not None and n != self._capacity:
                    run = lambda chunk: self._run_now(ticket.slot, chunk)  # noqa: E731
                    self._sync_results[ticket.seq] = self._fixed.run(np.asarray(batch, np.float32), run)
                else:
                    self._enqueue(ticket.slot, n, batch)
        except BaseException:
            self._ring.cancel(ticket)
            raise
        return ticket

    def _run_now(self, slot: int, chunk: np.ndarray) -> np.ndarray:
        """One full batch through buffer set ``slot``, waited for (a fixed-batch model's chunk)."""
        self._enqueue(slot, chunk.shape[0], chunk)
        return self._read(slot, chunk.shape[0])

    def _enqueue(self, s: int, n: int, batch: np.ndarray) -> None:
        cuda = self._cuda
        h_in = self._h_in[s][:n]
        h_in[...] = batch
        # copy stream: wait until the last compute on this slot has read its device input
        self._copy_stream.wait_for_event(self._done[s])
        cuda.memcpy_htod_async(self._d_in[s], h_in, self._copy_stream)
        self._copied[s].record(self._copy_stream)
        # compute stream: after the copy-in, infer n frames, copy the phase out
        self._compute_stream.wait_for_event(self._copied[s])
        if not self._exec.set_input_shape(self._input_name, (n, 1, *self.input_shape)):
            raise RuntimeError(f"TensorRT refused input shape {(n, 1, *self.input_shape)}")
        self._exec.set_tensor_address(self._input_name, int(self._d_in[s]))
        for name in self._outputs:
            self._exec.set_tensor_address(name, int(self._d_out[s][name]))
        if not self._exec.execute_async_v3(self._compute_stream.handle):
            raise RuntimeError("TensorRT execute_async_v3 failed (see TensorRT's messages in the log)")
        cuda.memcpy_dtoh_async(self._h_out[s][:n], self._d_out[s][self._phase_name], self._compute_stream)
        self._done[s].record(self._compute_stream)

    def _read(self, s: int, n: int) -> np.ndarray:
        """Wait for buffer set ``s``'s last batch; a copy of its ``n`` results."""
        self._done[s].synchronize()
        return np.array(self._h_out[s][:n], dtype=np.float32, copy=True)

    def collect(self, ticket: Ticket) -> np.ndarray:
        """Wait for ``ticket``'s result: float32 (n, 1, H, W)."""
        self._ring.release(ticket)
        if ticket.seq in self._sync_results:
            return self._sync_results.pop(ticket.seq)
        with self._active():
            return self._read(ticket.slot, ticket.n)

    def done(self, ticket: Ticket) -> bool:
        """Whether ``ticket``'s result is ready, without waiting (collect() then returns at once):
        its batch's event on the compute stream has been reached."""
        if ticket.seq in self._sync_results:
            return True
        with self._active():
            return bool(self._done[ticket.slot].query())

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.collect(self.submit(batch))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sync_results.clear()
        with self._active():
            try:
                if hasattr(self, "_compute_stream"):
                    self._compute_stream.synchronize()
                    self._copy_stream.synchronize()
            finally:  # also after a CUDA error in the synchronisation (then raised)
                # pycuda frees memory, streams and events in their destructors, which skip the
                # cleanup unless the context is current (or this is the thread that made them):
                # drop them all here, where it is current. The primary context stays retained.
                for name in ("_exec", "_engine", "_runtime", "_d_in", "_d_out", "_h_in", "_h_out",
                             "_copied", "_done", "_copy_stream", "_compute_stream"):
                    if hasattr(self, name):
                        delattr(self, name)
