"""Runs inside the gptqmodel virtualenv (AR_TEST_GPTQMODEL_PYTHON): loads a checkpoint with GPTQModel's
CPU torch kernels and saves its logits, or quantizes a float model with GPTQModel (GPTQ or AWQ) and saves it.

    python gptqmodel_peer.py logits  CKPT BACKEND IDS.pt OUT.pt [DTYPE]  # gptq_torch | awq_torch; float16
    python gptqmodel_peer.py quantize FLOAT_DIR METHOD OUT_DIR       # METHOD: gptq | awq (4-bit, group 32)
"""

import json
import os
import sys

import torch


def logits(ckpt, backend, ids_path, out_path, dtype="float16"):
    from gptqmodel import BACKEND, GPTQModel

    model = GPTQModel.load(ckpt, device="cpu", backend=BACKEND(backend), dtype=getattr(torch, dtype))
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    kernels = sorted({type(m).__name__ for m in model.model.modules() if isinstance(m, BaseQuantLinear)})
    ids = torch.load(ids_path)
    with torch.no_grad():
        out = model.model(input_ids=ids).logits.float()
    torch.save({"logits": out, "kernels": kernels, "dtype": str(next(model.model.parameters()).dtype)}, out_path)
    print(json.dumps({"kernels": kernels}))


def quantize(float_dir, method, out_dir):
    import gptqmodel
    from gptqmodel import GPTQModel, QuantizeConfig

    # GPTQModel 7.7 sizes its CPU pool as (cores + 1) // 2 but asks for 2 model-loader workers from it,
    # which fails on a 2-core machine: give the pool 2 workers
    gptqmodel._default_cpu_workers = lambda: 2
    from transformers import AutoTokenizer

    cfg = {"bits": 4, "group_size": 32, "sym": method == "gptq", "desc_act": False}
    if method == "awq":
        cfg.update(quant_method="awq", format="gemm")
    qcfg = QuantizeConfig(**cfg)
    model = GPTQModel.load(float_dir, quantize_config=qcfg, device="cpu")
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(0, 256, (64,), generator=g).tolist(),
              "attention_mask": [1] * 64} for _ in range(16)]
    os.chdir(os.path.dirname(os.path.abspath(out_dir)))  # GPTQModel writes a logs/ folder into the cwd
    model.quantize(calib, batch_size=4, tokenizer=AutoTokenizer.from_pretrained(float_dir))
    model.save(out_dir)
    print("saved", out_dir)


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"logits": logits, "quantize": quantize}[cmd](*args)
