"""Every shipped recipe exports with parity on the model it names, through the command line (full-size: slow)."""

import pytest

from tc_export.cli.main import main
from tc_export.recipes import load_recipe, shipped_recipes

RECIPES = sorted(shipped_recipes())


def test_every_shipped_recipe_names_its_model():
    for name in RECIPES:
        assert load_recipe(name).model, f"recipe {name} names no model"


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_shipped_recipe_exports_with_parity(name, tmp_path, capsys):
    recipe = load_recipe(name)
    out = tmp_path / f"{name}.onnx"
    with pytest.raises(SystemExit) as done:
        main([recipe.model, "--recipe", name, "-o", str(out)])
    printed = capsys.readouterr()
    assert done.value.code == 0, printed.err
    assert out.is_file()
    assert "parity PyTorch vs ONNX Runtime" in printed.out and "passed" in printed.out
