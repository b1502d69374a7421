"""Token ops exported as model-local ONNX functions: one ``tc_export`` node per site, one shape-generic body per op.

What TensorRT needs (onnx-tensorrt's ModelImporter and operator table): a function named like the node's op_type,
one body per name (overloads are ignored, so the body must be right at every site), the plugin attributes on the
node, and a body of natively parsed operators. ONNX Runtime runs the same body, so parity is checked here.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper

from tc_export import ExportConfig, compress, export_onnx
from tc_export.ops.base import TokenOp
from tc_export.ops.tome import ToMeMerge
from tc_export.passes import AdjacentConfig, PruMergeConfig, ToMeConfig, TopKConfig

from .conftest import tiny_timm_vit

# ONNX operators TensorRT 10's parser imports natively (onnx-tensorrt docs/operators.md, 10.x).
TRT_NATIVE = {
    "Abs", "Add", "And", "ArgMax", "ArgMin", "Cast", "Ceil", "Clip", "Concat", "Constant", "ConstantOfShape", "Cos",
    "Div", "Equal", "Erf", "Exp", "Expand", "Flatten", "Floor", "Gather", "GatherElements", "GatherND", "Gemm",
    "Greater", "GreaterOrEqual", "Identity", "Less", "LessOrEqual", "Log", "MatMul", "Max", "Min", "Mod", "Mul",
    "Neg", "Not", "Or", "Pow", "Range", "Reciprocal", "ReduceL2", "ReduceMax", "ReduceMean", "ReduceMin",
    "ReduceSum", "Relu", "Reshape", "Shape", "Sigmoid", "Size", "Slice", "Softmax", "Split",
    "Sqrt", "Squeeze", "Sub", "Sum", "Tanh", "Tile", "TopK", "Transpose", "Unsqueeze", "Where",
}
SETTINGS = {"ToMeMerge": "r", "TopKSelect": "keep", "PruMerge": "tokens", "AdjacentMerge": "r"}
# One model per case keeps the exports few: "mixed" has one site of each op (a four-stage recipe).
CASES = {
    "tome": [ToMeConfig(r=2)],
    "mixed": [
        ToMeConfig(r=2, layers=(0,)),
        TopKConfig(keep=0.7, layers=(1,), fuse=True),
        PruMergeConfig(tokens=6, layers=(2,)),
        AdjacentConfig(r=2, layers=(3,)),
    ],
    "tome_per_layer": [ToMeConfig(r=(3, 1, 2, 0))],
}
OP_TYPES = {
    "tome": ["ToMeMerge"] * 4,
    "mixed": ["ToMeMerge", "TopKSelect", "PruMerge", "AdjacentMerge"],
    "tome_per_layer": ["ToMeMerge"] * 3,  # r=0 inserts nothing
}
FLAT = ("mixed",)


def _run(path, images):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Each case exported once with functions (and flat for ``FLAT``), with the PyTorch output."""
    model = tiny_timm_vit(img_size=64, depth=4)
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    folder = tmp_path_factory.mktemp("functions")
    cache = {}

    def get(case):
        if case not in cache:
            compressed = compress(model, CASES[case], {"x": images})
            with torch.no_grad():
                want = compressed(x=images).numpy()
            path, flat_path = folder / f"{case}.onnx", folder / f"{case}_flat.onnx"
            proto = export_onnx(compressed.module, {"x": images}, path, ExportConfig())
            flat = None
            if case in FLAT:
                flat = export_onnx(compressed.module, {"x": images}, flat_path, ExportConfig(functions=False))
            cache[case] = (compressed, images, want, path, proto, flat_path, flat)
        return cache[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_one_function_node_per_site(exports, case):
    compressed, images, want, path, proto, flat_path, flat = exports(case)
    ops = [m for m in compressed.module.modules() if isinstance(m, TokenOp)]
    nodes = [n for n in proto.graph.node if n.domain == "tc_export"]
    assert [n.op_type for n in nodes] == OP_TYPES[case]
    assert len(nodes) == len(ops)
    for node, op in zip(nodes, ops):
        attrs, setting = _attrs(node), SETTINGS[node.op_type]
        assert attrs["plugin_namespace"] == b"tc_export" and attrs["plugin_version"] == b"1" and attrs["aot"] == 1
        assert attrs[setting] == getattr(op, setting) and attrs["protected"] == op.protected
    assert {(d.domain, d.version) for d in proto.opset_import} >= {("tc_export", 1)}


@pytest.mark.parametrize("case", list(CASES))
def test_bodies_are_tensorrt_native_and_unique_per_name(exports, case):
    proto = exports(case)[4]
    names = sorted((f.domain, f.name) for f in proto.functions)
    assert names == sorted({("tc_export", op_type) for op_type in OP_TYPES[case]})  # one body per op type
    for function in proto.functions:
        assert not function.overload
        # Natively parsed, and no scatter (the project's rule for the flat graph holds inside the bodies too).
        assert {n.op_type for n in function.node} <= TRT_NATIVE
        assert all(n.domain in ("", "ai.onnx") for n in function.node)
        # TensorRT binds a function's inputs by name: they must not shadow a tensor of the main graph.
        outer = {v for n in proto.graph.node for v in [*n.input, *n.output]} | {i.name for i in proto.graph.input}
        assert not outer & set(function.input)
    onnx.checker.check_model(proto, full_check=True)


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_flat_export_and_pytorch(exports, case):
    compressed, images, want, path, proto, flat_path, flat = exports(case)
    got = _run(path, images)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    if flat is not None:
        assert not [n for n in flat.graph.node if n.domain == "tc_export"] and not flat.functions
        np.testing.assert_allclose(got, _run(flat_path, images), atol=1e-5, rtol=0)


def test_per_layer_r_shares_one_body(exports):
    proto = exports("tome_per_layer")[4]
    rs = [_attrs(n)["r"] for n in proto.graph.node if n.domain == "tc_export"]
    assert rs == [3, 1, 2]  # r=0 inserts nothing
    assert len(proto.functions) == 1


def _single_call_model(function, attrs, shapes):
    names = ["x", "size", "metric"]
    inputs = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, s) for n, s in zip(names, shapes)]
    outputs = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [None] * 3) for n in ("y", "y_size")]
    node = helper.make_node(function.name, names, ["y", "y_size"], domain=function.domain, **attrs)
    graph = helper.make_graph([node], "call", inputs, outputs)
    opsets = [helper.make_opsetid("", function.opset_import[0].version), helper.make_opsetid("tc_export", 1)]
    model = helper.make_model(graph, opset_imports=opsets, functions=[function])
    model.ir_version = 10
    return model


@pytest.mark.parametrize(("tokens", "r"), [(17, 1), (50, 7), (12, 6), (9, 30)])
def test_tome_body_is_right_at_other_token_counts_and_r(exports, tokens, r):
    """The one ToMeMerge body, called at token counts and r (also capped) no site of the export had.

    The batch is the export's (static batch: the body's batch is static too; the dynamic-batch export traces it
    symbolic).
    """
    batch = 1
    proto = exports("tome_per_layer")[4]
    function = proto.functions[0]
    node = next(n for n in proto.graph.node if n.domain == "tc_export")
    attrs = {**_attrs(node), "r": r}
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(batch, tokens, 192, generator=gen)
    size = torch.randint(1, 4, (batch, tokens, 1), generator=gen).float()
    metric = torch.randn(batch, tokens, 64, generator=gen)
    model = _single_call_model(function, attrs, [list(x.shape), list(size.shape), list(metric.shape)])
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got_x, got_size = session.run(None, {"x": x.numpy(), "size": size.numpy(), "metric": metric.numpy()})
    want_x, want_size = ToMeMerge(r, attrs["protected"])(x, size, metric)
    np.testing.assert_allclose(got_x, want_x.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got_size, want_size.numpy())


def test_no_functions_flag_in_cli():
    from click.testing import CliRunner

    from tc_export.cli.main import cli

    result = CliRunner().invoke(cli, ["export", "--help"])
    assert "--no-functions" in result.output
