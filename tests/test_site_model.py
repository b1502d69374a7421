"""The site model's promises: one registry entry per method, flags and recipe keys derived from the config's
fields, configs that round-trip through dicts, and a new method that needs no edit outside its own file."""

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import pytest

from tc_export.cli.options import MethodFlags, flag_specs, method_configs
from tc_export.errors import ConfigError
from tc_export.passes import METHODS, config_from_dict, config_to_dict
from tc_export.passes.methods import register_method, setting

DEFAULTS = {"prumerge": {"tokens": 8}}


@pytest.mark.parametrize("name", METHODS.names())
def test_configs_round_trip_through_dicts(name):
    config = METHODS.get(name).config_type(**DEFAULTS.get(name, {}))
    data = config_to_dict(config)
    assert data["method"] == name
    assert config_from_dict(data) == config


@pytest.mark.parametrize("name", METHODS.names())
def test_every_setting_is_a_flag(name):
    specs = flag_specs()
    for field in dataclasses.fields(METHODS.get(name).config_type):
        assert field.name in specs and name in specs[field.name].methods


def test_flags_build_the_config_and_name_what_does_not_apply():
    (config,), label = method_configs(MethodFlags("tome", None, (("r", "8,8,4"), ("layers", "0-2"))))
    assert config.r == (8, 8, 4) and config.layers == (0, 1, 2)
    assert label.startswith("tome r=8,8,4")
    with pytest.raises(ConfigError, match="--keep does not apply to --method tome"):
        method_configs(MethodFlags("tome", None, (("keep", "0.5"),)))
    with pytest.raises(ConfigError, match="--inflect must be a number"):
        method_configs(MethodFlags("tome", None, (("inflection", "x"),)))


def test_a_new_method_brings_its_own_flags():
    @register_method("test_only_noop", "a method defined in a test")
    @dataclass(frozen=True)
    class NoopConfig:
        method: ClassVar[str] = "test_only_noop"
        strength: int = setting(3, "how hard to do nothing")

    try:
        specs = flag_specs()
        assert specs["strength"].flag == "--strength" and specs["strength"].methods == ("test_only_noop",)
        (config,), _ = method_configs(MethodFlags("test_only_noop", None, (("strength", "5"),)))
        assert config == NoopConfig(strength=5)
        assert config_from_dict({"method": "test_only_noop", "strength": 7}) == NoopConfig(strength=7)
    finally:
        METHODS._entries.pop("test_only_noop")
