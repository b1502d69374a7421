"""Projectors placed by the site model: at the encoder output, after a block, on video frames, after
--features; each checked against the same projector module applied by hand to the model's own tokens."""

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch

from tc_export import ExportConfig, compress, export_onnx
from tc_export.errors import ConfigError
from tc_export.models.video import FrameTower
from tc_export.passes import ToMeConfig
from tc_export.passes.projectors import (
    CAbstractorConfig,
    LlamaVidConfig,
    MLPConfig,
    PatchMergerConfig,
    PoolConfig,
    ResamplerConfig,
    UnshuffleConfig,
)


def _vit(depth=2):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", depth=depth).eval()  # 14 x 14 grid + class token


def _images(batch=1, seed=0):
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def _projector(compressed):
    mods = [m for name, m in compressed.module.named_children() if name.endswith("_encoder")]
    assert len(mods) == 1
    return mods[0]


CASES = {
    "pool": (PoolConfig(), 49),
    "pool-bilinear": (PoolConfig(mode="bilinear"), 49),
    "unshuffle": (UnshuffleConfig(), 49),
    "unshuffle-v1": (UnshuffleConfig(ps_version="v1"), 49),
    "patchmerger": (PatchMergerConfig(out_channels=64), 49),
    "cabstractor": (CAbstractorConfig(tokens=64), 64),
    "resampler": (ResamplerConfig(queries=32), 32),
    "llamavid": (LlamaVidConfig(query_channels=24, queries=4), 2),
    "mlp": (MLPConfig(out_channels=96), 196),
    "mlp-keep": (MLPConfig(out_channels=96, prefix_mode="keep"), 197),
}


@pytest.mark.parametrize("name", list(CASES))
def test_projector_at_encoder_output(name, tmp_path):
    config, tokens = CASES[name]
    model = _vit()
    images = _images(2)
    compressed = compress(model, config, {"x": images[:1]})
    assert compressed.token_counts()[-1] == tokens
    assert compressed.report.grid == (14, 14)
    inputs = {"x": images} | compressed.extra_inputs(2)
    op = _projector(compressed)
    with torch.no_grad():
        features = model.forward_features(images)  # timm's own tokens after the final norm
        want = op(features, inputs["text_queries"]) if name == "llamavid" else op(features)
        got = compressed(**inputs)
    torch.testing.assert_close(got, want)
    assert got.shape[1] == tokens
    path = tmp_path / "p.onnx"
    export_onnx(compressed.module, inputs, path, ExportConfig(batch=2), input_names=list(inputs),
                output_names=["tokens"])
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {k: v.numpy() for k, v in inputs.items()})[0]
    np.testing.assert_allclose(out, got.numpy(), rtol=1e-4, atol=1e-4)


def test_features_layer_then_pool_then_mlp():
    """LLaVA style: the second-to-last block's tokens (no final norm), class token dropped, pooled, projected."""
    model = _vit(depth=3)
    images = _images(2, seed=1)
    compressed = compress(model, [PoolConfig(), MLPConfig(out_channels=64)], {"x": images[:1]}, features=-2)
    with torch.no_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        for block in model.blocks[:2]:
            x = block(x)
        pool, mlp = [m for name, m in compressed.module.named_children() if "encoder" in name]
        torch.testing.assert_close(compressed(images), mlp(pool(x)))
    assert compressed.token_counts()[-1] == 49


def test_video_frames_run_the_tower_and_projector_per_frame():
    model = _vit()
    video = torch.randn(2, 3, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    tower = FrameTower(model, frames=3).eval()
    compressed = compress(tower, PoolConfig(), {"video": video[:1]}, frames=3)
    pool = _projector(compressed)
    with torch.no_grad():
        per_frame = pool(model.forward_features(video.flatten(0, 1)))  # (B*T, 49, C)
        torch.testing.assert_close(compressed(video), per_frame.reshape(2, 3 * 49, -1))


def test_pool_inside_the_tower_keeps_the_class_token():
    model = _vit(depth=3)
    images = _images(2, seed=3)
    compressed = compress(model, PoolConfig(at="0", prefix_mode="keep"), {"x": images[:1]})
    assert compressed.token_counts() == [197, 50, 50, 50]
    pool = [m for name, m in compressed.module.named_children() if name.startswith("poolprojector")][0]
    with torch.no_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        x = pool(model.blocks[0](x))
        for block in model.blocks[1:]:
            x = block(x)
        torch.testing.assert_close(compressed(images), model.forward_head(model.norm(x)))


@pytest.mark.parametrize("configs,message", [
    ([ToMeConfig(r=4), PoolConfig(mode="bilinear")], "pool needs the patch grid.*interpolates across windows"),
    ([PoolConfig(at="0")], "would drop the 1 class/register tokens"),
    ([MLPConfig(out_channels=64, at="0")], "changes the width"),
    ([MLPConfig(at="0")], "would drop the 1 class/register tokens"),
])
def test_projector_placement_errors(configs, message):
    with pytest.raises(ConfigError, match=message):
        compress(_vit(), configs, {"x": _images()})


@pytest.mark.parametrize("config", [UnshuffleConfig, PatchMergerConfig, CAbstractorConfig, ResamplerConfig,
                                    LlamaVidConfig])
def test_grid_projectors_drop_the_prefix_and_refuse_to_keep_it(config):
    with pytest.raises(ConfigError, match="drops the class/register tokens, as its published model does"):
        config(prefix_mode="keep")
    with pytest.raises(ConfigError, match="prefix_mode must be drop, keep or auto"):
        config(prefix_mode="cls")


def test_projector_weights_are_loaded_and_checked(tmp_path):
    from safetensors.torch import save_file

    model = _vit()
    images = _images()
    first = compress(model, MLPConfig(out_channels=32), {"x": images})
    state = {k: torch.randn_like(v) for k, v in _projector(first).state_dict().items()}
    save_file(state, str(tmp_path / "mlp.safetensors"))
    loaded = compress(model, MLPConfig(out_channels=32, projector_weights=str(tmp_path / "mlp.safetensors")),
                      {"x": images})
    for key, value in _projector(loaded).state_dict().items():
        torch.testing.assert_close(value, state[key])
    save_file({"net.0.weight": torch.zeros(3, 3)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConfigError, match="does not fit"):
        compress(model, MLPConfig(out_channels=32, projector_weights=str(tmp_path / "bad.safetensors")),
                 {"x": images})


FULL_SIZE = {  # method flags -> output tokens on vit_s (14 x 14 grid + class token)
    "pool": (["--method", "pool", "--stride", "2"], 49),
    "unshuffle": (["--method", "unshuffle", "--scale", "0.5"], 49),
    "cabstractor": (["--method", "cabstractor", "--tokens", "64"], 64),
    "resampler": (["--method", "resampler", "--queries", "32"], 32),
    "llamavid": (["--method", "llamavid"], 2),
    "mlp": (["--method", "mlp", "--out-channels", "1024"], 196),
    "patchmerger": (["--method", "patchmerger", "--out-channels", "1024"], 49),
}


@pytest.mark.slow
@pytest.mark.parametrize(("model", "name"), [
    pytest.param(model, name, marks=[] if (model, name) == ("vit_s", "cabstractor") else pytest.mark.full)
    for model in ("vit_s", "clip_vit_b") for name in FULL_SIZE])
def test_projectors_export_with_parity_full_size(model, name, tmp_path, capsys):
    """Every projector on full-size towers (``-m full``); the default run keeps one, the others are covered on
    small towers above and by the shipped recipes."""
    from tc_export.cli.main import main

    flags, tokens = FULL_SIZE[name]
    with pytest.raises(SystemExit) as done:
        main([model, *flags, "-o", str(tmp_path / "p.onnx")])
    printed = capsys.readouterr()
    assert done.value.code == 0, printed.err
    assert "passed" in printed.out
    counts = next(line for line in printed.out.splitlines() if line.startswith("tokens per layer"))
    assert int(counts.split()[-1]) == tokens
