"""Engine names -> factories, and the 'auto' choice."""

from __future__ import annotations

import importlib
import importlib.util
import logging

from .base import Engine, EngineOptions, EngineUnavailable

log = logging.getLogger(__name__)

# name -> "module:Class", imported only when that engine is created
_FACTORIES = {
    "onnxruntime": "engines.onnxruntime_engine:OnnxRuntimeEngine",
    "torch": "engines.torch_engine:TorchEngine",
}
ENGINE_NAMES = ("auto", *_FACTORIES)


def _factory(name: str):
    module, _, cls = _FACTORIES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def _torch_cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def auto_choice(options: EngineOptions) -> str:
    """The engine 'auto' stands for here: torch on CUDA if a GPU is usable, else ONNX Runtime."""
    if importlib.util.find_spec("tensorrt") is not None:
        log.info("tensorrt is installed, but this release has no TensorRT engine yet; not using it")
    if options.device != "cpu" and _torch_cuda_available():
        return "torch"
    return "onnxruntime"


def available_engines() -> list[str]:
    """Engines whose libraries import on this machine (not checking devices)."""
    names = []
    for name, needs in (("onnxruntime", ("onnxruntime",)), ("torch", ("torch",))):
        if all(importlib.util.find_spec(m) is not None for m in needs):
            names.append(name)
    return names


def create_engine(name: str, options: EngineOptions) -> Engine:
    """Create the engine called ``name`` ('auto' chooses); raises ValueError for an
    unknown name and EngineUnavailable when it cannot run here."""
    if name not in ENGINE_NAMES:
        raise ValueError(f"unknown engine {name!r}; known: {', '.join(ENGINE_NAMES)}")
    if name == "auto":
        name = auto_choice(options)
        log.info("engine 'auto' chose %s", name)
    return _factory(name)(options)
