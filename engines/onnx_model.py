"""What engines need to know of an ONNX model file, read without running it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class OnnxSignature:
    input_name: str
    output_names: tuple[str, ...]
    input_shape: tuple[int, int]  # (H, W)
    fixed_batch: int | None  # the batch size baked into the model, or None if dynamic
    sigmoid_outputs: tuple[str, ...] = ()  # outputs a Sigmoid makes (PtychoNN's amplitude head)

    @property
    def phase_output(self) -> str:
        """The phase output: named 'phase' if there is one; else, of two outputs of which one is
        made by a Sigmoid (an amplitude head, as the original PtychoNN's, which returns (amplitude,
        phase)), the other one; else the first."""
        if "phase" in self.output_names:
            return "phase"
        others = [n for n in self.output_names if n not in self.sigmoid_outputs]
        if len(self.output_names) == 2 and len(others) == 1:
            return others[0]
        return self.output_names[0]


def read_signature(model_path: Path) -> OnnxSignature:
    """Input/output names and shapes of a single-input PtychoNN ONNX model.

    ``ValueError`` (one line) when the file is not one: a ``.json`` (the model card beside a model,
    given in its place) is named as such, with the ``.onnx`` of that name when there is one."""
    import onnx

    path = Path(model_path)
    # onnx.load would parse a .json as a JSON-form model (which no engine runs): a two-line error
    if path.suffix.lower() == ".json" and path.is_file():
        onnx_path = path.with_suffix(".onnx")
        raise ValueError(f"{model_path} is not a readable ONNX model: a .json is a model card, not a model"
                         + (f"; give {onnx_path}" if onnx_path.is_file() else ""))
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ...: all mean "not a model"
        raise ValueError(f"{model_path} is not a readable ONNX model: {exc}") from exc
    if not model.graph.node and not model.graph.input:  # an empty file parses as an empty model
        raise ValueError(f"{model_path} is not a readable ONNX model: it holds no graph"
                         + (" (the file is empty)" if path.is_file() and path.stat().st_size == 0 else ""))
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ValueError(f"{model_path}: expected one input, found {[i.name for i in inputs]}")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4:
        raise ValueError(f"{model_path}: input must be (N, 1, H, W), has {len(dims)} dimensions")
    values = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if values[1] not in (1, None) or values[2] is None or values[3] is None:
        raise ValueError(f"{model_path}: input must be (N, 1, H, W) with fixed H, W, got {values}")
    outputs = tuple(o.name for o in model.graph.output)
    return OnnxSignature(
        input_name=inputs[0].name,
        output_names=outputs,
        input_shape=(values[2], values[3]),
        fixed_batch=values[0] or None,
        sigmoid_outputs=tuple(out for n in model.graph.node if n.op_type == "Sigmoid" for out in n.output
                              if out in outputs),
    )
