import pytest

from tc_export.errors import ConfigError
from tc_export.passes.tome import ToMeConfig


def test_constant_schedule():
    assert ToMeConfig(r=16).schedule(12) == [16] * 12


def test_linear_schedule_by_hand():
    # r=8, inflection=0.5: min = int(8 * 0.5) = 4, max = 2*8 - 4 = 12, step (12 - 4) / 3 = 2.67
    assert ToMeConfig(r=8, inflection=0.5).schedule(4) == [4, 6, 9, 12]
    # inflection -0.5: min = int(12), max = 4: decreasing
    assert ToMeConfig(r=8, inflection=-0.5).schedule(3) == [12, 8, 4]
    assert ToMeConfig(r=8, inflection=0.0).schedule(5) == [8] * 5


def test_list_schedule_is_padded():
    assert ToMeConfig(r=(4, 2)).schedule(4) == [4, 2, 0, 0]
    with pytest.raises(ConfigError, match="5 entries"):
        ToMeConfig(r=(1, 1, 1, 1, 1)).schedule(4)


@pytest.mark.parametrize("bad", [-1, 1.5, "8", True, (2, -1)])
def test_invalid_r(bad):
    with pytest.raises(ConfigError):
        ToMeConfig(r=bad)


def test_inflection_range():
    with pytest.raises(ConfigError):
        ToMeConfig(r=4, inflection=2.0)
