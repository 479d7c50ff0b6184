"""Interop with Intel's auto-round (PyPI), run for real in its own virtualenv.

``AR_TEST_PEER_PYTHON`` names that virtualenv's python (``.ci/run`` builds it with auto-round, and our
package installed with --no-deps).  Checkpoints go both ways and logits are compared:
- Intel's W4A16 g64 checkpoint through our loader = Intel's own loader (which runs in fp16 here);
- our checkpoint through Intel's loader (transformers' built-in integration) = our loader;
- with Intel's package installed, ``import autoround`` still routes loading through our kernels.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from autoround import AutoRound
from autoround.backends import TorchQuantLinear
from autoround.quantizer.data import wikipedia_text

pytestmark = [pytest.mark.peer, pytest.mark.slow]

PEER = os.environ.get("AR_TEST_PEER_PYTHON")
SCRIPT = Path(__file__).with_name("intel_autoround.py")


def peer(*args, timeout=900):
    if not PEER:
        pytest.skip("AR_TEST_PEER_PYTHON is not set: no virtualenv with Intel's auto-round")
    r = subprocess.run([PEER, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def ids_file(smollm2_folder, tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(str(smollm2_folder))
    text = wikipedia_text()
    ids = tok(text[int(len(text) * 0.7) :], add_special_tokens=False)["input_ids"]
    rows = [ids[i * 32 : (i + 1) * 32] for i in range(4)]
    path = tmp_path_factory.mktemp("ids") / "ids.json"
    path.write_text(json.dumps(rows))
    return path


def our_logits(ckpt, ids_file):
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    assert isinstance(model.model.layers[0].mlp.down_proj, TorchQuantLinear)
    with torch.no_grad():
        return model(torch.tensor(json.loads(ids_file.read_text()))).logits


def assert_fp16_close(a, b):
    diff = (a.float() - b.float()).abs()
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    print(f"max |diff| {diff.max().item():.4f} mean {diff.mean().item():.4f} top-1 agreement {top1:.3f}")
    # Intel's CPU loader computes in float16; ours in float32: fp16 rounding over 30 layers
    assert diff.mean().item() < 0.1 and diff.max().item() < 1.0 and top1 >= 0.95


def test_intel_checkpoint_loads_through_ours(smollm2_folder, ids_file, tmp_path):
    ckpt = tmp_path / "intel-w4g64"
    peer(SCRIPT, "quantize", "--model", smollm2_folder, "--out", ckpt, "--bits", 4, "--group_size", 64,
         "--iters", 0, "--disable_opt_rtn")
    cfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "auto-round" and cfg["packing_format"] == "auto_round:auto_gptq"
    peer(SCRIPT, "logits", "--ckpt", ckpt, "--ids", ids_file, "--out", tmp_path / "intel.pt")
    theirs = torch.load(tmp_path / "intel.pt")
    assert "auto_round" in theirs["backend_info"]
    assert_fp16_close(our_logits(ckpt, ids_file), theirs["logits"])

    # with Intel's package installed next to ours, importing autoround routes loading through our kernels
    code = (
        "import json, sys, torch, autoround\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(ckpt)!r}, dtype=torch.float32)\n"
        "layer = m.model.layers[0].mlp.down_proj\n"
        "assert type(layer).__module__.startswith('autoround.'), type(layer)\n"
        f"ids = torch.tensor(json.load(open({str(ids_file)!r})))\n"
        f"torch.save(m(ids).logits.detach(), {str(tmp_path / 'ours-in-peer.pt')!r})\n"
    )
    peer("-c", code)
    assert torch.allclose(torch.load(tmp_path / "ours-in-peer.pt"), our_logits(ckpt, ids_file), atol=1e-4)


def test_our_checkpoint_loads_through_intel(smollm2_folder, ids_file, tmp_path):
    tok = AutoTokenizer.from_pretrained(str(smollm2_folder))
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_folder), dtype=torch.float32).eval()
    ar = AutoRound(model, tok, scheme="W4A16", group_size=64, iters=0, disable_opt_rtn=True)
    _, (out,) = ar.quantize_and_save(str(tmp_path / "ours-w4g64"), format="auto_round")
    peer(SCRIPT, "logits", "--ckpt", out, "--ids", ids_file, "--out", tmp_path / "intel.pt")
    theirs = torch.load(tmp_path / "intel.pt")
    assert "auto_round" in theirs["backend_info"]
    ours = our_logits(out, ids_file)
    assert_fp16_close(ours, theirs["logits"])
    with torch.no_grad():  # and ours equals the in-memory fake-quantized model
        fake = ar.model(torch.tensor(json.loads(ids_file.read_text()))).logits
    assert torch.allclose(ours, fake, atol=1e-3)


def test_plain_rtn_integers_equal_intels_bit_for_bit(smollm2_folder, tmp_path):
    """Plain RTN at W2A16 g64, where ties are most common on SmolLM2 (its weights lie on a 4-bit grid): every
    packed integer, zero and scale of ours equals those of Intel's default plain-RTN checkpoint (both round with
    the float32 scale and store its fp16 rounding)."""
    from safetensors.torch import load_file

    theirs_dir = tmp_path / "intel-w2g64"
    peer(SCRIPT, "quantize", "--model", smollm2_folder, "--out", theirs_dir, "--bits", 2, "--group_size", 64,
         "--iters", 0, "--disable_opt_rtn", "--route", "auto")  # Intel's default routing: its model-free RTN
    ar = AutoRound(str(smollm2_folder), scheme="W2A16", group_size=64, iters=0, disable_opt_rtn=True)
    _, (ours_dir,) = ar.quantize_and_save(str(tmp_path / "ours-w2g64"), format="auto_round")

    def packed(folder):
        tensors = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            tensors.update({k: v for k, v in load_file(f).items() if k.endswith((".qweight", ".qzeros", ".scales"))})
        return tensors

    ours, theirs = packed(ours_dir), packed(theirs_dir)
    assert ours.keys() == theirs.keys() and len(ours) == 3 * 210
    differing = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not differing, differing[:5]
