"""Inference engines behind one interface (engines.base.Engine), chosen by name.

    from engines import create_engine
    engine = create_engine("auto", EngineOptions(model_path=..., precision="auto"))

Engines: ``tensorrt`` (NVIDIA GPU; plan cache), ``torch`` (CPU or CUDA),
``onnxruntime`` (CPU; CUDA with onnxruntime-gpu), ``zero`` (no network: returns its
input, for commissioning and measuring the frame path). Each declares what it
needs and offers in its ``SPEC`` (``engines.base.EngineSpec``); ``auto`` reads
those: TensorRT when it is installed and sees a GPU, else torch on CUDA, else the
fastest CPU engine and precision native to this CPU within the stated tolerance
of fp32, and logs why. Unknown names are answered with the list of known ones.
Adding an engine: one file with a class and its ``SPEC``, one line in
``engines.registry.ENGINES``.
"""

from .base import Engine, EngineOptions, EngineSpec, EngineUnavailable
from .registry import ENGINE_NAMES, available_engines, create_engine

__all__ = ["Engine", "EngineOptions", "EngineSpec", "EngineUnavailable", "ENGINE_NAMES", "available_engines",
           "create_engine"]
