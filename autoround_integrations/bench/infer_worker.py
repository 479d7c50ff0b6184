"""One inference measurement in its own process (run by ``autoround.bench.infer``; also run BY PATH with
Intel's interpreter, so it imports only torch and transformers unless told to load this project).

Usage: ``python infer_worker.py '{"path": ..., "loader": "dense"|"ours"|"intel", "backend": "auto", ...}'``.
Prints one JSON line: load seconds, prefill tokens/s, decode tokens/s, peak RSS (MiB), kernels used.
"""

from __future__ import annotations

import json
import resource
import sys
import time


def _peak_rss_kib() -> int:
    """The worker's own peak (``VmHWM``): ``ru_maxrss`` carries the spawning driver's peak across exec."""
    with open("/proc/self/status") as f:
        hwm = next((line for line in f if line.startswith("VmHWM:")), None)
    return int(hwm.split()[1]) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _kernels(model) -> dict:
    counts: dict = {}
    for m in model.modules():
        name = getattr(m, "kernel_name", None) or (type(m).__name__ if "QuantLinear" in type(m).__name__ else None)
        if name:
            counts[name] = counts.get(name, 0) + 1
    return counts


def _tensor_mib(model) -> float:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]
    return round(total / 2**20, 1)


def main(cfg: dict) -> dict:
    if cfg.get("extra_path"):
        sys.path.insert(0, cfg["extra_path"])  # e.g. a lent auto-round-lib (package and its metadata)
    import torch

    torch.manual_seed(0)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    if cfg["loader"] == "ours":
        import autoround  # noqa: F401  (registers this project's loader with transformers)
        from autoround import AutoRoundConfig
    elif cfg["loader"] == "intel":
        from transformers import AutoRoundConfig  # backed by Intel's auto_round package
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": cfg.get("dtype", "auto")}
    if cfg["loader"] in ("ours", "intel"):
        kwargs["quantization_config"] = AutoRoundConfig(backend=cfg.get("backend", "auto"))
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(cfg["path"], **kwargs).eval()
    load_s = time.perf_counter() - t0
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))  # again: a loader may have changed it (Intel's does)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(100, vocab - 100, (1, cfg["prompt_len"]), generator=gen)
    with torch.inference_mode():
        model(prompt[:, :16])  # warm-up (first-call allocations, kernel builds)
        best_prefill = float("inf")
        for _ in range(cfg.get("prefill_repeats", 2)):
            t = time.perf_counter()
            out = model(prompt, use_cache=True, logits_to_keep=1)
            best_prefill = min(best_prefill, time.perf_counter() - t)
        past = out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)
        steps = []
        for _ in range(cfg["new_tokens"]):
            t = time.perf_counter()
            out = model(tok, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tok = out.logits[:, -1:].argmax(-1)
            steps.append(time.perf_counter() - t)
        decode_s = sum(steps)
        median_step = sorted(steps)[len(steps) // 2]
    return {
        "load_s": round(load_s, 2),
        "prefill_tok_s": round(cfg["prompt_len"] / best_prefill, 1),
        "decode_tok_s": round(cfg["new_tokens"] / decode_s, 2),
        # a shared machine's load spikes hit the mean; the median step shows the kernel's typical speed
        "decode_median_tok_s": round(1 / median_step, 2),
        "peak_rss_mib": round(_peak_rss_kib() / 1024, 1),
        "model_mib": _tensor_mib(model),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "kernels": _kernels(model),
        "threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    result = main(json.loads(sys.argv[1]))
    print("RESULT " + json.dumps(result), flush=True)
