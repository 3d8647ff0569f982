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


def training_like_scan(prefix: Path, model: Path, seed: int, n_positions: int) -> Path:
    """A short simulated scan under the conditions ``model`` was trained at (its card's
    scan settings, another seed), saved as ``prefix``.npy / .npz; returns ``prefix``."""
    import json

    from edge_ptychonn.science.simulate import ScanSettings, save_scan, simulate_scan

    training = json.loads(model.with_suffix(".json").read_text())["training"]["scan_settings"]
    settings = ScanSettings.from_dict({**ScanSettings().to_dict(), **training, "seed": seed, "n_positions": n_positions})
    frames, truth = simulate_scan(settings, progress=False)
    save_scan(prefix, frames, truth)
    return prefix
