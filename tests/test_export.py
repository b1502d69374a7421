"""ONNX export of compressed models: runs in ONNX Runtime, static token shapes, clean graph, checker."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tc_export import ExportConfig, ToMeConfig, compress, export_onnx
from tc_export.errors import ConfigError

from .conftest import tiny_timm_vit
from .reference import reference_tome_timm_vit


def _run(path, feed):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def test_export_runs_and_matches_reference(tmp_path):
    model = tiny_timm_vit()
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    compressed = compress(model, ToMeConfig(r=6), {"x": images})
    path = tmp_path / "m.onnx"
    proto = export_onnx(compressed.module, {"x": images}, path, ExportConfig(batch=2), input_names=["pixel_values"])
    want, _ = reference_tome_timm_vit(model, images, [6] * 4)
    np.testing.assert_allclose(_run(path, {"pixel_values": images.numpy()}), want.numpy(), rtol=1e-4, atol=5e-5)

    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version >= 17
    ops = {node.op_type for node in proto.graph.node}
    assert "ScatterElements" not in ops and "ScatterND" not in ops  # no scatter plugin needed
    assert "NonZero" not in ops
    # static shapes: every value in the graph has a fully known shape
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    for value in inferred.graph.value_info:
        dims = value.type.tensor_type.shape.dim
        assert all(d.HasField("dim_value") for d in dims), value.name
    # no dead nodes: every node output is consumed or is a graph output
    consumed = {i for node in proto.graph.node for i in node.input} | {o.name for o in proto.graph.output}
    assert all(any(o in consumed for o in node.output) for node in proto.graph.node)


def test_dynamic_batch(tmp_path):
    model = tiny_timm_vit(depth=2)
    images = torch.randn(3, 3, 96, 96)
    compressed = compress(model, ToMeConfig(r=5), {"x": images[:2]})
    path = tmp_path / "d.onnx"
    proto = export_onnx(compressed.module, {"x": images[:2]}, path, ExportConfig(dynamic_batch=True))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value == 3
    with torch.no_grad():
        want = compressed(images)
    for batch in (1, 3):
        np.testing.assert_allclose(_run(path, {proto.graph.input[0].name: images[:batch].numpy()}), want[:batch].numpy(),
                                   rtol=1e-4, atol=5e-5)


def test_no_partial_file_on_failure(tmp_path):
    class Broken(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.eig(x)[0].real  # not exportable

    path = tmp_path / "broken.onnx"
    with pytest.raises(Exception):
        export_onnx(Broken(), {"x": torch.randn(2, 2)}, path, ExportConfig())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs", [{"opset": 16}, {"batch": 0}])
def test_export_config_validation(kwargs):
    with pytest.raises(ConfigError):
        ExportConfig(**kwargs)
