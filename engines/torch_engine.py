"""PyTorch engine: CPU or CUDA, fp32/bf16/fp16, channels-last, inference mode.

The ONNX model's weights are loaded into the project's own PtychoNN definition
(``edge_ptychonn.science.model.from_onnx``), which reads the layout (width, depth, input
size, heads) from the graph: the project's exports and PtychoNN models of the
same architecture from elsewhere (edgePtychoNN's) run alike; other graphs are
refused with the reason.
"""

from __future__ import annotations

import numpy as np

from .base import EngineOptions, EngineUnavailable, check_batch, default_cpu_threads
from .onnx_model import read_signature


def resolve_device(torch, device: str, processor_id: int) -> str:
    """'auto' -> 'cuda:<(processor_id - 1) % n_gpus>' if CUDA is there, else 'cpu'."""
    if device == "cpu":
        return "cpu"
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "auto":
        return f"cuda:{(max(processor_id, 1) - 1) % n_gpus}" if n_gpus else "cpu"
    if n_gpus == 0:
        raise EngineUnavailable(f"device {device!r} asked for, but torch sees no CUDA GPU")
    index = int(device.partition(":")[2] or 0)
    if index >= n_gpus:
        raise EngineUnavailable(f"device {device!r} asked for, but torch sees {n_gpus} GPU(s)")
    return f"cuda:{index}"


class TorchEngine:
    """Runs the model with PyTorch (the ONNX weights in the project's PtychoNN module)."""

    name = "torch"

    def __init__(self, options: EngineOptions):
        try:
            import torch

            from edge_ptychonn.science.model import from_onnx
        except ImportError as exc:
            raise EngineUnavailable("the torch engine needs torch: pip install 'edge-ptychonn[torch]'") from exc
        self._torch = torch
        signature = read_signature(options.model_path)
        device = resolve_device(torch, options.device, options.processor_id)
        if device == "cpu":
            torch.set_num_threads(options.cpu_threads or default_cpu_threads())
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[options.precision]
        module = from_onnx(options.model_path).eval().to(device=device, dtype=dtype, memory_format=torch.channels_last)
        self._module = module
        self._device = torch.device(device)
        self._dtype = dtype
        self.precision = options.precision
        self.input_shape = signature.input_shape
        self.max_batch = options.max_batch
        self._output_index = signature.output_names.index(signature.phase_output)
        if self._device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            self.device = f"{device} ({torch.cuda.get_device_name(self._device)})"
        else:
            self.device = "cpu"
        # Warm up: the first call pays for lazy initialisation (and cuDNN autotuning).
        self.infer(np.zeros((self.max_batch, 1, *self.input_shape), np.float32))

    def _run(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self._device, non_blocking=True)
            x = x.to(self._dtype).contiguous(memory_format=torch.channels_last)
            y = self._module(x)
            if isinstance(y, (tuple, list)):
                y = y[self._output_index]
            return y.float().contiguous().cpu().numpy()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        check_batch(self, batch)
        # The rebuilt module takes any batch size, also where the ONNX batch was fixed.
        return self._run(np.ascontiguousarray(batch, dtype=np.float32))

    def close(self) -> None:
        self._module = None
        if self._device.type == "cuda":
            self._torch.cuda.empty_cache()
