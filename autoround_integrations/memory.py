"""Host-memory housekeeping shared by the quantizer and the kernels."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        lib = ctypes.CDLL(name)
        return lib if hasattr(lib, "malloc_trim") else None
    except OSError:
        return None


def release_host_memory() -> None:
    """Give freed heap memory back to the OS (glibc only; a no-op elsewhere).

    glibc raises its mmap threshold after large blocks are freed, so later large tensors come from its heap,
    and freed heap memory stays resident: without this a process's RSS keeps the high-water mark of every
    phase (each tuned block's autograd buffers, each layer's unpack temporaries) and creeps up as the heap
    fragments.  Called after each tuned block and once after a model's layers are repacked; it is cheap.
    """
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)
