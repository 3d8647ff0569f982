"""fp32 ONNX -> fp16 / bf16 graphs with float32 I/O (what TensorRT 11 builds reduced precisions from)."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from engines import onnx_precision
from engines.onnx_precision import BF16_OPSET, bf16_bits, bf16_values, to_low_precision

ROOT = Path(__file__).resolve().parent.parent


def test_bf16_rounding_by_hand():
    values = np.array([1.0, 1.00390625, 1.01171875, 1.0078125, -2.0, np.inf], np.float32)
    # bf16 keeps 7 fraction bits. 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even -> 1;
    # 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties to even -> 1 + 2^-6
    expected = np.array([1.0, 1.0, 1.015625, 1.0078125, -2.0, np.inf], np.float32)
    np.testing.assert_array_equal(bf16_values(bf16_bits(values)), expected)
    assert np.isnan(bf16_values(bf16_bits(np.array([np.nan], np.float32))))[0]


@pytest.mark.parametrize("precision, elem", [("fp16", TensorProto.FLOAT16), ("bf16", TensorProto.BFLOAT16)])
def test_weights_converted_io_and_resize_scales_kept(small_model, precision, elem):
    model = onnx.load(str(small_model))
    low = to_low_precision(model, precision)
    assert [i.type.tensor_type.elem_type for i in low.graph.input] == [TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in low.graph.output] == [TensorProto.FLOAT] * len(model.graph.output)
    assert low.graph.node[0].op_type == "Cast" and low.graph.node[-1].op_type == "Cast"
    resize_scales = {n.input[2] for n in low.graph.node if n.op_type == "Resize" and len(n.input) > 2}
    assert resize_scales, "no Resize with scales in the graph: the checks below would check nothing"
    for t in low.graph.initializer:
        if t.name in resize_scales:
            assert t.data_type == TensorProto.FLOAT
        elif t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16):
            assert t.data_type == elem, t.name
    for n in low.graph.node:
        if n.op_type == "Constant" and n.output[0] in resize_scales:
            assert n.attribute[0].t.data_type == TensorProto.FLOAT
    assert to_low_precision(model, precision).SerializeToString() == low.SerializeToString()  # deterministic


def test_fp16_graph_computes_close_to_fp32(small_model):
    import onnxruntime as ort

    model = onnx.load(str(small_model))
    x = np.random.default_rng(0).poisson(9, (2, 1, 64, 64)).astype(np.float32) * 0.05
    name = model.graph.input[0].name
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {name: x})[0]
    low = to_low_precision(model, "fp16")
    out = ort.InferenceSession(low.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {name: x})[0]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=0.02)


def test_unknown_precision_is_refused(small_model):
    with pytest.raises(ValueError, match="fp16 or bf16"):
        to_low_precision(onnx.load(str(small_model)), "int8")


def _opset(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


@pytest.mark.parametrize("which", ["small", "shipped", "external"])
def test_bf16_graphs_are_valid_onnx_at_opset_22(request, small_model, which):
    """Conv and MaxPool accept bfloat16 only from opset 22: the bf16 graph is moved there
    first and passes the strict check (fp16 keeps the model's own opset)."""
    path = {"small": lambda: small_model, "shipped": lambda: ROOT / "data" / "ptychonn.onnx",
            "external": lambda: request.getfixturevalue("external_model")}[which]()
    model = onnx.load(str(path))
    low = to_low_precision(model, "bf16")
    assert _opset(low) == BF16_OPSET and low.ir_version >= 10
    onnx.checker.check_model(low, full_check=True)
    onnx.shape_inference.infer_shapes(low, check_type=True, strict_mode=True)
    assert [i.type.tensor_type.elem_type for i in low.graph.input] == [TensorProto.FLOAT]
    assert _opset(to_low_precision(model, "fp16")) == _opset(model)
    assert _opset(model) < BF16_OPSET  # the input was not changed in place


def test_bf16_at_the_old_opset_is_refused_here_and_by_the_parser_stand_in(small_model, monkeypatch):
    """Without the opset move, the bf16 graph is invalid: to_low_precision says so, and the
    TensorRT parser stand-in (strict type inference, as the reduced-precision build tests
    rely on) rejects such a graph."""
    from fakes import fake_pycuda, fake_tensorrt

    model = onnx.load(str(small_model))
    low = to_low_precision(model, "bf16")
    with monkeypatch.context() as m:
        m.setattr(onnx_precision, "_at_least_opset", lambda model, opset: model)
        with pytest.raises(ValueError, match=r"bf16 conversion of this model is not valid ONNX: .*bfloat16"):
            to_low_precision(model, "bf16")
    del low.opset_import[:]
    low.opset_import.extend(model.opset_import)  # what the conversion used to produce
    trt = fake_tensorrt.make_module(fake_pycuda.FakeCuda())
    logger = trt.Logger()
    parser = trt.OnnxParser(trt.Builder(logger).create_network(0), logger)
    assert not parser.parse(low.SerializeToString())
    assert "bfloat16" in str(parser.get_error(0))


def test_bf16_plans_are_keyed_on_the_new_recipe():
    """Plans built from the old (invalid) bf16 graphs are stale; fp32/fp16 plans keep their key."""
    assert onnx_precision.recipe("bf16") != "lowp-v1"
    assert onnx_precision.recipe("fp16") == onnx_precision.recipe("fp32") == onnx_precision.RECIPE == "lowp-v1"



@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_a_model_that_lists_its_weights_as_inputs_converts(small_model, precision):
    """Older exports (keep_initializers_as_inputs, IR version 3) also list every initializer
    among the graph inputs, typed float32: the conversion retypes those inputs with their
    weights (before: 'not valid ONNX: Inferred elem type differs', so no fp16/bf16 plan)."""
    import onnxruntime as ort
    from onnx import helper

    model = onnx.load(str(small_model))
    for t in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    onnx.checker.check_model(model, full_check=True)
    low = to_low_precision(model, precision)
    initializers = {t.name: t.data_type for t in low.graph.initializer}
    for inp in low.graph.input:
        expected = initializers.get(inp.name, TensorProto.FLOAT)  # the frames' input stays float32
        assert inp.type.tensor_type.elem_type == expected, inp.name
    assert TensorProto.FLOAT16 in initializers.values() or TensorProto.BFLOAT16 in initializers.values()
    if precision == "fp16":  # ONNX Runtime has CPU kernels for fp16, not for bf16
        x = np.random.default_rng(0).poisson(9, (2, 1, 64, 64)).astype(np.float32) * 0.05
        name = model.graph.input[0].name
        run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(  # noqa: E731
            None, {name: x})[0]
        np.testing.assert_allclose(run(low), run(model), atol=0.02)


def _run(model, x):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_constants_given_as_value_float_and_value_floats_are_converted():
    """Exporters also write a Constant as a float attribute, not a tensor (before: those stayed
    float32 beside fp16 activations, and the conversion refused the model as not valid ONNX)."""
    from onnx import helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])
    nodes = [helper.make_node("Constant", [], ["c"], value_float=2.0),
             helper.make_node("Constant", [], ["d"], value_floats=[0.5]),
             helper.make_node("Mul", ["x", "c"], ["t"]), helper.make_node("Add", ["t", "d"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    for precision, elem in (("fp16", TensorProto.FLOAT16), ("bf16", TensorProto.BFLOAT16)):
        low = to_low_precision(model, precision)
        constants = [n for n in low.graph.node if n.op_type == "Constant"]
        assert [(a.name, a.t.data_type) for n in constants for a in n.attribute] == [("value", elem)] * 2
    xs = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4) / 4
    np.testing.assert_allclose(_run(to_low_precision(model, "fp16"), xs), xs * 2 + 0.5, atol=1e-2)


def test_resize_scales_computed_through_casts_and_constants_stay_float32():
    """scales = Concat(Constant [1, 1], Cast(int64 [2, 2]) * Constant 1), as exporters write a
    dynamic upsampling (before: the Cast to float and the constants became fp16, a type Resize's
    scales do not take, and the conversion refused the model)."""
    from onnx import helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8, 8])
    factor = numpy_helper.from_array(np.array([2, 2], np.int64), "factor")
    w = numpy_helper.from_array(np.full((1, 1, 1, 1), 3.0, np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"]),
             helper.make_node("Cast", ["factor"], ["factor_f"], to=TensorProto.FLOAT),
             helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.float32(1.0))),
             helper.make_node("Mul", ["factor_f", "one"], ["hw"]),
             helper.make_node("Constant", [], ["nc"], value=numpy_helper.from_array(np.ones(2, np.float32))),
             helper.make_node("Concat", ["nc", "hw"], ["scales"], axis=0),
             helper.make_node("Resize", ["h", "", "scales"], ["y"], mode="nearest")]
    graph = helper.make_graph(nodes, "g", [x], [y], [factor, w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    for precision, elem in (("fp16", TensorProto.FLOAT16), ("bf16", TensorProto.BFLOAT16)):
        low = to_low_precision(model, precision)
        by_output = {n.output[0]: n for n in low.graph.node}
        assert by_output["factor_f"].attribute[0].i == TensorProto.FLOAT
        assert {i.name: i.data_type for i in low.graph.initializer}["w"] == elem  # the network is converted
    xs = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4) / 4
    out = _run(to_low_precision(model, "fp16"), xs)
    np.testing.assert_allclose(out, np.repeat(np.repeat(xs * 3, 2, axis=2), 2, axis=3), atol=1e-2)
