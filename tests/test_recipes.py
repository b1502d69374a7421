"""Recipes: shipped ones load, bad ones name the file, key and allowed values, and the CLI runs them."""

import pytest

from tc_export.errors import ConfigError
from tc_export.passes import ToMeConfig, TopKConfig
from tc_export.recipes import load_recipe, parse_recipe, shipped_recipes

from .test_cli import TINY, run_cli


def test_shipped_recipes_load():
    names = set(shipped_recipes())
    assert {"vit_b_tome_r16", "vit_b_tome_r13", "deit_s_evit_keep07", "vit_b_tome_then_topk", "whisper_tiny_adjacent",
            "minilm_tome", "minilm_adjacent"} <= names
    for name in names:
        recipe = load_recipe(name)
        assert recipe.stages and recipe.description
    assert load_recipe("vit_b_tome_r16").stages == (ToMeConfig(r=16),)
    assert load_recipe("vit_b_tome_then_topk").stages == (
        ToMeConfig(r=8, layers=(0, 1, 2, 3, 4, 5)), TopKConfig(keep=0.7, layers=(8,)))


def test_layer_syntax():
    recipe = parse_recipe("stages:\n  - {method: topk, keep: 0.5, layers: [0-2, 7]}\n", "x.yaml")
    assert recipe.stages[0].layers == (0, 1, 2, 7)


@pytest.mark.parametrize("text,message", [
    ("stages: [{method: tome, rr: 4}]", r"x.yaml: stage 1 \(tome\): unknown key 'rr'; allowed keys: method, r, "),
    ("stages: [{method: evit}]", r"x.yaml: stage 1: unknown method 'evit'; allowed methods: adjacent, cabstractor, "
                                  r"evs, gemma3, idefics3, llama4, llamavid, mlp, patchmerger, pool, prumerge, "
                                  r"resampler, temporal, tome, topk, unshuffle"),
    ("stagez: []", r"x.yaml: unknown key 'stagez'; allowed keys: description, model, features, frames, unit, stages"),
    ("stages: [{method: topk, keep: 2}]", r"x.yaml: stage 1 \(topk\): keep must be a fraction in \(0, 1\]"),
    ("stages: [{method: topk, layers: 5-2}]", r"x.yaml: stage 1: layers must be indices or ranges like 0-5"),
    ("stages: [{method: tome, r: 4}, {method: prumerge}]", r"x.yaml: stage 2 \(prumerge\): missing key .tokens."),
    ("stages: {method: tome", r"x.yaml: not valid YAML"),
    ("stages: []", r"x.yaml: 'stages' must be a non-empty list"),
])
def test_bad_recipes_name_file_key_and_allowed_values(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_recipe(text, "x.yaml")


def test_unknown_recipe_lists_shipped_ones():
    with pytest.raises(ConfigError, match="neither a shipped recipe .*vit_b_tome_r16.* nor a file"):
        load_recipe("no_such_recipe")


def test_recipe_exports_end_to_end(tmp_path, capsys):
    recipe = tmp_path / "two.yaml"
    recipe.write_text("stages:\n  - {method: tome, r: 2, layers: 0-3}\n  - {method: topk, keep: 0.5, layers: [6], fuse: true}\n")
    code, out, err = run_cli([*TINY, "--recipe", recipe, "-o", tmp_path / "m.onnx"], capsys)
    assert code == 0, err
    assert "tokens per layer: 17 15 13 11 9 9 9 6 6 6 6 6 6" in out  # 9 -> 1 + ceil(0.5 * 8) + fused
    assert "passed" in out


@pytest.mark.parametrize("body,message", [
    ("stages: [{method: topk, layers: [12]}]", "layer 12 is out of range: the model has 12 attention layers"),
    ("stages: [{method: prumerge, tokens: 17}]", "the budget must be at most 15"),
])
def test_recipe_errors_found_at_compress_time_name_the_file(tmp_path, capsys, body, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(body)
    code, out, err = run_cli([*TINY, "--recipe", recipe, "-o", tmp_path / "m.onnx"], capsys)
    assert code == 2
    assert err.startswith(f"tc-export: error: recipe {recipe}: ") and message in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()


def test_recipe_and_method_flags_do_not_mix(tmp_path, capsys):
    code, _, err = run_cli([*TINY, "--recipe", "vit_b_tome_r16", "--r", "4", "-o", tmp_path / "m.onnx"], capsys)
    assert code == 2 and "drop --r or drop --recipe" in err


@pytest.mark.parametrize("args,message", [
    (["--method", "tome", "--keep", "0.5"], "--keep does not apply to --method tome (it is for topk)"),
    (["--method", "prumerge"], "--method prumerge needs --tokens K"),
    (["--keep", "0.5"], "--keep needs a method"),
    (["--method", "topk", "--layers", "a"], "layers must be indices or ranges"),
])
def test_method_flag_errors(tmp_path, capsys, args, message):
    code, _, err = run_cli([*TINY, *args, "-o", tmp_path / "m.onnx"], capsys)
    assert code == 2 and message in err, err
