import pytest

from autoround.quantizer.errors import SchemeError
from autoround.quantizer.schemes import PRESETS, QuantScheme, resolve_scheme


def test_presets_are_data():
    assert PRESETS["W4A16"] == QuantScheme(bits=4, group_size=128, sym=True)
    assert PRESETS["W2A16G64"].group_size == 64 and PRESETS["W2A16G64"].bits == 2
    assert PRESETS["W2A16G32"].group_size == 32
    assert PRESETS["W3A16"].bits == 3 and PRESETS["W8A16"].bits == 8
    with pytest.raises(Exception):
        PRESETS["W4A16"].bits = 3  # frozen


def test_overrides_and_case():
    s = resolve_scheme("w4a16", bits=3, group_size=64, sym=False)
    assert (s.bits, s.group_size, s.sym) == (3, 64, False)
    assert resolve_scheme({"bits": 2, "group_size": 32}).bits == 2


def test_unknown_scheme_lists_choices():
    with pytest.raises(SchemeError, match="valid schemes: .*W4A16"):
        resolve_scheme("W5A99")


def test_unknown_key_lists_valid_keys():
    with pytest.raises(SchemeError, match="unknown scheme key.*'bitz'.*valid keys: bits"):
        QuantScheme.from_dict({"bitz": 4})


@pytest.mark.parametrize("kw,msg", [
    ({"bits": 1}, "bits=1 is not supported"),
    ({"bits": 9}, "bits=9 is not supported"),
    ({"group_size": -2}, "group_size=-2 is invalid; valid: -1"),
    ({"group_size": 3.5}, "group_size=3.5 is invalid"),
    ({"sym": "yes"}, "sym must be True or False"),
    ({"act_bits": 6}, "act_bits=6 is not supported"),
    ({"bits": 16, "act_bits": 8}, "with float weights"),
])
def test_impossible_values(kw, msg):
    with pytest.raises(SchemeError, match=msg):
        QuantScheme(**kw)


def test_float_bits():
    assert QuantScheme(bits=16).is_float
    assert not QuantScheme(bits=8).is_float
