"""Host-memory helpers: giving a mapped file's pages back without losing the data."""

import os
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


# -- the memory a cgroup (a container's limit) leaves -----------------------------------------------------------

GiB, MiB = 2**30, 2**20


def _tree(root, files):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_cgroup_v1_headroom_is_the_hierarchical_limit_less_usage_with_inactive_cache_free(tmp_path):
    from autoround.memory import cgroup_headroom

    _tree(tmp_path, {
        "proc": "9:name=systemd:/\n4:memory:/jobs/run1\n0::/\n",
        "cg/memory/jobs/run1/memory.limit_in_bytes": str(4 * GiB),
        "cg/memory/jobs/run1/memory.usage_in_bytes": str(700 * MiB),
        # an ancestor's tighter limit shows as the hierarchical one
        "cg/memory/jobs/run1/memory.stat":
            f"cache 1\nhierarchical_memory_limit {GiB}\ntotal_inactive_file {100 * MiB}\n",
    })
    assert cgroup_headroom(str(tmp_path / "proc"), str(tmp_path / "cg")) == GiB - 600 * MiB
    (tmp_path / "cg/memory/jobs/run1/memory.stat").write_text("hierarchical_memory_limit 9223372036854771712\n")
    (tmp_path / "cg/memory/jobs/run1/memory.limit_in_bytes").write_text("9223372036854771712")
    assert cgroup_headroom(str(tmp_path / "proc"), str(tmp_path / "cg")) is None  # no limit


def test_cgroup_v2_headroom_takes_the_tightest_ancestor_and_a_container_sees_its_mount(tmp_path):
    from autoround.memory import cgroup_headroom

    _tree(tmp_path, {
        "proc": "0::/a/b\n",
        "cg/cgroup.controllers": "cpu memory\n",
        "cg/memory.max": "max",
        "cg/a/memory.max": str(2 * GiB),
        "cg/a/b/memory.max": "max",
        "cg/a/b/memory.current": str(1536 * MiB),
        "cg/a/b/memory.stat": f"anon {GiB}\ninactive_file {256 * MiB}\n",
    })
    assert cgroup_headroom(str(tmp_path / "proc"), str(tmp_path / "cg")) == 768 * MiB
    # inside a container /proc/self/cgroup names a path the container's mount does not show: the mount is the group
    _tree(tmp_path, {"proc2": "0::/kubepods/pod1/ctr\n", "c2/cgroup.controllers": "memory\n",
                     "c2/memory.max": str(GiB), "c2/memory.current": str(GiB // 4), "c2/memory.stat": ""})
    assert cgroup_headroom(str(tmp_path / "proc2"), str(tmp_path / "c2")) == 3 * GiB // 4
    assert cgroup_headroom(str(tmp_path / "missing"), str(tmp_path / "cg")) is None


def _writable_memory_cgroup():
    from pathlib import Path

    v1 = Path("/sys/fs/cgroup/memory")
    base = v1 if v1.is_dir() else Path("/sys/fs/cgroup")
    probe = base / f"ar-test-probe-{os.getpid()}"
    try:
        probe.mkdir()
    except OSError:
        return None
    probe.rmdir()
    return base


@pytest.mark.skipif(not sys.platform.startswith("linux") or _writable_memory_cgroup() is None,
                    reason="needs a writable memory cgroup (root on Linux)")
def test_a_process_in_a_limited_cgroup_sees_the_limit_and_offloads_its_activations(tmp_path):
    import subprocess

    base = _writable_memory_cgroup()
    group = base / f"ar-test-{os.getpid()}"
    group.mkdir()
    try:
        limit_file = "memory.limit_in_bytes" if base.name == "memory" else "memory.max"
        (group / limit_file).write_text(str(768 * MiB))
        code = (
            "import torch\n"
            "from autoround.memory import available_bytes\n"
            "from autoround.quantizer.activations import ActivationStore\n"
            "print(available_bytes())\n"
            "store = ActivationStore()\n"
            "store.empty((25, 1024, 1024), torch.float32, torch.device('cpu'))\n"  # 100 MiB: 4 copies > half
            "print(store.offload)\n"
            "store.close()\n"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "AR_WORK_SPACE": str(tmp_path)},
                              preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
        assert proc.returncode == 0, proc.stderr[-2000:]
        avail, offload = proc.stdout.split()
        assert int(avail) <= 768 * MiB
        assert offload == "True"  # on this machine's free memory alone it would have stayed in memory
    finally:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                import time

                time.sleep(0.1)
