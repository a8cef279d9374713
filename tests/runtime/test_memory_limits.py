"""The memory a session may count on: the host's MemAvailable, bounded by the process's memory cgroup (a
container's limit), v1 and v2, read from fake /proc/self/cgroup and /sys/fs/cgroup trees."""

from neoxrt.runtime.ort_session import cgroup_memory_left


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v1_tightest_limit_on_the_path(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("12:cpu,cpuacct:/a/b\n9:memory:/a/b\n0::/\n")
    root = tmp_path / "sys"
    _write(root / "memory/a/b/memory.limit_in_bytes", str(8 << 30))
    _write(root / "memory/a/b/memory.usage_in_bytes", str(1 << 30))
    _write(root / "memory/a/memory.limit_in_bytes", str(4 << 30))  # the parent is tighter
    _write(root / "memory/a/memory.usage_in_bytes", str(3 << 30))
    _write(root / "memory/memory.limit_in_bytes", str(9223372036854771712))  # no limit at the root
    assert cgroup_memory_left(proc, root) == 1 << 30


def test_cgroup_v2_max_means_no_limit(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/pod/ctr\n")
    root = tmp_path / "sys"
    _write(root / "pod/ctr/memory.max", "max\n")
    _write(root / "pod/ctr/memory.current", "100\n")
    assert cgroup_memory_left(proc, root) is None
    _write(root / "pod/memory.max", str(3 << 30))
    _write(root / "pod/memory.current", str(1 << 30))
    assert cgroup_memory_left(proc, root) == 2 << 30


def test_no_cgroup_file_is_no_limit(tmp_path):
    assert cgroup_memory_left(tmp_path / "absent", tmp_path) is None
