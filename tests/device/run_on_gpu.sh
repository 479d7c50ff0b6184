#!/usr/bin/env bash
# The device check (a GPU machine with python3, torch+CUDA, triton and setuptools, offline): installs gptqmodel and
# what it imports that the machine lacks from wheels carried in .whl/ (built on the CPU machine: see
# tests/device/test_cuda_kernels.py), this project from the checkout, then runs the device tests.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target /tmp/site . || exit 1
export PYTHONPATH=/tmp/site:$PWD/tests/device/shims
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
python3 -c "import gptqmodel.nn_modules.qlinear.tritonv2 as m; print('gptqmodel import ok')" 2>&1 | tail -5
MAX_JOBS=16 timeout 500 python3 -m pytest -q -p no:cacheprovider -rs -v --timeout 300 tests/device "$@" 2>&1 | tee "${OUT:-/tmp}/device_tests.log"
