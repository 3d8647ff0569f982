"""ONNX Runtime engine: the CPU default, and CUDA where onnxruntime-gpu is installed."""

from __future__ import annotations

import logging

import numpy as np

from edge_ptychonn.devices import parse_device

from .base import (
    AutoCandidate, EngineOptions, EngineSpec, EngineUnavailable, FixedBatchRunner, ModelNotSupported, check_batch,
    default_cpu_threads, engine_device, import_libraries,
)
from .onnx_model import read_signature

log = logging.getLogger(__name__)


class OnnxRuntimeEngine:
    """Runs the model with ONNX Runtime.

    Threads: ``cpu_threads`` intra-op threads (``create_engine`` sets them: ``cpu_layout``), one
    inter-op thread, no spin-waiting (it steals the core PvaPy's threads need),
    sequential execution, all graph optimisations. Models exported with a
    fixed batch (e.g. 8) accept any batch 1..max_batch by padding.
    Precision: fp32 only (the model's own).
    """

    SPEC = EngineSpec(
        name="onnxruntime",
        summary="ONNX Runtime: CPU (CUDA with onnxruntime-gpu), fp32",
        requires=("onnxruntime",),
        install="pip install onnxruntime (or onnxruntime-gpu)",
        devices=("cpu", "cuda"),
        precisions=("fp32",),
        # the CPU reference: rank 1.0 by definition (docs/benchmarks.md)
        auto=(AutoCandidate("cpu", "fp32", 1.0),),
    )
    name = "onnxruntime"

    @staticmethod
    def count_gpus() -> int:
        """GPUs ONNX Runtime can use: none without onnxruntime-gpu's CUDA provider."""
        import onnxruntime as ort

        from edge_ptychonn.devices import visible_gpu_count

        return visible_gpu_count() if "CUDAExecutionProvider" in ort.get_available_providers() else 0

    def __init__(self, options: EngineOptions):
        (ort,) = import_libraries(self.SPEC, "onnxruntime")
        self.SPEC.check_precision(options.precision)
        signature = read_signature(options.model_path)
        device = engine_device(self.SPEC, options, self.count_gpus())
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.cpu_threads or default_cpu_threads()
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        self.device = device
        if device != "cpu":
            index = int(device.partition(":")[2])
            providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        try:
            self._session = ort.InferenceSession(str(options.model_path), so, providers=providers)
            # a batch that fails raises, and the pipeline counts it and logs it once: ONNX Runtime's
            # own logger would also write an error line to stderr for every failed batch
            self._run_options = ort.RunOptions()
            self._run_options.log_severity_level = 4  # fatal only
        except Exception as exc:
            raise _unavailable(exc, f"onnxruntime cannot load {options.model_path}") from exc
        if device != "cpu" and self._session.get_providers()[0] != "CUDAExecutionProvider":
            # ONNX Runtime falls back to the CPU with a warning when its CUDA provider cannot start
            # (CUDA or cuDNN libraries missing): never run on the CPU while reporting the GPU
            why = (f"onnxruntime could not start its CUDA provider for {device} (it runs on "
                   f"{', '.join(self._session.get_providers())}; see its log)")
            if parse_device(options.device).kind != "auto":
                raise EngineUnavailable(f"{why}: use device 'cpu'")
            log.warning("%s; device 'auto': running on the CPU", why)
            self.device = "cpu"
        self._input = signature.input_name
        self._outputs = [signature.phase_output]
        self.precision = "fp32"
        self.input_shape = signature.input_shape
        self.max_batch = options.max_batch
        self._fixed = FixedBatchRunner(signature.fixed_batch, signature.input_shape) if signature.fixed_batch else None
        # Warm up: the first run pays for memory planning; keep it off the first frames' latency.
        try:
            out = self.infer(np.zeros((self.max_batch, 1, *self.input_shape), np.float32))
        except Exception as exc:
            raise _unavailable(exc, f"onnxruntime cannot run {options.model_path}") from exc
        if out.shape != (self.max_batch, 1, *self.input_shape):  # as the TensorRT engine refuses it
            raise ModelNotSupported(
                f"{options.model_path}: its output {signature.phase_output!r} is {tuple(out.shape)} for a batch of "
                f"{(self.max_batch, 1, *self.input_shape)}: a phase image per frame must have the frame's shape"
            )

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run(self._outputs, {self._input: batch}, self._run_options)[0]

    def infer(self, batch: np.ndarray) -> np.ndarray:
        check_batch(self, batch)
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self._fixed is not None:
            return self._fixed.run(batch, self._run)
        return self._run(batch)

    def close(self) -> None:
        self._session = None


def _unavailable(exc: Exception, what: str) -> Exception:
    """ONNX Runtime's own error (its exception classes derive from Exception only) as
    ``ModelNotSupported``, or ``EngineUnavailable`` for a device or provider failure, so that
    callers print one line and ``auto`` tries the next engine; any other error unchanged."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

    if type(exc).__module__ != ort_errors.__name__:
        return exc
    device_errors = tuple(getattr(ort_errors, n) for n in ("EPFail", "DeviceReset") if hasattr(ort_errors, n))
    cls = EngineUnavailable if isinstance(exc, device_errors) else ModelNotSupported
    return cls(f"{what}: {exc}")
