"""Run by the llama-cpp-python virtualenv (AR_TEST_LLAMACPP_PYTHON): llama.cpp's own quantizer.

    python llamacpp_quantize.py IN.gguf OUT.gguf FTYPE     (FTYPE e.g. Q4_K_M, Q3_K_S, Q4_0)

Runs llama_model_quantize without an importance matrix, i.e. llama.cpp's reference block quantizers and
its per-tensor type rules for the file type.
"""

import ctypes
import sys

import llama_cpp


def main(src: str, dst: str, ftype: str) -> None:
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed with {rc}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
