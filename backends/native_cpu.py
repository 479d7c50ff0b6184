"""``avx2``: this project's own CPU kernel for 2/3/4/8-bit weights, keeping them packed.

Why it exists: on this class of machine (x86 with AVX2, no AVX512) PyTorch's weight-only int4/int8 ops run
a scalar path (far slower than fp32 dense; docs/benchmarks.md) and auto-round-lib's ark kernel runs at about
dense-fp32 speed, while decoding is memory bound: reading 4-bit weights instead of fp32 ones is what makes it
faster.

Layout after ``post_init()`` (per output row, input channels padded to whole groups of a multiple of 32):
- 2/3/4-bit: one byte per two integers; in each block of 32 channels byte ``j`` holds channel ``j`` in its
  low nibble and channel ``j + 16`` in its high nibble (so AVX2 unpacks a block with two masks).
- 8-bit: one byte per integer.
- ``scale [out, groups]`` and ``zero_scale = zp * scale`` in fp32: ``y = sum_g scale*dot(x_g, q_g) -
  zero_scale * sum(x_g)``, which is ``x @ ((q - zp) * scale)^T`` exactly in real arithmetic.

Few rows (decode) run the fused GEMV-style C loop (OpenMP over output rows, up to 4 activation rows per
pass); many rows (prefill) dequantize the layer once into a temporary fp32 matrix in C and use torch's
GEMM, so prefill runs at dense speed.  Computes in fp32 whatever the activation dtype (inputs are cast
and the result cast back), which is also the right CPU compute dtype here.

The C source below is compiled once with the system C compiler (``cc -O3 -mavx2 -mfma -fopenmp``) into
``<AR_CACHE_DIR>/kernels/`` and loaded with ctypes; the OpenMP runtime resolves to the one torch already
loaded (same soname), so both share one thread pool.  No compiler or no AVX2 -> the kernel reports itself
unavailable and the selector says why.
"""

from __future__ import annotations

import ctypes
import hashlib
from importlib import resources
import os
import shutil
import subprocess
import tempfile
import threading

import torch
import torch.nn.functional as F

from .conversions import padded_group_layout
from .cpu_kernels import AwqLayout, _RepackingLinear


def _c_source() -> str:
    """The kernel's C source, shipped as package data beside this module."""
    return resources.files(__package__).joinpath("native_cpu.c").read_text(encoding="utf-8")


C_SOURCE = _c_source()

CFLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c11")
# at or above this many activation rows the layer is dequantized once and torch's GEMM runs it
MATMUL_MIN_ROWS = 16

_LIB: ctypes.CDLL | None = None
_LIB_ERROR: str | None = None
_LOCK = threading.Lock()


def compiler() -> str | None:
    return shutil.which("cc") or shutil.which("gcc")


def _host_reason() -> str | None:
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX2", "AVX512"):
        return f"needs an x86 CPU with AVX2 (torch reports {cap!r})"
    if compiler() is None:
        return "needs a C compiler (cc or gcc) to build the kernel once; install gcc"
    return None


def unavailable_reason() -> str | None:
    """Why this kernel cannot run here (no AVX2 CPU, no C compiler, a failed build); None when it can.

    Builds the library on first use (about a second, cached), so a failing build makes the selector fall
    back to the next kernel instead of failing the model load.
    """
    if _LIB is not None:
        return None
    reason = _LIB_ERROR or _host_reason()
    if reason:
        return reason
    try:
        load_library()
    except (RuntimeError, OSError) as exc:
        return _LIB_ERROR or str(exc)
    return None


def _cache_dir() -> str:
    from autoround import envs

    return os.path.join(envs.AR_CACHE_DIR, "kernels")


def load_library() -> ctypes.CDLL:
    """Build (once, cached by source hash) and load the C kernel."""
    global _LIB, _LIB_ERROR
    with _LOCK:
        if _LIB is not None:
            return _LIB
        reason = _LIB_ERROR or _host_reason()
        if reason:
            raise RuntimeError(f"avx2 kernel unavailable: {reason}")
        digest = hashlib.sha1((C_SOURCE + " ".join(CFLAGS)).encode()).hexdigest()[:16]
        folder = _cache_dir()
        path = os.path.join(folder, f"ar_native_cpu_{digest}.so")
        if not os.path.exists(path):
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as exc:
                _LIB_ERROR = f"cannot create the kernel cache folder {folder}: {exc} (set AR_CACHE_DIR)"
                raise RuntimeError(f"avx2 kernel unavailable: {_LIB_ERROR}") from exc
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                src = os.path.join(tmp, "kernel.c")
                with open(src, "w") as f:
                    f.write(C_SOURCE)
                out = os.path.join(tmp, "kernel.so")
                proc = subprocess.run([compiler(), *CFLAGS, src, "-o", out], capture_output=True, text=True)
                if proc.returncode != 0:
                    _LIB_ERROR = f"building the C kernel failed: {proc.stderr.strip()[-500:]}"
                    raise RuntimeError(f"avx2 kernel unavailable: {_LIB_ERROR}")
                os.replace(out, path)  # atomic: concurrent builders never see a half-written library
        try:
            lib = ctypes.CDLL(path)
        except OSError as exc:
            _LIB_ERROR = f"loading the built kernel {path} failed: {exc}"
            raise RuntimeError(f"avx2 kernel unavailable: {_LIB_ERROR}") from exc
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.ar_gemv.argtypes = [ptr] * 6 + [i64] * 6
        lib.ar_gemv.restype = None
        lib.ar_dequant.argtypes = [ptr] * 4 + [i64] * 5
        lib.ar_dequant.restype = None
        lib.ar_gemv_layer.argtypes = [ptr, ptr, ptr, i64, i64]
        lib.ar_gemv_layer.restype = ctypes.c_int
        _LIB = lib
        return lib


class _Layer(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("sc", ctypes.c_void_p), ("zs", ctypes.c_void_p), ("N", ctypes.c_int64),
                ("kp", ctypes.c_int64), ("gs", ctypes.c_int64), ("nibbles", ctypes.c_int64)]


class NativeCpuQuantLinear(_RepackingLinear):
    """2/3/4/8-bit weights through the ``avx2`` C kernel (fp32 compute, packed weights)."""

    kernel_name = "avx2"

    def _repack(self) -> None:
        self._lib = load_library()
        gs_pad, n_groups, k_pad = padded_group_layout(self.in_features, self.group_size, multiple=32)
        if gs_pad % 32:
            raise ValueError(f"avx2 kernel needs group sizes that are multiples of 32, got {self.group_size}")
        q, z, s = self._unpacked()
        q = F.pad(q, (0, k_pad - self.in_features)).to(torch.uint8)  # [out, k_pad]
        self.nibbles = self.bits <= 4
        if self.nibbles:
            blocks = q.view(self.out_features, k_pad // 32, 2, 16)
            q = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(self.out_features, k_pad // 2)
        self.k_pad, self.gs_pad, self.n_pad_groups = k_pad, gs_pad, n_groups
        self.register_buffer("packed_weight", q.contiguous())
        self.register_buffer("scale", s.contiguous())
        self.register_buffer("zero_scale", (z.float() * s).contiguous())
        self._bind()

    # the C kernel reads these as fp32: a cast of the model (``model.to(torch.bfloat16)``, ``.half()``) must not
    # reach them (it would make the kernel read 16-bit memory as fp32: garbage, and past the buffer's end)
    _FP32_BUFFERS = ("scale", "zero_scale")

    def _apply(self, fn, recurse=True):
        kept = {n: self._buffers[n] for n in self._FP32_BUFFERS if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for name, t in kept.items():
            device = self._buffers[name].device  # a device move still applies; a dtype cast does not
            self._buffers[name] = t if t.device == device else t.to(device)
        if getattr(self, "_packed", False):
            self._bind()
        return self

    def __getstate__(self):  # pickling, deepcopy: raw pointers and the loaded library do not travel
        state = self.__dict__.copy()
        for name in ("_layer", "_layer_addr", "_lib"):
            state.pop(name, None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if getattr(self, "_packed", False):
            self._lib = load_library()
            self._bind()

    def _bind(self) -> None:
        """Cache what each call needs (pointers, sizes, an fp32 bias) outside the module's buffer lookup; called
        after repacking and after every ``.to()``/cast, which may replace the buffers."""
        w, sc, zs = self._buffers["packed_weight"], self._buffers["scale"], self._buffers["zero_scale"]
        if any(t.device.type != "cpu" for t in (w, sc, zs)):
            self._layer = None  # forward() says why
            return
        self._layer = _Layer(w.data_ptr(), sc.data_ptr(), zs.data_ptr(), self.out_features, self.k_pad,
                             self.gs_pad, int(self.nibbles))
        self._layer_addr = ctypes.addressof(self._layer)
        bias = self._buffers.get("bias")
        self._bias32 = None if bias is None else bias.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_packed()
        if self._layer is None or x.device.type != "cpu":
            raise RuntimeError(f"{self.kernel_name} kernel runs on the CPU only (weights on "
                               f"{self.packed_weight.device}, input on {x.device}); load the model with "
                               "device_map='cpu', or with a backend for that device")
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32:
            x2 = x2.float()
        if self.k_pad != self.in_features:
            x2 = F.pad(x2, (0, self.k_pad - self.in_features))
        x2 = x2.contiguous()
        m = x2.shape[0]
        threads = torch.get_num_threads()
        if m >= MATMUL_MIN_ROWS:
            w = torch.empty(self.out_features, self.k_pad, dtype=torch.float32)
            L = self._layer
            self._lib.ar_dequant(L.w, L.sc, L.zs, w.data_ptr(), self.out_features, self.k_pad, self.gs_pad,
                                 L.nibbles, threads)
            y = F.linear(x2, w, self._bias32)
        else:
            y = torch.empty(m, self.out_features, dtype=torch.float32)
            if self._lib.ar_gemv_layer(self._layer_addr, x2.data_ptr(), y.data_ptr(), m, threads) != 0:
                raise MemoryError(f"{self.kernel_name} kernel: no memory for {m} x {self.n_pad_groups} group sums")
            if self._bias32 is not None:
                y += self._bias32
        y = y.view(*x.shape[:-1], self.out_features)
        return y if x.dtype == torch.float32 else y.to(x.dtype)


class NativeCpuAwqQuantLinear(AwqLayout, NativeCpuQuantLinear):
    kernel_name = "avx2_awq"
