"""An fp32 ONNX model -> the same model computing in fp16 or bf16, with fp32 inputs and outputs.

TensorRT 11 builds strongly typed networks only (``BuilderFlag.FP16``/``BF16`` are
gone): a network computes in the types its ONNX graph declares. This module
makes those types: every float weight and constant (``Constant`` values, also
``value_float``/``value_floats``) becomes fp16 (or bf16), a ``Cast`` to that type
follows the graph input and a ``Cast`` back to float32 precedes each graph output,
so callers keep float32 buffers. Float inputs that ONNX requires to stay float32
(``Resize`` roi and scales, ``Upsample`` scales) are left alone, with what computes
them (constants, ``Cast``s to float). It is deterministic (same file -> same
bytes), so the plan cache keys on the original file's hash plus the precision and
:func:`recipe`.

bf16: ``Conv`` and ``MaxPool`` accept bfloat16 only from ONNX opset 22 (``Cast`` to
it from 13), so a bf16 conversion first moves the model to opset
:data:`BF16_OPSET` (``onnx.version_converter``; the IR version raised to match).
Every result passes ``onnx.checker.check_model(full_check=True)`` (strict type
and shape inference), so a graph that names a type an operator does not accept
fails here, not in TensorRT's parser.
"""

from __future__ import annotations

import numpy as np

RECIPE = "lowp-v1"  # bump when the conversion changes: cached plans are rebuilt
# precision -> its conversion's recipe where it differs from RECIPE (bf16 plans of lowp-v1
# were built from graphs that opsets before 22 do not allow)
RECIPES = {"bf16": "lowp-v2-opset22"}
BF16_OPSET = 22  # the first opset whose Conv and MaxPool accept bfloat16


def recipe(precision: str) -> str:
    """What the TensorRT plan cache keys on for this precision's conversion."""
    return RECIPES.get(precision, RECIPE)

# op type -> input positions whose float tensors must stay float32
_KEEP_FLOAT_INPUTS = {"Resize": (1, 2), "Upsample": (1,)}
# ops where a float32 input's computation starts (a type of its own, or no float input):
# what feeds them is not followed back
_KEEP_FLOAT_SOURCES = {"Constant", "ConstantOfShape", "Cast", "Shape", "Size"}


def _float32_names(graph) -> set[str]:
    """The tensors that must stay float32: ``Resize`` roi and scales, ``Upsample`` scales, and
    what computes them, back to the constants, initializers, ``Cast``s and shapes they start from
    (e.g. scales = Cast(Shape(x)) / Constant, as exporters write a dynamic upsampling)."""
    producer = {out: node for node in graph.node for out in node.output}
    todo = [name for node in graph.node for i, name in enumerate(node.input)
            if name and i in _KEEP_FLOAT_INPUTS.get(node.op_type, ())]
    keep: set[str] = set()
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep.add(name)
        node = producer.get(name)
        if node is not None and node.op_type not in _KEEP_FLOAT_SOURCES:
            todo.extend(n for n in node.input if n)
    return keep


def _low_constant(node, low_type: int) -> None:
    """A ``Constant`` node's float32 value (``value``, ``value_float`` or ``value_floats``) in
    ``low_type``, as a ``value`` tensor (the other two hold float32 only)."""
    from onnx import TensorProto, helper, numpy_helper

    for attr in node.attribute:
        if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
            attr.t.CopyFrom(_low_tensor(attr.t, low_type))
        elif attr.name in ("value_float", "value_floats"):
            values = np.array(attr.f if attr.name == "value_float" else list(attr.floats), np.float32)
            attr.CopyFrom(helper.make_attribute("value", _low_tensor(numpy_helper.from_array(values), low_type)))


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even; NaN kept NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(values)
    out[nan] = 0x7FC0
    return out


def bf16_values(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 values."""
    return (np.asarray(bits, dtype=np.uint32) << 16).view(np.float32)


def _low_tensor(tensor, low_type: int):
    """A copy of float32 TensorProto ``tensor`` in ``low_type`` (FLOAT16 or BFLOAT16)."""
    from onnx import TensorProto, numpy_helper

    values = numpy_helper.to_array(tensor).astype(np.float32)
    if low_type == TensorProto.FLOAT16:
        out = numpy_helper.from_array(values.astype(np.float16), tensor.name)
    else:
        out = TensorProto()
        out.name = tensor.name
        out.data_type = TensorProto.BFLOAT16
        out.dims.extend(values.shape)
        out.raw_data = bf16_bits(values).astype("<u2").tobytes()
    return out


def to_low_precision(model, precision: str):
    """A converted copy of ``model`` (onnx.ModelProto, fp32) computing in ``precision``
    ('fp16' or 'bf16'), float32 graph inputs and outputs kept."""
    import onnx
    from onnx import TensorProto, helper

    low = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}.get(precision)
    if low is None:
        raise ValueError(f"precision must be fp16 or bf16, got {precision!r}")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    if precision == "bf16":
        model = _at_least_opset(model, BF16_OPSET)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    keep_float = _float32_names(graph)
    converted = set()
    for tensor in list(graph.initializer):
        if tensor.data_type == TensorProto.FLOAT and tensor.name not in keep_float:
            tensor.CopyFrom(_low_tensor(tensor, low))
            converted.add(tensor.name)
    for inp in graph.input:  # initializers also listed as graph inputs (older exports): their declared type too
        if inp.name in converted:
            inp.type.tensor_type.elem_type = low
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] not in keep_float:
            _low_constant(node, low)
        if node.op_type == "Cast" and node.output[0] not in keep_float:
            for attr in node.attribute:  # casts to float inside the graph now cast to the low type
                if attr.name == "to" and attr.i == TensorProto.FLOAT:
                    attr.i = low
    # float32 graph inputs -> Cast to the low type; outputs -> Cast back to float32
    casts_in, renamed = [], {}
    for inp in graph.input:
        if inp.name in initializers or inp.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        renamed[inp.name] = f"{inp.name}__{precision}"
        casts_in.append(helper.make_node("Cast", [inp.name], [renamed[inp.name]], to=low, name=f"cast_in_{inp.name}"))
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    casts_out = []
    for out in graph.output:
        if out.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        low_name = f"{out.name}__{precision}"
        for node in graph.node:
            for i, name in enumerate(node.output):
                if name == out.name:
                    node.output[i] = low_name
            for i, name in enumerate(node.input):
                if name == out.name:
                    node.input[i] = low_name
        casts_out.append(helper.make_node("Cast", [low_name], [out.name], to=TensorProto.FLOAT, name=f"cast_out_{out.name}"))
    nodes = casts_in + list(graph.node) + casts_out
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # intermediate types changed; let consumers infer them again
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ValueError(f"the {precision} conversion of this model is not valid ONNX: {exc}") from exc
    return model


def _at_least_opset(model, opset: int):
    """``model`` converted to ONNX opset ``opset`` if its default-domain opset is older."""
    import onnx
    from onnx import helper, version_converter

    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if current is None or current >= opset:
        return model
    try:
        model = version_converter.convert_version(model, opset)
    except (version_converter.ConvertError, RuntimeError, ValueError) as exc:
        raise ValueError(f"cannot convert the model from ONNX opset {current} to {opset} "
                         f"(needed for bf16): {exc}") from exc
    model.ir_version = max(model.ir_version, helper.find_min_ir_version_for(list(model.opset_import)))
    del model.graph.value_info[:]
    onnx.checker.check_model(model)
    return model
