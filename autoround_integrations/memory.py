"""Host-memory housekeeping shared by the quantizer and the kernels."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap

_MADV_PAGEOUT = 21  # Linux 5.4+: reclaim the range now; clean file pages are dropped, data is never lost


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    if not hasattr(lib, "malloc_trim"):
        return None
    lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return lib


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


def release_pages(tensor) -> bool:
    """Ask the kernel to reclaim the resident pages of a CPU tensor's memory that no longer needs to be resident.

    For a tensor mapped from a checkpoint file (transformers maps safetensors files), the pages that reading it
    brought in stay resident, and count in RSS, for as long as the file's mapping lives, which is as long as any
    tensor of that file is alive: replacing a weight with a new tensor does not release the old one's pages.
    ``MADV_PAGEOUT`` drops the clean file pages of the page-aligned range inside the tensor; the data stays
    valid (a later read faults it back in from the file) and anonymous memory is left alone where there is no
    swap.  Only file-backed ranges are released.  Returns whether the call was made and succeeded (False off
    Linux, on kernels before 5.4, for anonymous memory and non-CPU tensors).
    """
    lib = _libc()
    if lib is None or tensor.device.type != "cpu" or tensor.numel() == 0:
        return False
    page = mmap.PAGESIZE
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = (start + page - 1) // page * page, end // page * page
    if last <= first or not _file_backed(first, last):
        return False  # anonymous memory is freed with the tensor (paging it out would only write it to swap)
    return lib.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_PAGEOUT) == 0


def _file_backed(first: int, last: int) -> bool:
    """Whether ``[first, last)`` lies inside one mapping of a file (``/proc/self/maps``)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                if lo <= first < hi:
                    return last <= hi and parts[4] != "0" and len(parts) == 6 and parts[5].startswith("/")
    except OSError:
        return False
    return False


def peak_rss_bytes() -> int:
    """This process's peak resident memory: the kernel's high-water mark of its own address space (``VmHWM``).

    Not ``getrusage``'s ``ru_maxrss``: Linux carries that across exec from the spawning process (Python starts
    subprocesses with vfork), so a small worker started by a large parent reports the parent's peak."""
    peak = _proc_bytes("/proc/self/status", "VmHWM:")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def peak_rss_gib() -> float:
    """This process's peak resident memory so far, in GiB."""
    return peak_rss_bytes() / 2**30


def available_bytes() -> int | None:
    """Memory the kernel says can be had without swapping (``MemAvailable``), or None where it does not say."""
    return _proc_bytes("/proc/meminfo", "MemAvailable:")


def _proc_bytes(path: str, key: str) -> int | None:
    """The ``key`` line of a /proc file that counts in kB, in bytes (None when there is none)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
