"""The benchmarks' own logic (no model runs): recipe rows, the accuracy-per-minute front, the SignRoundV2 ablation."""

import torch

from autoround.bench import alg_ext, vs_reference
from autoround.quantizer import signround
from autoround.quantizer.cli import RECIPES
from autoround.quantizer.dtypes import integer


def test_recipe_rows_give_each_tool_its_own_recipe():
    light = vs_reference.METHODS["recipe_light"]
    assert light.ref == vs_reference.METHODS["light"].ref == {"iters": 50, "lr": 5e-3}
    ours = light.ours()
    # our recipe's options, less the protocol's fixed settings (nsamples)
    assert ours == {k: v for k, v in RECIPES["light"].items() if k != "nsamples"} and "nsamples" not in ours
    assert vs_reference.METHODS["default"].ours() == {"iters": 200}


def _row(scheme, method, ours, ref, cached=False):
    return {"scheme": scheme, "method": method, "ours": {"ppl": ours[0], "seconds": ours[1]},
            "ref": {"ppl": ref[0], "seconds": ref[1], "cached": cached}}


def test_front_picks_our_fastest_row_at_or_below_each_reference_row():
    rows = [
        _row("W4G64", "recipe_light", (23.3, 50.0), (23.9, 200.0)),
        _row("W4G64", "recipe_default", (23.0, 390.0), (23.4, 800.0)),
        _row("W2G64", "recipe_light", (90.0, 60.0), (80.0, 210.0)),  # ours worse: no row of ours reaches it
        _row("W4G128", "light", (24.0, 10.0), (24.1, 20.0), cached=True),  # a cached reference row has no time
    ]
    front = vs_reference._front(rows).splitlines()
    assert "| W4G64 | light | 23.900 | 200.0 | recipe_light | 23.300 | 50.0 | 0.25 |" in front
    # the reference's default row is reached by our light recipe (23.3 <= 23.4), in 50 s of its 800
    assert "| W4G64 | default | 23.400 | 800.0 | recipe_light | 23.300 | 50.0 | 0.06 |" in front
    assert "| W2G64 | light | 80.000 | 210.0 | none | - | - | - |" in front
    assert not any("W4G128" in line for line in front)


def test_alg_ext_ablation_switches_off_one_part(monkeypatch):
    monkeypatch.setattr(integer, "ALG_EXT_FACTOR_RANGE", integer.ALG_EXT_FACTOR_RANGE)
    monkeypatch.setattr(signround, "masked_mse", signround.masked_mse)
    out, target = torch.zeros(1, 4, 1000), torch.zeros(1, 4, 1000)
    target[0, 0, 0] = 100.0  # one outlier error among 4000
    assert signround.masked_mse(out, target, None, True) == 0  # filtered away
    alg_ext._switch_off(("range",))
    assert integer.ALG_EXT_FACTOR_RANGE == (0.0, 1.0)
    assert signround.masked_mse(out, target, None, True) == 0  # the loss is untouched by "range"
    alg_ext._switch_off(("filtered",))
    assert signround.masked_mse(out, target, None, True) > 0  # every element counts
