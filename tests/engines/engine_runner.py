#!/usr/bin/env python
"""Runs a real inference engine on a checkpoint, in the engine's own virtualenv (a subprocess of the tests).

    python engine_runner.py vllm-generate   --model DIR --ids IDS.json --out OUT.json [--dtype float32]
    python engine_runner.py sglang-generate --model DIR --ids IDS.json --out OUT.json [--dtype float32]
    python engine_runner.py vllm-load       --model DIR [--dtype float32]
    python engine_runner.py sglang-config   --model DIR --prefixes P1,P2,... --out OUT.json
    python engine_runner.py sglang-layers   --model DIR --layer N --inputs IN.safetensors --out OUT.safetensors

``*-generate`` writes ``{"tokens": [[...], ...], "texts": [...], "quant_method": str, "kernels": {...}}``:
greedy continuations (32 tokens, EOS ignored) of the given prompt token ids.  ``vllm-load`` only builds the
engine (for bad-checkpoint tests: the error is in the output and the exit status is non-zero).
``sglang-config`` resolves the checkpoint's quantization through SGLang's own ModelConfig and loader
(``get_quant_config``) and writes the method's per-layer plans; ``sglang-layers`` builds block ``N``'s
qkv/o/gate_up/down layers as SGLang's model classes do (real SGLang linear layers and parameter classes, one
rank), loads the checkpoint tensors through each parameter's ``weight_loader`` with SGLang's shard ids, runs
them on the inputs ``x_hidden``/``x_attn``/``x_inter`` and writes the outputs (and a ``.json`` report beside).
Nothing here imports the test suite; the engine finds this project through its plugin entry points.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # lets apply_model() inspect the model


def _vllm(args):
    from vllm import LLM

    return LLM(
        model=args.model,
        dtype=args.dtype,
        max_model_len=256,
        enforce_eager=True,
        seed=0,
        max_num_seqs=8,
        skip_tokenizer_init=args.skip_tokenizer,
    )


def _vllm_kernels(llm) -> tuple[str, dict]:
    """Quantization method and kernel counts, read from the engine's model when it lives in this process."""
    from autoround.vllm_integration import layer_report  # importable in the workers, unlike this script

    method = str(llm.llm_engine.vllm_config.model_config.quantization)
    kernels = llm.apply_model(layer_report)[0]
    return method, kernels


def vllm_generate(args) -> int:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    ids = json.load(open(args.ids))
    t0 = time.time()
    llm = _vllm(args)
    t_load = time.time() - t0
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    t1 = time.time()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], params, use_tqdm=False)
    t_gen = time.time() - t1
    method, kernels = _vllm_kernels(llm)
    result = {
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        "texts": [o.outputs[0].text for o in outs],
        "quant_method": method,
        "kernels": kernels,
        "load_s": t_load,
        "generate_s": t_gen,
    }
    json.dump(result, open(args.out, "w"))
    print(f"engine_runner: quant_method={method} load {t_load:.1f}s generate {t_gen:.1f}s", flush=True)
    return 0


def vllm_load(args) -> int:
    _vllm(args)
    print("engine_runner: loaded", flush=True)
    return 0


# SGLang's CPU engine on a small KV cache: SGLANG_USE_CPU_ENGINE=1 and these options (the tests' shim for
# sgl_kernel records any kernel call; with these options none is made).  Shared with the HTTP server test.
SGLANG_CPU_OPTIONS = {
    "device": "cpu",
    "attention_backend": "torch_native",
    "sampling_backend": "pytorch",
    "disable_cuda_graph": True,
    "context_length": 256,
    "max_total_tokens": 2048,
    "max_running_requests": 8,
    "mem_fraction_static": 0.5,
    "random_seed": 0,
}


def sglang_generate(args) -> int:
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")  # SGLang's CPU (Intel Xeon) engine
    # the scheduler process inherits this: our method logs each layer's scheme and kernel to stderr
    os.environ.setdefault("AR_LOG_LEVEL", "DEBUG")
    import sglang as sgl

    ids = json.load(open(args.ids))
    t0 = time.time()
    engine = sgl.Engine(model_path=args.model, dtype=args.dtype, log_level="error",
                        skip_tokenizer_init=args.skip_tokenizer, **SGLANG_CPU_OPTIONS)
    try:
        t_load = time.time() - t0
        params = {"temperature": 0.0, "max_new_tokens": args.max_tokens, "ignore_eos": True}
        t1 = time.time()
        outs = engine.generate(input_ids=ids, sampling_params=params)
        t_gen = time.time() - t1
        # the method SGLang resolved from the checkpoint (server_args.quantization stays None when not given)
        method = str(engine.tokenizer_manager.model_config.quantization)
    finally:
        engine.shutdown()
    result = {
        "tokens": [list(o["output_ids"]) for o in outs],
        "texts": [o.get("text") for o in outs],
        "quant_method": method,
        "kernels": {},  # the model lives in SGLang's scheduler process: its layers log their kernels to stderr
        "load_s": t_load,
        "generate_s": t_gen,
    }
    json.dump(result, open(args.out, "w"))
    print(f"engine_runner: quant_method={method} load {t_load:.1f}s generate {t_gen:.1f}s", flush=True)
    return 0


# --- SGLang layers without an engine (its CPU engine needs the CPU build of sgl-kernel) -------------------
def _sglang_quant_config(model: str, layers: bool = False):
    """SGLang's own path from a checkpoint folder to its quantization config object (plugins loaded).

    SGLang's CPU-engine mode (SGLANG_USE_CPU_ENGINE=1) imports the CPU build of sgl-kernel as soon as its
    embedding layers are imported; without that package the layers are used in SGLang's generic mode."""
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "0")
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_loader.weight_utils import get_quant_config
    from sglang.srt.plugins import load_plugins
    from sglang.srt.runtime_context import SpawnRanks, publish
    from sglang.srt.server_args import ServerArgs

    load_plugins()  # what every SGLang process does first: runs this project's entry point
    server_args = ServerArgs(model_path=model, device="cpu", tp_size=1, dtype="float32")
    publish(server_args, role="scheduler", ranks=SpawnRanks(world_rank=0))  # one rank, no process group
    if layers:  # a real single-rank process group (gloo on loopback), as SGLang's model runner builds one
        import socket

        from sglang.srt.distributed.parallel_state import init_distributed_environment, initialize_model_parallel

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        init_distributed_environment(backend="gloo", world_size=1, rank=0, local_rank=0,
                                     distributed_init_method=f"tcp://127.0.0.1:{port}")
        initialize_model_parallel()
    model_config = ModelConfig.from_server_args(server_args)
    mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    quant_config = get_quant_config(model_config, LoadConfig(), mapping)
    return model_config, quant_config


def sglang_config(args) -> int:
    from sglang.srt.layers.quantization import get_quantization_config

    model_config, qc = _sglang_quant_config(args.model)
    plans = {}
    for prefix in args.prefixes.split(","):
        try:
            plan = qc.planner.plan(prefix, qc.packed_modules_mapping)
            plans[prefix] = {"scheme": plan.scheme.describe(), "quantized": plan.quantized, "parts": list(plan.parts)}
        except Exception as exc:  # reported, the test decides
            plans[prefix] = {"error": f"{type(exc).__name__}: {exc}"}
    result = {
        "registry": get_quantization_config("auto-round").__name__,
        "quantization": model_config.quantization,
        "config_class": type(qc).__name__,
        "config": repr(qc),
        "packing_format": qc.ckpt.packing_format,
        "plans": plans,
    }
    json.dump(result, open(args.out, "w"))
    print("engine_runner: " + json.dumps(result)[:300], flush=True)
    return 0


def sglang_layers(args) -> int:
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from sglang.srt.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear

    model_config, qc = _sglang_quant_config(args.model, layers=True)
    hf = model_config.hf_config
    hidden, inter = hf.hidden_size, hf.intermediate_size
    heads, kv_heads = hf.num_attention_heads, hf.num_key_value_heads
    head_dim = getattr(hf, "head_dim", None) or hidden // heads
    p = f"model.layers.{args.layer}"
    dtype = torch.float32
    layers = {
        "qkv_proj": QKVParallelLinear(hidden, head_dim, heads, kv_heads, bias=False, params_dtype=dtype,
                                      quant_config=qc, prefix=f"{p}.self_attn.qkv_proj"),
        "o_proj": RowParallelLinear(heads * head_dim, hidden, bias=False, params_dtype=dtype, quant_config=qc,
                                    prefix=f"{p}.self_attn.o_proj"),
        "gate_up_proj": MergedColumnParallelLinear(hidden, [inter, inter], bias=False, params_dtype=dtype,
                                                   quant_config=qc, prefix=f"{p}.mlp.gate_up_proj"),
        "down_proj": RowParallelLinear(inter, hidden, bias=False, params_dtype=dtype, quant_config=qc,
                                       prefix=f"{p}.mlp.down_proj"),
    }
    # checkpoint name -> (SGLang layer, shard id), as SGLang's Llama loader maps them (stacked_params_mapping)
    route = {
        "self_attn.q_proj": ("qkv_proj", "q"), "self_attn.k_proj": ("qkv_proj", "k"),
        "self_attn.v_proj": ("qkv_proj", "v"), "self_attn.o_proj": ("o_proj", None),
        "mlp.gate_proj": ("gate_up_proj", 0), "mlp.up_proj": ("gate_up_proj", 1), "mlp.down_proj": ("down_proj", None),
    }
    files = sorted(__import__("pathlib").Path(args.model).glob("*.safetensors"))
    params = {name: dict(layer.named_parameters()) for name, layer in layers.items()}
    loaded = []
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                if not key.startswith(p + "."):
                    continue
                sub, _, tensor = key[len(p) + 1:].rpartition(".")
                if sub not in route:
                    continue
                target, shard = route[sub]
                param = params[target].get(tensor)
                if param is None:
                    continue  # as SGLang's loader: names the model does not have are skipped
                loader = param.weight_loader
                value = handle.get_tensor(key)
                loader(param, value) if shard is None else loader(param, value, shard)
                loaded.append(key)
    report = {"loaded": loaded, "methods": {}, "params": {}, "kernels": {}}
    for name, layer in layers.items():
        report["methods"][name] = type(layer.quant_method).__name__
        report["params"][name] = {n: type(v).__name__ for n, v in layer.named_parameters()}
        layer.quant_method.process_weights_after_loading(layer)
        report["kernels"][name] = getattr(layer, "_ar_kernel_name", None)
    x = load_file(args.inputs)
    out = {}
    with torch.inference_mode():
        out["qkv_proj"] = layers["qkv_proj"](x["x_hidden"])[0]
        out["gate_up_proj"] = layers["gate_up_proj"](x["x_hidden"])[0]
        out["o_proj"] = layers["o_proj"](x["x_attn"])[0]
        out["down_proj"] = layers["down_proj"](x["x_inter"])[0]
    save_file({k: v.contiguous() for k, v in out.items()}, args.out)
    json.dump(report, open(args.out + ".json", "w"))
    print("engine_runner: " + json.dumps(report["kernels"]), flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["vllm-generate", "vllm-load", "sglang-generate", "sglang-config", "sglang-layers"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--ids")
    ap.add_argument("--out")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max_tokens", type=int, default=32)
    ap.add_argument("--skip_tokenizer", action="store_true", help="checkpoint without a tokenizer (token ids only)")
    ap.add_argument("--prefixes", default="")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--inputs")
    args = ap.parse_args(argv)
    commands = {"vllm-generate": vllm_generate, "vllm-load": vllm_load, "sglang-generate": sglang_generate,
                "sglang-config": sglang_config, "sglang-layers": sglang_layers}
    return commands[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
