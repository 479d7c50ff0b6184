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


def transformers_greedy(ckpt, ids_file, dtype: str = "float32") -> list[list[int]]:
    """Greedy continuations through transformers with this project's loader (EOS ignored, one prompt at a time)."""
    key = (str(ckpt), Path(ids_file).read_text(), dtype)
    if key not in _GREEDY_CACHE:
        _GREEDY_CACHE[key] = _transformers_greedy(ckpt, ids_file, dtype)
    return [list(t) for t in _GREEDY_CACHE[key]]


def _transformers_greedy(ckpt, ids_file, dtype: str) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    import autoround  # noqa: F401  (registers the loader)
    from autoround import AutoRoundQuantizer

    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=getattr(torch, dtype)).eval()
    assert isinstance(model.hf_quantizer, AutoRoundQuantizer)
    model.generation_config.eos_token_id = None
    outs = []
    for p in json.loads(Path(ids_file).read_text()):
        x = torch.tensor([p])
        with torch.inference_mode():
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_TOKENS, do_sample=False,
                               pad_token_id=0)
        outs.append(y[0, x.shape[1]:].tolist())
    return outs


def assert_same_tokens(engine: list[list[int]], reference: list[list[int]], what: str) -> None:
    assert len(engine) == len(reference) == len(PROMPTS)
    for i, (a, b) in enumerate(zip(engine, reference)):
        assert len(a) == len(b) == MAX_TOKENS, (what, i, len(a), len(b))
        if a != b:
            first = next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)
            raise AssertionError(f"{what}: prompt {i} differs from transformers at token {first}:\n{a}\n{b}")
