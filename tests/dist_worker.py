"""Run by torchrun from tests/unit/test_distributed.py: one AutoRound run per rank, with an optional fault (rank 1
exits in the middle of its run, as a crashed or killed process would)."""

import json
import os
import sys

import torch


def main() -> int:
    cfg = json.loads(sys.argv[1])
    from autoround import AutoRound
    from autoround.quantizer import blockwise

    if cfg.get("die_after_blocks") is not None and os.environ.get("RANK") == "1":
        real, calls = blockwise.tune_block, [0]

        def dying(*args, **kwargs):
            calls[0] += 1
            if calls[0] > cfg["die_after_blocks"]:
                os._exit(3)
            return real(*args, **kwargs)

        blockwise.tune_block = dying
    calib = [torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(i)) for i in range(cfg["nsamples"])]
    ar = AutoRound(cfg["model"], dataset=calib, nsamples=cfg["nsamples"], seqlen=32, **cfg["kw"])
    ar.quantize_and_save(cfg["out"], format=cfg["format"], resume=cfg.get("resume", False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
