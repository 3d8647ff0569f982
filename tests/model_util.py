"""Small exported PtychoNN models with cards, for the model-swap tests."""

from __future__ import annotations

from pathlib import Path


def export_small_model(path: Path, seed: int, input_size: int = 64, name: str | None = None, **preprocess) -> Path:
    """A deterministic random PtychoNN (width 8, depth 3) as ONNX at ``path``; with ``name``
    or ``preprocess`` fields, a card beside it."""
    from edge_ptychonn.model_card import ModelCard, save_card
    from edge_ptychonn.science.model import ModelConfig, build_model, export_onnx
    from edge_ptychonn.stream.preprocess import PreprocessConfig

    export_onnx(build_model(ModelConfig(width=8, depth=3, input_size=input_size), seed=seed), path)
    if name is not None or preprocess:
        save_card(ModelCard(name=name or "", input_size=input_size, preprocess=PreprocessConfig(**preprocess)), path)
    return path
