"""Projectors against independent references (tests/reference_projectors.py), their rules, and ONNX export."""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tc_export.errors import ConfigError
from tc_export.ops.projectors import (
    PROJECTORS,
    CAbstractor,
    LlamaVidProjector,
    MLPProjector,
    PatchMergerProjector,
    PoolProjector,
    ResamplerProjector,
    UnshuffleProjector,
    adaptive_pool_matrix,
    sincos_2d,
)

from . import reference_projectors as ref

C = 32
ATOL = 1e-5


def tokens(grid, prefix, batch=2, channels=C, seed=0):
    torch.manual_seed(seed)
    return torch.randn(batch, prefix + math.prod(grid), channels)


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def randomize(module, seed=1):
    """Non-trivial LayerNorm affines and biases, so a reference that ignored them would fail."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or ("ln" in name or "mlp1.0" in name or ".bn." in name):
                p.add_(0.1 * torch.randn_like(p))
    return module


# ------------------------------------------------------------------------------------------ token counts


def test_token_counts_on_a_14x14_grid():
    """The issue's counts on vit_s's grid (class token + 14 x 14)."""
    x = tokens((14, 14), 1)
    queries = torch.randn(2, 32, 768)
    cases = {
        "pool": (PoolProjector(C, (14, 14), 1, stride=2), 49),
        "unshuffle": (UnshuffleProjector(C, (14, 14), 1, scale=0.5), 49),
        "patchmerger": (PatchMergerProjector(C, (14, 14), 1), 49),
        "cabstractor": (CAbstractor(C, (14, 14), 1, tokens=64), 64),
        "resampler": (ResamplerProjector(C, (14, 14), 1, queries=32), 32),
        "llamavid": (LlamaVidProjector(C, (14, 14), 1), 2),
        "mlp": (MLPProjector(C, (14, 14), 1), 196),
        "mlp-keep": (MLPProjector(C, (14, 14), 1, prefix_mode="keep"), 197),
    }
    for name, (module, count) in cases.items():
        with torch.no_grad():
            out = module(x, queries) if name == "llamavid" else module(x)
        assert out.shape == (2, count, C), name
        assert module.tokens_out() == count and module.channels_out() == C, name


def test_registry_and_width_change():
    assert set(PROJECTORS) == {"pool", "unshuffle", "patchmerger", "cabstractor", "llamavid", "resampler", "mlp",
                               "idefics3", "llama4", "gemma3"}
    from tc_export.passes import METHODS

    for name, cls in PROJECTORS.items():  # typed keyword-only settings, exactly the method config's own fields
        params = inspect.signature(cls.__init__).parameters.values()
        settings = {p.name for p in params if p.kind is p.KEYWORD_ONLY}
        config = METHODS.get(name).config_type
        fields = {f.name for f in dataclasses.fields(config)}
        always_dropped = set() if config.can_keep_prefix else {"prefix_mode"}  # drops the prefix: no setting
        assert settings == fields - {"at", "projector_weights"} - always_dropped, name
        assert settings <= set(typing.get_type_hints(cls.__init__)), name
    x = tokens((8, 8), 1)
    for name, cls in PROJECTORS.items():
        if name == "pool":
            continue
        module = cls(C, (8, 8), 1, out_channels=48, **({"tokens": 16} if name == "cabstractor" else {}))
        args = (x, torch.randn(2, 32, 768)) if name == "llamavid" else (x,)
        with torch.no_grad():
            out = module(*args)
        assert out.shape == (2, module.tokens_out(), 48) and module.channels_out() == 48, name


# ----------------------------------------------------------------------------------------------- pooling


@pytest.mark.parametrize("grid", [(14, 14), (16, 16), (27, 27), (27, 20), (5, 7)])
@pytest.mark.parametrize("mode", ["avg", "max", "bilinear"])
def test_pool_matches_reference(grid, mode):
    prefix = 1
    x = tokens(grid, prefix)
    kept = ref.reference_pool(x, grid, prefix, 2, mode, keep_prefix=True)
    for prefix_mode in ("drop", "keep"):
        module = PoolProjector(C, grid, prefix, stride=2, mode=mode, prefix_mode=prefix_mode)
        out = module(x)
        torch.testing.assert_close(out, kept if prefix_mode == "keep" else kept[:, prefix:], atol=ATOL, rtol=0)
        assert out.shape[1] == module.tokens_out()
        rule = (lambda s: math.ceil(s / 2)) if mode == "bilinear" else (lambda s: s // 2)
        assert module.output_grid() == tuple(rule(s) for s in grid)


def test_pool_sizes_and_torch_functions():
    """27x27: avg_pool2d floor -> 13x13, bilinear ceil -> 14x14 (OneVision); both equal torch's own functions."""
    x = tokens((27, 27), 0)
    nchw = x.transpose(1, 2).reshape(2, C, 27, 27)
    avg = PoolProjector(C, (27, 27), 0, mode="avg")
    bil = PoolProjector(C, (27, 27), 0, mode="bilinear")
    assert avg.output_grid() == (13, 13) and bil.output_grid() == (14, 14)
    torch.testing.assert_close(avg(x), F.avg_pool2d(nchw, 2).flatten(2).transpose(1, 2))
    expected = F.interpolate(nchw, size=(14, 14), mode="bilinear", align_corners=False)
    torch.testing.assert_close(bil(x), expected.flatten(2).transpose(1, 2))
    # the hand-written half-pixel reference agrees with torch too
    torch.testing.assert_close(ref.bilinear_resize(x[0].reshape(27, 27, C), (14, 14)).reshape(-1, C),
                               expected[0].flatten(1).T, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["avg", "max", "bilinear"])
def test_pool_1d_frames(mode):
    """Whisper-style (T,) grid: pooling over frames (floor for avg/max, ceil for linear)."""
    x = tokens((15,), 0)
    module = PoolProjector(C, (15,), 0, stride=2, mode=mode)
    torch.testing.assert_close(module(x), ref.reference_pool(x, (15,), 0, 2, mode, False), atol=ATOL, rtol=0)
    assert module.output_grid() == ((8,) if mode == "bilinear" else (7,))


def test_pool_errors():
    with pytest.raises(ConfigError, match="stride"):
        PoolProjector(C, (3, 3), 0, stride=4)
    with pytest.raises(ConfigError, match="mode"):
        PoolProjector(C, (4, 4), 0, mode="average")
    with pytest.raises(ConfigError, match="prefix_mode"):
        PoolProjector(C, (4, 4), 0, prefix_mode="yes")


# --------------------------------------------------------------------------------------------- unshuffle


@pytest.mark.parametrize("grid,prefix,scale", [((14, 14), 1, 0.5), ((16, 12), 0, 0.5), ((12, 6), 2, 1 / 3)])
def test_unshuffle_channel_order(grid, prefix, scale):
    k = round(1 / scale)
    x = tokens(grid, prefix)
    module = UnshuffleProjector(C, grid, prefix, scale=scale)
    wide = module.unshuffle(x)
    torch.testing.assert_close(wide, ref.unshuffle_formula(x, grid, prefix, k), atol=0, rtol=0)
    if k == 2:  # InternVL's published view/permute sequence gives the same order
        h, w = grid
        internvl = ref.internvl_pixel_shuffle(x[:, prefix:].reshape(2, h, w, C)).reshape(2, -1, 4 * C)
        torch.testing.assert_close(wide, internvl, atol=0, rtol=0)
        # and torch.pixel_unshuffle's order is different (the caution in methods.md)
        crd = F.pixel_unshuffle(x[:, prefix:].transpose(1, 2).reshape(2, C, h, w), 2).flatten(2).transpose(1, 2)
        assert not torch.equal(crd, wide)
    assert module.output_grid() == (grid[0] // k, grid[1] // k)


def test_unshuffle_projector_matches_reference():
    x = tokens((14, 14), 1)
    module = randomize(UnshuffleProjector(C, (14, 14), 1, out_channels=40))
    expected = ref.reference_unshuffle_projector(x, state(module), (14, 14), 1, 2)
    torch.testing.assert_close(module(x), expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("grid", [(14, 14), (8, 12)])
def test_unshuffle_v1_is_internvl_12s_sequence(grid):
    h, w = grid
    x = tokens(grid, 1)
    module = UnshuffleProjector(C, grid, 1, ps_version="v1")
    published = ref.internvl_pixel_shuffle_v1(x[:, 1:].reshape(2, h, w, C)).reshape(2, -1, 4 * C)
    torch.testing.assert_close(module.unshuffle(x), published, atol=0, rtol=0)
    assert module.output_grid() == (w // 2, h // 2)
    v2 = UnshuffleProjector(C, grid, 1).unshuffle(x)
    assert not torch.equal(v2, published) and torch.equal(v2.sort(1).values, published.sort(1).values)


def test_patch_merger_matches_qwen2_vl_reference():
    x = tokens((14, 14), 1)
    module = randomize(PatchMergerProjector(C, (14, 14), 1, out_channels=40))
    assert set(state(module)) == {"ln_q.weight", "ln_q.bias", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight",
                                  "mlp.2.bias"}
    expected = ref.reference_patch_merger(x, state(module), (14, 14), 1)
    torch.testing.assert_close(module(x), expected, atol=ATOL, rtol=1e-5)
    assert module.tokens_out() == 49 and module.channels_out() == 40


def test_unshuffle_errors():
    with pytest.raises(ConfigError, match="divisible by 2"):
        UnshuffleProjector(C, (27, 27), 1)
    with pytest.raises(ConfigError, match="2-D"):
        UnshuffleProjector(C, (16,), 0)
    with pytest.raises(ConfigError, match="scale"):
        UnshuffleProjector(C, (16, 16), 0, scale=0.4)
    with pytest.raises(ConfigError, match="ps_version must be one of v2, v1"):
        UnshuffleProjector(C, (16, 16), 0, ps_version="v3")


# ------------------------------------------------------------------------------------------ C-Abstractor


@pytest.mark.parametrize("size_in,size_out", [(16, 12), (14, 8), (24, 12), (7, 3), (5, 7), (9, 9)])
def test_bin_matrix_equals_adaptive_avg_pool(size_in, size_out):
    torch.manual_seed(0)
    x = torch.randn(2, 3, size_in, size_in + 1)
    rows, cols = adaptive_pool_matrix(size_in, size_out), adaptive_pool_matrix(size_in + 1, size_out)
    expected = F.adaptive_avg_pool2d(x, (size_out, size_out))
    torch.testing.assert_close(rows @ x @ cols.T, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("grid,tokens_out,hidden", [((14, 14), 64, None), ((16, 16), 144, 48), ((12, 16), 36, None)])
def test_cabstractor_matches_honeybee_built_from_timm(grid, tokens_out, hidden):
    """Same weights through Honeybee's construction (timm RegStage, nn.AdaptiveAvgPool2d, build_mlp)."""
    x = tokens(grid, 1)
    module = randomize(CAbstractor(C, grid, 1, tokens=tokens_out, hidden=hidden, depth=3, out_channels=40))
    width = hidden or C
    reference = ref.HoneybeeCAbstractor(C, width, 40, math.isqrt(tokens_out), 1 + math.prod(grid))
    sd = state(module)
    sd["pos_emb"] = torch.cat([torch.randn(1, 1, C), sd["pos_emb"]], dim=1)  # Honeybee's class-token row
    reference.load_state_dict(sd, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(module(x), reference(x, grid), atol=1e-4, rtol=1e-4)
    assert module.output_grid() == (math.isqrt(tokens_out),) * 2


def test_cabstractor_rules_and_init():
    with pytest.raises(ConfigError, match="perfect square"):
        CAbstractor(C, (14, 14), 1, tokens=60)
    with pytest.raises(ConfigError, match="2-D"):
        CAbstractor(C, (16,), 0, tokens=4)
    torch.manual_seed(0)
    module = CAbstractor(C, (14, 14), 1, tokens=64)
    pos = module.pos_emb.detach()
    assert 0.018 < pos.std() < 0.022 and pos.abs().max() <= 2.0
    w = module.readout[0].weight.detach()
    assert 0.015 < w.std() < 0.025 and module.readout[0].bias.abs().max() == 0
    assert all(k.startswith(("pos_emb", "net.0.b", "net.2.b", "readout.")) for k in module.state_dict())


# --------------------------------------------------------------------------------------------- LLaMA-VID


@pytest.mark.parametrize("grid,grid_size", [((14, 14), 1), ((14, 14), 2), ((14, 14), 4), ((12, 8), 2), ((20,), 1)])
def test_llamavid_matches_reference(grid, grid_size):
    prefix = 0 if len(grid) == 1 else 1
    x = tokens(grid, prefix)
    torch.manual_seed(3)
    queries = torch.randn(2, 5, 24)
    module = randomize(LlamaVidProjector(C, grid, prefix, grid_size=grid_size, queries=5, query_channels=24,
                                         out_channels=40))
    out = module(x, queries)
    expected = ref.reference_llamavid(x, queries, state(module), grid, prefix, grid_size)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-5)
    assert out.shape == (2, 1 + grid_size**2, 40) == (2, module.tokens_out(), module.channels_out())


def test_llamavid_rules():
    with pytest.raises(ConfigError, match="grid sizes that work here: 1, 2, 3, 4, 7"):
        LlamaVidProjector(C, (14, 14), 1, grid_size=5)
    with pytest.raises(ValueError, match="queries"):
        LlamaVidProjector(C, (4, 4), 0, queries=3, query_channels=8)(tokens((4, 4), 0), torch.randn(2, 4, 8))


# --------------------------------------------------------------------------------------------- resampler


def test_sincos_table_matches_mae():
    for dim, side in ((32, 6), (64, 16)):
        torch.testing.assert_close(sincos_2d(dim, side), torch.from_numpy(ref.mae_sincos_2d(dim, side)).float(),
                                   atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "grid,queries,depth,out,heads",
    [((14, 14), 32, 1, 64, 2), ((14, 14), 16, 1, C, 4), ((12, 16), 25, 2, 64, 2), ((6, 6), 36, 1, 64, 1)],
)
def test_resampler_matches_reference(grid, queries, depth, out, heads):
    prefix = 1
    x = tokens(grid, prefix)
    module = randomize(ResamplerProjector(C, grid, prefix, queries=queries, heads=heads, depth=depth,
                                          out_channels=out)).eval()
    with torch.no_grad():
        got = module(x)
    expected = ref.reference_resampler(x, state(module), grid, prefix, heads, depth)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    pos_q, pos_k = ref.key_positions(out, queries, grid)
    torch.testing.assert_close(module.attn_pool.key_pos, pos_k, atol=1e-6, rtol=0)
    torch.testing.assert_close(module.attn_pool.pos_embed, pos_q, atol=1e-6, rtol=0)
    assert got.shape == (2, queries, out) and module.tokens_out() == queries
    side = math.isqrt(queries)
    assert module.output_grid() == ((side, side) if side * side == queries else None)


def test_resampler_names_init_and_rules():
    torch.manual_seed(0)
    module = ResamplerProjector(C, (14, 14), 1, queries=32, out_channels=64)
    assert module.heads == 1  # Qwen-VL's D // 128, at least 1
    names = set(module.state_dict())
    assert {"attn_pool.query", "attn_pool.pos_embed", "attn_pool.kv_proj.weight", "attn_pool.attn.in_proj_weight",
            "attn_pool.ln_q.weight", "attn_pool.ln_kv.weight", "ln_post.weight", "proj"} <= names
    assert "attn_pool.key_pos" not in names  # derived from the grid, not a checkpoint tensor
    assert "attn_pool.kv_proj.weight" not in ResamplerProjector(C, (4, 4), 0, queries=4).state_dict()
    q = module.attn_pool.query.detach()
    assert 0.015 < q.std() < 0.025
    assert 0.8 < module.proj.detach().std() * math.sqrt(64) < 1.2
    assert module.attn_pool.attn.out_proj.bias.abs().max() == 0
    with pytest.raises(ConfigError, match="divisible by 4"):
        ResamplerProjector(C, (4, 4), 0, out_channels=30)
    with pytest.raises(ConfigError, match="heads"):
        ResamplerProjector(C, (4, 4), 0, heads=3)
    with pytest.raises(ConfigError, match="2-D"):
        ResamplerProjector(C, (16,), 0)


# --------------------------------------------------------------------------------------------------- mlp


def test_mlp_matches_reference_and_drops_or_keeps_prefix():
    """LLaVA's ``patch`` (default: class/register tokens dropped) and ``cls_patch`` (kept, projected in front)."""
    x = tokens((7, 7), 2)
    module = randomize(MLPProjector(C, (7, 7), 2, out_channels=48))
    torch.testing.assert_close(module(x), ref.mlp2x_gelu(x[:, 2:], state(module), "net.0", "net.2"), atol=ATOL,
                               rtol=1e-5)
    assert module.prefix_out() == 0 and module.output_grid() == (7, 7) and module.tokens_out() == 49
    keep = MLPProjector(C, (7, 7), 2, out_channels=48, prefix_mode="keep")
    keep.load_state_dict(module.state_dict())
    torch.testing.assert_close(keep(x), ref.mlp2x_gelu(x, state(module), "net.0", "net.2"), atol=ATOL, rtol=1e-5)
    assert keep.prefix_out() == 2 and keep.tokens_out() == 51


def test_common_constructor_errors():
    with pytest.raises(ConfigError, match="grid"):
        PoolProjector(C, (14, 14, 2), 0)
    with pytest.raises(ConfigError, match="prefix"):
        MLPProjector(C, (4, 4), -1)
    with pytest.raises(ConfigError, match="out_channels"):
        MLPProjector(C, (4, 4), 0, out_channels=0)
    with pytest.raises(ValueError, match="expected"):
        MLPProjector(C, (4, 4), 1)(tokens((4, 4), 0))


# -------------------------------------------------------------------------------------------------- ONNX

# Ops TensorRT's ONNX parser imports (onnx-tensorrt operator table, TRT 10); anything else fails the test.
TRT_OPS = {
    "Add", "AveragePool", "Cast", "Concat", "Constant", "Conv", "Div", "Erf", "Expand", "Flatten", "Gather", "Gemm",
    "Identity", "LayerNormalization", "MatMul", "MaxPool", "Mul", "Pow", "ReduceMax", "ReduceMean", "ReduceSum",
    "Reshape", "Resize", "Shape", "Sigmoid", "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Tanh",
    "Transpose", "Unsqueeze", "Where",
}

EXPORT_CASES = {  # name: (class, grid, prefix, settings, dynamic batch)
    "pool_avg_keep": (PoolProjector, (14, 14), 1, {"mode": "avg", "prefix_mode": "keep"}, False),
    "pool_bilinear_27": (PoolProjector, (27, 27), 0, {"mode": "bilinear"}, False),
    "pool_1d_frames": (PoolProjector, (15,), 0, {"mode": "avg"}, False),
    "unshuffle": (UnshuffleProjector, (14, 14), 1, {"out_channels": 48}, False),
    "unshuffle_v1": (UnshuffleProjector, (8, 12), 1, {"ps_version": "v1"}, False),
    "patchmerger": (PatchMergerProjector, (14, 14), 1, {"out_channels": 48}, True),
    "cabstractor_16_to_12": (CAbstractor, (16, 16), 1, {"tokens": 144, "depth": 1, "hidden": 48}, True),
    "llamavid_grid2": (LlamaVidProjector, (14, 14), 1, {"grid_size": 2, "queries": 4, "query_channels": 24}, True),
    "resampler_32_depth2": (ResamplerProjector, (14, 14), 1, {"queries": 32, "depth": 2, "out_channels": 64}, True),
    "mlp": (MLPProjector, (14, 14), 1, {"out_channels": 48}, False),
    "mlp_keep": (MLPProjector, (14, 14), 1, {"out_channels": 48, "prefix_mode": "keep"}, False),
}


def export_inputs(cls, grid, prefix, batch, seed):
    x = tokens(grid, prefix, batch=batch, seed=seed)
    return (x, torch.randn(batch, 4, 24)) if cls is LlamaVidProjector else (x,)


@pytest.mark.filterwarnings("ignore:.*axis name.*:UserWarning")  # two inputs sharing the batch Dim
@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_onnx_export_parity_and_ops(case, tmp_path):
    """Each module exports alone (dynamo, opset 18); ONNX Runtime matches PyTorch; only TensorRT-parsable ops."""
    import onnx
    import onnxruntime as ort
    from torch.export import Dim

    cls, grid, prefix, settings, dynamic = EXPORT_CASES[case]
    module = randomize(cls(C, grid, prefix, **settings)).eval()
    args = export_inputs(cls, grid, prefix, 2, seed=5)
    names = list(inspect.signature(module.forward).parameters)
    batch = Dim("batch", min=1, max=64)
    shapes = {name: {0: batch} for name in names} if dynamic else None
    path = tmp_path / f"{case}.onnx"
    torch.onnx.export(module, args, str(path), dynamo=True, opset_version=18, dynamic_shapes=shapes, verbose=False)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    ops = {node.op_type for node in model.graph.node}
    assert ops <= TRT_OPS, f"ops outside TensorRT's table: {ops - TRT_OPS}"
    assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
    for node in model.graph.node:
        if node.op_type == "Resize":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs["mode"] in (b"nearest", b"linear") and attrs.get("antialias", 0) == 0
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    if dynamic:  # another batch size through the same file
        args = export_inputs(cls, grid, prefix, 3, seed=6)
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    (got,) = session.run(None, feeds)
    with torch.no_grad():
        expected = module(*args).numpy()
    assert got.shape == expected.shape == (args[0].shape[0], module.tokens_out(), module.channels_out())
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)
