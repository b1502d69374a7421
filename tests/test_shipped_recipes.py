"""Every shipped recipe exports with parity on the model it names.

In the default run, the headline and the small-model recipes run at full size through the command line (the
user's path, end to end); our own vision-language combinations run on a three-layer tower of the same width, grid,
heads and frames (what a recipe inserts, its projector on the tower's tokens, is the same; the layers left out only
cost CI minutes); the recipes named after a model are held to their published code in ``test_vlm_recipes.py``. ``python -m pytest -m full`` runs every recipe at full size through the command line (~10 min).
"""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tc_export import ExportConfig, compress, export_onnx
from tc_export.cli.main import main
from tc_export.models import ModelOptions
from tc_export.models import hf_models, towers  # noqa: F401 - register the towers
from tc_export.models.registry import MODELS
from tc_export.models.video import video_model
from tc_export.recipes import load_recipe, shipped_recipes

RECIPES = sorted(shipped_recipes())
FULL_SIZE = ["vit_b_tome_r16", "deit_s_evit_keep07", "minilm_tome", "minilm_adjacent", "whisper_tiny_adjacent"]
SHALLOW = ["llava_clip_l336_pool_mlp", "video_clip_b_8frames_pool", "video_clip_b_8frames_pool_evs"]  # our own combinations
MODEL_NAMED = ["llava15_clip_l336", "llava15_prumerge", "llava_next_video_clip_l336", "llava_onevision_video_siglip",
               "internvl_clip_l336_unshuffle", "honeybee_clip_l336_cabstractor",  # against references: test_vlm_recipes
               "idefics3_siglip_connector", "smolvlm_siglip_connector",
               "gemma3_siglip_pool", "llama4_scout_adapter"]  # against the published modules: test_vlm_connectors


def test_every_shipped_recipe_names_its_model():
    for name in RECIPES:
        assert load_recipe(name).model, f"recipe {name} names no model"


def test_every_shipped_recipe_is_checked():
    assert set(FULL_SIZE) | set(SHALLOW) | set(MODEL_NAMED) | {"vit_b_tome_r13", "vit_b_tome_then_topk"} == set(RECIPES)


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(name, marks=[] if name in FULL_SIZE else pytest.mark.full)
                                  for name in RECIPES])
def test_shipped_recipe_exports_with_parity(name, tmp_path, capsys):
    recipe = load_recipe(name)
    out = tmp_path / f"{name}.onnx"
    with pytest.raises(SystemExit) as done:
        main([recipe.model, "--recipe", name, "-o", str(out)])
    printed = capsys.readouterr()
    assert done.value.code == 0, printed.err
    assert out.is_file()
    assert "parity PyTorch vs ONNX Runtime" in printed.out and "passed" in printed.out


@pytest.mark.slow
@pytest.mark.parametrize("name", SHALLOW)
def test_shipped_recipe_on_a_shallow_tower(name, tmp_path):
    recipe = load_recipe(name)
    torch.manual_seed(0)
    loaded = MODELS.get(recipe.model).build(ModelOptions(), num_hidden_layers=3)
    if recipe.frames:
        loaded = video_model(loaded, recipe.frames)
    inputs = loaded.example_inputs(batch=1)
    compressed = compress(loaded, list(recipe.stages), inputs, features=recipe.features, frames=recipe.frames)
    path = tmp_path / "m.onnx"
    export_onnx(compressed.module, inputs, path, ExportConfig(), input_names=list(inputs))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    with torch.no_grad():
        want = compressed(**inputs).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    tokens = {"video_clip_b_8frames_pool": 8 * 49,  # 576 patches -> 144; 8 x 196 -> 8 x 49
              "video_clip_b_8frames_pool_evs": 98}.get(name, 144)  # EVS q=0.75 keeps 98 of 392
    widths = [stage.out_channels for stage in recipe.stages if hasattr(stage, "out_channels")]
    assert got.shape[:2] == (1, tokens)
    if widths:  # ... tokens of the language model's width (pool and EVS keep the tower's)
        assert got.shape[2] == widths[-1]
