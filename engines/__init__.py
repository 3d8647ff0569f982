"""Inference engines behind one interface (engines.base.Engine), chosen by name.

    from engines import create_engine
    engine = create_engine("auto", EngineOptions(model_path=...))

``auto`` picks TensorRT when it is importable and a GPU is present (the TensorRT
engine arrives in a later release; until then auto skips it), else torch on
CUDA, else ONNX Runtime on the CPU. Unknown names are answered with the list of
known ones.
"""

from .base import Engine, EngineOptions, EngineUnavailable
from .registry import ENGINE_NAMES, available_engines, create_engine

__all__ = ["Engine", "EngineOptions", "EngineUnavailable", "ENGINE_NAMES", "available_engines", "create_engine"]
