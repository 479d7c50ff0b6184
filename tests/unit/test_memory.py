"""Host-memory helpers: giving a mapped file's pages back without losing the data."""

import sys

import pytest
import torch

from autoround.memory import peak_rss_bytes, release_pages


def _rss_file_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_PAGEOUT is Linux-only")
def test_release_pages_drops_a_mapped_tensors_pages_and_keeps_its_data(tmp_path):
    n = 8 * 2**20 // 4  # 8 MiB of float32
    path = tmp_path / "weights.bin"
    torch.arange(n, dtype=torch.float32).numpy().tofile(path)
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=n * 4)  # a private file mapping
    tensor = torch.tensor([], dtype=torch.float32).set_(storage)
    before = _rss_file_kib()
    total = tensor.sum().item()  # reading brings the pages in
    assert _rss_file_kib() - before > 6 * 1024
    resident = _rss_file_kib()
    assert release_pages(tensor)
    assert resident - _rss_file_kib() > 6 * 1024
    assert tensor.sum().item() == total  # read back from the file
    assert torch.equal(tensor[:5], torch.arange(5, dtype=torch.float32))


def test_release_pages_declines_what_it_cannot_release():
    assert not release_pages(torch.empty(0))
    assert not release_pages(torch.ones(3))  # smaller than a page: no whole page inside


def test_release_pages_leaves_anonymous_memory_alone():
    tensor = torch.ones(4 * 2**20 // 4)  # 4 MiB on the heap or an anonymous mapping
    assert not release_pages(tensor)
    assert tensor.sum().item() == tensor.numel()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux-only")
def test_peak_rss_of_a_subprocess_is_its_own_not_its_parents():
    """A worker spawned by a large process reports its own peak (the benchmarks spawn one per row); getrusage's
    ru_maxrss carries the parent's peak across exec and reported 0.70 GiB for a 0.43 GiB worker."""
    import subprocess

    big = torch.ones(768 * 2**20 // 4)  # 768 MiB, touched
    parent = peak_rss_bytes()
    assert parent > 768 * 2**20
    out = subprocess.run(
        [sys.executable, "-c", "from autoround.memory import peak_rss_bytes; print(peak_rss_bytes())"],
        capture_output=True, text=True, check=True,
    )
    child = int(out.stdout.strip().splitlines()[-1])
    del big
    assert 0 < child < parent - 512 * 2**20
