"""The one small interface every inference engine implements.

An engine loads an ONNX PtychoNN model and turns a float32 batch
``(n, 1, H, W)`` of preprocessed diffraction frames into float32 phase images
``(n, 1, H, W)`` in radians, for any ``1 <= n <= max_batch``. Engines are
created in the consumer's own process (``start()``), never at import time, and
import their heavy libraries (onnxruntime, torch, tensorrt) lazily.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class EngineOptions:
    """What every engine factory receives."""

    model_path: Path
    device: str = "auto"  # 'auto', 'cpu', 'cuda', 'cuda:N'
    precision: str = "fp32"  # 'fp32', 'fp16', 'bf16'
    max_batch: int = 8
    cpu_threads: int = 0  # 0: default_cpu_threads()
    processor_id: int = 1  # picks the GPU with device='auto': (id - 1) % n_gpus
    plan_cache_dir: Path | None = None


@runtime_checkable
class Engine(Protocol):
    name: str  # registry name, e.g. 'onnxruntime'
    device: str  # where it runs, e.g. 'cpu' or 'cuda:0 (NVIDIA RTX A6000)'
    precision: str
    input_shape: tuple[int, int]  # (H, W) of one frame
    max_batch: int

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """(n, 1, H, W) float32 -> (n, 1, H, W) float32, 1 <= n <= max_batch."""
        ...

    def close(self) -> None:
        """Release the engine's resources; infer() must not be called after."""
        ...


def default_cpu_threads() -> int:
    """All cores but one (left to PvaPy's receive and publish threads), at least 1.

    Measured on 2 cores: ONNX Runtime with both cores competed with PvaPy's
    threads and the pipeline kept up with 37 frames/s; with one, 97 frames/s.
    With N consumers on the CPU, give each about (cores - 1) / N (``cpuThreads``).
    """
    import os

    return max(1, (os.cpu_count() or 1) - 1)


class EngineUnavailable(RuntimeError):
    """The engine cannot run here (library or device missing); says what to install."""


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
