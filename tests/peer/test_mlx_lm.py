"""mlx-lm (Apple's MLX, whose Linux x86-64 CPU wheels run here) loads our SmolLM2 ``mlx`` and ``auto_round:mlx``
exports with ``mlx_lm.load``, and its greedy tokens agree with our transformers load of the same checkpoint.

The measure: mlx-lm greedy-decodes 32 tokens after each of 4 prompts; our loader (float32, TorchMlxQuantLinear)
scores the same sequences teacher-forced, and its top-1 token at each generated position must equal mlx-lm's in
at least 98% of the 128 positions (the two run different matmul kernels, so a near-tie may flip; measured: 100%).
Needs ``AR_TEST_MLX_PYTHON``: a virtualenv with ``mlx[cpu]`` and ``mlx-lm`` (``.ci/run`` builds it).
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from autoround import AutoRound
from autoround.backends import TorchMlxQuantLinear

pytestmark = [pytest.mark.peer, pytest.mark.slow]

MLX = os.environ.get("AR_TEST_MLX_PYTHON")
HERE = Path(__file__).parent
PROMPTS = [
    "The capital of France is",
    "Photosynthesis is the process by which",
    "In 1969, the first humans",
    "def fibonacci(n):",
]
NEW_TOKENS = 32


def mlx_lm(tmp_path, prompt_ids, *folders):
    if not MLX:
        pytest.skip("AR_TEST_MLX_PYTHON is not set: no virtualenv with mlx-lm")
    prompts, out = tmp_path / "prompts.json", tmp_path / "mlx.json"
    prompts.write_text(json.dumps(prompt_ids))
    r = subprocess.run([MLX, HERE / "mlx_lm_peer.py", out, prompts, str(NEW_TOKENS), *map(str, folders)],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text())


def agreement(model, prompt_ids, tokens):
    """Share of generated positions where our teacher-forced top-1 equals mlx-lm's greedy token."""
    same = total = 0
    for ids, new in zip(prompt_ids, tokens):
        seq = torch.tensor([ids + new])
        with torch.no_grad():
            top1 = model(seq).logits[0, len(ids) - 1 : -1].argmax(-1).tolist()
        same += sum(a == b for a, b in zip(top1, new))
        total += len(new)
    return same / total


@pytest.fixture(scope="module")
def smol(smollm2_folder):
    tok = AutoTokenizer.from_pretrained(str(smollm2_folder))
    return smollm2_folder, tok, [tok(p)["input_ids"] for p in PROMPTS]


@pytest.mark.parametrize("case", ["w4a16_g64", "w2_w8_mixed_asym"])
def test_mlx_lm_loads_our_exports_and_agrees(smol, tmp_path, case):
    folder, tok, prompt_ids = smol
    if case == "w4a16_g64":
        # group 64: SmolLM2's 576 hidden features are 9 whole groups (MLX needs whole groups; 128 would leave
        # every attention and gate/up projection in float)
        kw = dict(scheme="W4A16", group_size=64)
        want_bits = {"self_attn.q_proj": 4, "mlp.gate_proj": 4, "mlp.down_proj": 4}
    else:
        kw = dict(scheme="W8A16", group_size=64, sym=False,
                  layer_config={"mlp.gate_proj": {"bits": 2}, "mlp.up_proj": {"bits": 2}})
        want_bits = {"self_attn.q_proj": 8, "mlp.gate_proj": 2, "mlp.down_proj": 8}
    ar = AutoRound(str(folder), iters=0, disable_opt_rtn=True, **kw)
    _, (ar_mlx, native) = ar.quantize_and_save(str(tmp_path / case), format="auto_round:mlx,mlx")
    got = mlx_lm(tmp_path, prompt_ids, ar_mlx, native)

    ours = AutoModelForCausalLM.from_pretrained(ar_mlx, dtype=torch.float32).eval()
    assert isinstance(ours.model.layers[3].mlp.gate_proj, TorchMlxQuantLinear)
    for name in (ar_mlx, native):
        layers = got[name]["quantized"]
        assert len(layers) == 30 * 7, f"mlx-lm quantized {len(layers)} layers of {name}, want every block linear"
        for suffix, bits in want_bits.items():
            assert layers[f"model.layers.5.{suffix}"] == [bits, 64]
        assert "model.embed_tokens" not in layers and "lm_head" not in layers
    # the two folders hold the same tensors: mlx-lm decodes them identically
    assert got[ar_mlx]["tokens"] == got[native]["tokens"]
    tokens = got[native]["tokens"]
    share = agreement(ours, prompt_ids, tokens)
    exact = sum(a == b for a, b in zip(tokens, [
        ours.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(p):].tolist()
        for p in prompt_ids
    ]))
    print(f"{case}: teacher-forced top-1 agreement {share:.4f}; greedy sequences identical {exact}/{len(PROMPTS)}; "
          f"mlx-lm on {got[native]['device']}: {tok.decode(tokens[0])!r}")
    assert share >= 0.98
