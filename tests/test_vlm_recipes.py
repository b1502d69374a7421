"""Recipes named after a vision-language model compute what that model's published code computes.

Each runs through the command line (``tc-export MODEL --recipe NAME -o m.onnx``: passes, MACs, export, parity) and
the ONNX output is held to an independent per-sample reference (``reference_vlm``: the transformers tower read at
the model's feature layer, its class-token handling and stage order, the projector written from its published
code). The default run uses the model's tower at full width, grid and heads with three layers (and two frames
for video; each frame runs alone, so the count only repeats the work); ``-m full`` runs the full towers.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tc_export.job import pipeline
from tc_export.cli.main import main
from tc_export.models import hf_models, towers  # noqa: F401 - register the towers
from tc_export.models.registry import MODELS, ModelSpec
from tc_export.ops.projectors import CAbstractor, MLPProjector, UnshuffleProjector
from tc_export.recipes import load_recipe

from . import reference_vlm as ref

SHRUNK = {"layers": 3, "frames": 2}
# recipe -> (output tokens per image or frame, the reference of its model)
RECIPES = {
    "llava15_clip_l336": (576, lambda tower, x, mods: ref.llava15(tower, x, mods[MLPProjector])),
    "llava15_prumerge": (33, lambda tower, x, mods: ref.llava_prumerge(tower, x, 32, mods[MLPProjector])),
    "llava_next_video_clip_l336": (144, lambda tower, x, mods: ref.llava_next_video(tower, x, mods[MLPProjector])),
    "llava_onevision_video_siglip": (196, lambda tower, x, mods: ref.llava_onevision_video(tower, x,
                                                                                          mods[MLPProjector])),
    "internvl_clip_l336_unshuffle": (144, lambda tower, x, mods: ref.internvl(tower, x, mods[UnshuffleProjector])),
    "honeybee_clip_l336_cabstractor": (144, lambda tower, x, mods: ref.honeybee(tower, x, mods[CAbstractor], 1024,
                                                                               4096, 144)),
}


def _run_recipe(name: str, shrunk: bool, tmp_path, capsys, monkeypatch) -> tuple[np.ndarray, dict, dict]:
    """The recipe through the command line; returns the ONNX output, what was built and the input fed."""
    recipe = load_recipe(name)
    built: dict = {}
    spec = MODELS.get(recipe.model)

    def build(options, **overrides):
        torch.manual_seed(0)
        built["tower"] = spec.build(options, **({"num_hidden_layers": SHRUNK["layers"]} if shrunk else {}))
        return built["tower"]

    def compress_and_keep(*args, **kwargs):
        built["compressed"] = compress_for_job(*args, **kwargs)
        return built["compressed"]

    compress_for_job = pipeline.compress_for_job
    monkeypatch.setitem(MODELS._entries, recipe.model, ModelSpec(spec.name, spec.description, build))
    monkeypatch.setattr(pipeline, "compress_for_job", compress_and_keep)
    out = tmp_path / "m.onnx"
    frames = ["--frames", str(SHRUNK["frames"])] if recipe.frames and shrunk else []
    with pytest.raises(SystemExit) as done:
        main([recipe.model, "--recipe", name, *frames, "-o", str(out)])
    printed = capsys.readouterr()
    assert done.value.code == 0, printed.err
    assert "parity PyTorch vs ONNX Runtime" in printed.out and "passed" in printed.out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feed = {i.name: torch.randn([1, *i.shape[1:]], generator=torch.Generator().manual_seed(5))
            for i in session.get_inputs()}
    got = session.run(None, {k: v.numpy() for k, v in feed.items()})[0]
    return got, built, feed


def _modules(compressed) -> dict:
    """Projector type -> its state dict, from the compressed model."""
    return {type(m): {k: v.detach() for k, v in m.state_dict().items()} for m in compressed.module.children()
            if isinstance(m, (MLPProjector, UnshuffleProjector, CAbstractor))}


@pytest.mark.slow
@pytest.mark.parametrize("shrunk", [True, pytest.param(False, marks=pytest.mark.full)], ids=["3-layer", "full"])
@pytest.mark.parametrize("name", list(RECIPES))
def test_model_recipe_matches_its_published_code(name, shrunk, tmp_path, capsys, monkeypatch):
    tokens, reference = RECIPES[name]
    got, built, feed = _run_recipe(name, shrunk, tmp_path, capsys, monkeypatch)
    recipe = load_recipe(name)
    frames = (SHRUNK["frames"] if shrunk else recipe.frames) if recipe.frames else 1
    width = next(stage.out_channels for stage in recipe.stages if getattr(stage, "out_channels", None))
    assert got.shape == (1, frames * tokens, width)
    tower = ref.vision_model(built["tower"].module)
    want = reference(tower, next(iter(feed.values())), _modules(built["compressed"]))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-3, atol=2e-4)


def test_llava15_recipes_read_layer_minus_2_without_the_class_token():
    """The recipe files say what the published models do (the values the references above assume)."""
    llava = load_recipe("llava15_clip_l336")
    assert (llava.model, llava.features, [s.method for s in llava.stages]) == ("clip_vit_l_336", -2, ["mlp"])
    assert llava.stages[0].prefix_mode in (None, "drop")
    prumerge = load_recipe("llava15_prumerge")
    assert (prumerge.features, [s.method for s in prumerge.stages]) == (-2, ["prumerge", "mlp"])
    assert prumerge.stages[0].layers is None  # default: the layer after the cut scores (the last of 24)
    assert [s.method for s in load_recipe("llava_next_video_clip_l336").stages] == ["pool", "mlp"]
    assert [(s.method, getattr(s, "mode", None)) for s in load_recipe("llava_onevision_video_siglip").stages] == [
        ("mlp", None), ("pool", "bilinear")]
    assert load_recipe("honeybee_clip_l336_cabstractor").features == -1
    assert load_recipe("internvl_clip_l336_unshuffle").features == -1
