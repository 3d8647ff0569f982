"""ONNX Runtime engine: the CPU default, and CUDA where onnxruntime-gpu is installed."""

from __future__ import annotations

import numpy as np

from .base import EngineOptions, EngineUnavailable, FixedBatchRunner, check_batch, default_cpu_threads
from .onnx_model import read_signature


class OnnxRuntimeEngine:
    """Runs the model with ONNX Runtime.

    Threads: ``cpu_threads`` intra-op threads (default: all cores but one), one
    inter-op thread, no spin-waiting (it steals the core PvaPy's threads need),
    sequential execution, all graph optimisations. Models exported with a
    fixed batch (e.g. 8) accept any batch 1..max_batch by padding.
    Precision: fp32 only (the model's own).
    """

    name = "onnxruntime"

    def __init__(self, options: EngineOptions):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise EngineUnavailable("onnxruntime is not installed: pip install onnxruntime") from exc
        if options.precision != "fp32":
            raise EngineUnavailable(f"onnxruntime engine runs fp32 models only, not {options.precision}")
        signature = read_signature(options.model_path)
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.cpu_threads or default_cpu_threads()
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        self.device = "cpu"
        if options.device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise EngineUnavailable("onnxruntime has no CUDA provider here: install onnxruntime-gpu or use device 'cpu'")
            index = int(options.device.partition(":")[2] or 0)
            providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
            self.device = f"cuda:{index}"
        self._session = ort.InferenceSession(str(options.model_path), so, providers=providers)
        self._input = signature.input_name
        self._outputs = [signature.phase_output]
        self.precision = "fp32"
        self.input_shape = signature.input_shape
        self.max_batch = options.max_batch
        self._fixed = FixedBatchRunner(signature.fixed_batch, signature.input_shape) if signature.fixed_batch else None
        # Warm up: the first run pays for memory planning; keep it off the first frames' latency.
        self.infer(np.zeros((self.max_batch, 1, *self.input_shape), np.float32))

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run(self._outputs, {self._input: batch})[0]

    def infer(self, batch: np.ndarray) -> np.ndarray:
        check_batch(self, batch)
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self._fixed is not None:
            return self._fixed.run(batch, self._run)
        return self._run(batch)

    def close(self) -> None:
        self._session = None
