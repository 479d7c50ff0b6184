"""Host-memory housekeeping shared by the quantizer and the kernels."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
from pathlib import Path

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
    """Memory that can be had without swapping: the kernel's ``MemAvailable``, or less where this process's memory
    cgroup (a container's limit) leaves less (``cgroup_headroom``); None where neither says."""
    avail, room = _proc_bytes("/proc/meminfo", "MemAvailable:"), cgroup_headroom()
    if avail is None or room is None:
        return avail if room is None else room
    return min(avail, room)


_NO_LIMIT = 2**60  # cgroup v1 writes "no limit" as a number near 2**63


def cgroup_headroom(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """What this process's memory cgroup still allows: its limit (the tightest of its ancestors') less what the
    group holds, counting its inactive file cache as free (the kernel drops that first); None without a limit.
    Reads cgroup v1 (the ``memory`` controller's hierarchy) or v2 (the unified one)."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    entries = [line.split(":", 2) for line in lines if line.count(":") >= 2]
    v1 = [path for _, ctl, path in entries if "memory" in ctl.split(",")]
    if v1:
        folder = _cgroup_folder(Path(root) / "memory", v1[0])
        if folder is None:
            return None
        stat = _stat(folder / "memory.stat")
        limit = stat.get("hierarchical_memory_limit", _int(folder / "memory.limit_in_bytes"))
        used, cache = _int(folder / "memory.usage_in_bytes"), stat.get("total_inactive_file", 0)
    else:
        v2 = [path for hid, ctl, path in entries if hid == "0" and ctl == ""]
        folder = _cgroup_folder(Path(root), v2[0]) if v2 and (Path(root) / "cgroup.controllers").exists() else None
        if folder is None:
            return None
        limits, level = [], folder
        while True:  # memory.max of the group and of every ancestor up to the mount
            limits.append(_int(level / "memory.max"))
            if level == Path(root) or level.parent == level:
                break
            level = level.parent
        known = [x for x in limits if x is not None]
        limit = min(known) if known else None
        used, cache = _int(folder / "memory.current"), _stat(folder / "memory.stat").get("inactive_file", 0)
    if limit is None or limit >= _NO_LIMIT or used is None:
        return None
    return max(0, limit - used + cache)


def _cgroup_folder(mount: Path, path: str) -> Path | None:
    """The group's folder under ``mount``; inside a container the group is the mount itself."""
    for folder in (mount / path.lstrip("/"), mount):
        if folder.is_dir():
            return folder
    return None


def _int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text == "max" or not text.isdigit() else int(text)


def _stat(path: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines()) if v.isdigit()}
    except (OSError, ValueError):
        return {}


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
