"""Helpers of the engine tests (tests/engines): run an engine's interpreter on engine_runner.py, the
transformers reference (our loader), token comparison."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

RUNNER = Path(__file__).parent / "engines" / "engine_runner.py"
PEER_SCRIPT = Path(__file__).parent / "peer" / "intel_autoround.py"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
]
MAX_TOKENS = 32


def engine_python(var: str) -> str:
    path = os.environ.get(var)
    if not path:
        pytest.skip(f"{var} is not set (the engine's virtualenv, built by .ci/run)")
    if not os.path.exists(path):
        pytest.skip(f"{var}={path} does not exist")
    return path


def run_engine(python: str, *args, timeout: int = 1500, check: bool = True,
               env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the engine imports autoround from its own virtualenv
    env.update(env_extra or {})  # e.g. the SGLang tests' sgl_kernel shim on PYTHONPATH
    proc = subprocess.run(
        [python, str(RUNNER), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env,
        cwd=str(RUNNER.parent),
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"engine run failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def copy_checkpoint(ckpt, tmp_path, name):
    """A copy of a checkpoint folder, to break on purpose."""
    import shutil

    dst = tmp_path / name
    shutil.copytree(ckpt, dst)
    return dst


def rewrite_tensors(folder, change):
    """Load the folder's model.safetensors, let ``change`` edit the dict, save it back."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def check_openai_server(cmd: list[str], env: dict, log_path: Path, ckpt, ids_file) -> None:
    """Start an engine's OpenAI-compatible server (``cmd`` must serve ``ckpt`` as "smollm2-w4a16" on
    ``--port PORT``, PORT a placeholder), wait for /health, and check that /v1/completions continues the first
    prompt greedily with the 8 tokens transformers gives.  The server runs in its own process group and is
    stopped as one, engine worker processes included."""
    import signal
    import time
    import urllib.request

    port = free_port()
    cmd = [str(port) if a == "PORT" else a for a in cmd]
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.time() + 900
            while True:
                if server.poll() is not None:
                    raise AssertionError("server exited:\n" + Path(log_path).read_text()[-6000:])
                try:
                    with urllib.request.urlopen(base + "/health", timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.time() > deadline:
                    raise AssertionError("server not ready:\n" + Path(log_path).read_text()[-6000:])
                time.sleep(3)
            ids = json.loads(Path(ids_file).read_text())[0]
            body = {"model": "smollm2-w4a16", "prompt": ids, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
            req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=600) as r:
                answer = json.loads(r.read())
            text = answer["choices"][0]["text"]
            assert answer["usage"]["completion_tokens"] == 8
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(ckpt))
            expected = tok.decode(transformers_greedy(ckpt, ids_file)[0][:8])
            assert text == expected, (text, expected)
        finally:
            try:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_GREEDY_CACHE: dict = {}


def transformers_greedy(ckpt, ids_file, dtype: str = "float32", ours: bool = True) -> list[list[int]]:
    """Greedy continuations through transformers with this project's loader (EOS ignored, one prompt at a time);
    ``ours=False``: a float checkpoint through plain transformers."""
    key = (str(ckpt), Path(ids_file).read_text(), dtype, ours)
    if key not in _GREEDY_CACHE:
        _GREEDY_CACHE[key] = _transformers_greedy(ckpt, ids_file, dtype, ours)
    return [list(t) for t in _GREEDY_CACHE[key]]


def _load_ours(ckpt, dtype: str = "float32"):
    """The checkpoint through transformers with this project's loader."""
    import torch
    from transformers import AutoModelForCausalLM

    import autoround  # noqa: F401  (registers the loader)
    from autoround import AutoRoundQuantizer

    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=getattr(torch, dtype)).eval()
    assert isinstance(model.hf_quantizer, AutoRoundQuantizer)
    return model


def _transformers_greedy(ckpt, ids_file, dtype: str, ours: bool) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    if ours:
        model = _load_ours(ckpt, dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=getattr(torch, dtype)).eval()
    model.generation_config.eos_token_id = None
    outs = []
    for p in json.loads(Path(ids_file).read_text()):
        x = torch.tensor([p])
        with torch.inference_mode():
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_TOKENS, do_sample=False,
                               pad_token_id=0)
        outs.append(y[0, x.shape[1]:].tolist())
    return outs


def assert_sensible_half_output(ckpt, ids_file, tokens: list[list[int]], what: str, model=None,
                                min_agreement: float = 0.9) -> None:
    """A 16-bit engine's greedy continuations, teacher-forced through transformers in fp32 (our loader): at each
    position the engine picked the argmax of its own 16-bit logits, so the fp32 model must mostly agree and,
    where it does not, rank the engine's token close to its best.  Unlike comparing whole continuations, one
    near-tie flipped by 16-bit rounding changes one position here, not every later one; a broken kernel or
    packing gives text the fp32 model almost never ranks first."""
    import torch

    model = model if model is not None else _fp32_model(ckpt)  # or a given fp32 model (e.g. our fake-quantized one)
    agree = total = 0
    worst = 0.0
    for prompt, cont in zip(json.loads(Path(ids_file).read_text()), tokens):
        assert len(cont) == MAX_TOKENS, (what, len(cont))
        x = torch.tensor([prompt + cont])
        with torch.inference_mode():
            logits = model(x).logits[0, len(prompt) - 1:-1].float()
        chosen = logits[torch.arange(len(cont)), torch.tensor(cont)]
        gap = logits.max(-1).values - chosen
        agree += int((gap == 0).sum())
        total += len(cont)
        worst = max(worst, float(gap.max()))
    rate = agree / total
    print(f"{what}: fp32 top-1 agreement {rate:.3f}, largest logit gap {worst:.3f}")
    assert rate >= min_agreement and worst < 1.0, f"{what}: fp32 top-1 agreement {rate:.3f}, largest logit gap {worst:.3f}"


_MODEL_CACHE: dict = {}


def _fp32_model(ckpt):
    if str(ckpt) not in _MODEL_CACHE:
        _MODEL_CACHE.clear()  # one model at a time
        _MODEL_CACHE[str(ckpt)] = _load_ours(ckpt)
    return _MODEL_CACHE[str(ckpt)]


def assert_same_tokens(engine: list[list[int]], reference: list[list[int]], what: str) -> None:
    assert len(engine) == len(reference) == len(PROMPTS)
    for i, (a, b) in enumerate(zip(engine, reference)):
        assert len(a) == len(b) == MAX_TOKENS, (what, i, len(a), len(b))
        if a != b:
            first = next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)
            raise AssertionError(f"{what}: prompt {i} differs from transformers at token {first}:\n{a}\n{b}")


def tiny_checkpoint_with_quantized_lm_head(folder):
    """A tiny Llama (random weights, untied head) with every block linear W4 g32 and a W4 g32 lm_head."""
    import torch
    from safetensors.torch import load_file, save_file

    from arhelpers import tiny_llama
    from autoround import AutoRound
    from autoround.quantizer.formats import QuantizedLayer
    from autoround.quantizer.formats.auto_round import AutoRoundFormat
    from autoround.quantizer.qmath import quantize_weight
    from autoround.quantizer.schemes import QuantScheme

    model = tiny_llama(hidden=256, inter=512, layers=2, vocab=512, seed=3)
    head = model.lm_head.weight.detach().clone()
    AutoRound(model, scheme="W4A16", group_size=32, iters=0, disable_opt_rtn=True).quantize_and_save(
        str(folder), format="auto_round")
    scheme = QuantScheme(4, 32, True)
    layer = QuantizedLayer("lm_head", scheme, quantize_weight(head, 4, 32, True), None, 256, 512)
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["lm_head.weight"]
    for key, val in AutoRoundFormat().layer_tensors(layer, "auto_round:auto_gptq").items():
        tensors[f"lm_head.{key}"] = val
    save_file(tensors, str(path), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"].setdefault("extra_config", {})["lm_head"] = {"bits": 4, "group_size": 32, "sym": True}
    (folder / "config.json").write_text(json.dumps(cfg))
    assert torch.equal(tensors["lm_head.scales"].float(), layer.weight.scale.t().half().float())
    return folder


def tiny_prompt_ids(tmp_path) -> Path:
    """Four prompts of token ids for the tiny checkpoints (vocabulary 512), as a JSON file."""
    ids = Path(tmp_path) / "ids.json"
    ids.write_text(json.dumps([[1, 17, 300, 42, 7], [1, 5, 6, 7, 8, 9, 10], [1, 400], [1, 256, 128, 64]]))
    return ids


def autoscheme_bits(ckpt):
    """(default bits, layer name -> bits of the layers in extra_config) of a mixed-bit auto_round checkpoint."""
    qcfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    extra = qcfg.get("extra_config", {})
    return qcfg["bits"], {k: v.get("bits", qcfg["bits"]) for k, v in extra.items()}
