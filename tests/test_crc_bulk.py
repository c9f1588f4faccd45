"""The bulk CRC32C (awscrt on CPUs with AVX-512 folding, else the crc32c package; chosen on the first large buffer)
is the same function under either implementation, on every buffer the format layer hands it, and asking for awscrt
where it cannot be imported gives the crc32c package."""

from __future__ import annotations

import mmap
import os
import platform
import subprocess
import sys

import crc32c as crc32c_package
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardckpt.errors import InvalidArgumentError
from shardckpt.format import coding

SIZES = [0, 1, 7, 4096, coding.BULK_MIN - 1, coding.BULK_MIN, coding.BULK_MIN + 1, 3 << 20]


@pytest.fixture(params=coding.BULK_IMPLEMENTATIONS)
def implementation(request):
    """The test runs under each bulk implementation (awscrt is a core dependency, so both load here); the CPU's own
    choice is restored after."""
    was = coding.load_bulk_crc()
    assert coding.load_bulk_crc(request.param) == request.param
    yield request.param
    coding.load_bulk_crc(was)


def _wide_cpu() -> bool:
    """This machine's CPU as the rule sees it, read here independently of `coding`."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            line = next((x for x in f if x.split(b":")[0].strip() == b"flags"), b"")
    except OSError:
        return False
    flags = line.partition(b":")[2].split()
    return platform.machine() == "x86_64" and b"avx512f" in flags and b"vpclmulqdq" in flags


@pytest.mark.usefixtures("implementation")
def test_the_cpu_decides_which_implementation_takes_bulk_work() -> None:
    # awscrt only where it runs its AVX-512 folding: elsewhere it is slower than the crc32c package (half its speed
    # on buffers from memory on an AVX2 host); the choice follows the first "flags" line of /proc/cpuinfo.
    coding._bulk = None  # as in a new process
    assert coding.load_bulk_crc() == ("awscrt" if _wide_cpu() else "crc32c")


def test_without_proc_cpuinfo_the_crc32c_package_is_chosen(monkeypatch) -> None:
    real_open = open

    def no_cpuinfo(path, *args, **kwargs):
        if path == "/proc/cpuinfo":
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_cpuinfo)
    assert coding._cpu_prefers_awscrt() is False


def test_the_cpu_rule() -> None:
    avx512 = [b"processor\t: 0\n", b"flags\t\t: fpu sse4_2 avx2 avx512f avx512vl vpclmulqdq pclmulqdq\n",
              b"flags\t\t: fpu\n"]
    avx2 = [b"processor\t: 0\n", b"flags\t\t: fpu sse4_2 pclmulqdq avx2 vpclmulqdq\n"]
    no_wide_clmul = [b"flags\t\t: fpu sse4_2 pclmulqdq avx2 avx512f avx512vl\n"]
    assert coding.wide_clmul("x86_64", avx512)
    assert coding.wide_clmul("AMD64", avx512)
    assert not coding.wide_clmul("x86_64", avx2)
    assert not coding.wide_clmul("x86_64", no_wide_clmul)
    assert not coding.wide_clmul("x86_64", [b"processor\t: 0\n"])  # no flags line: the safe default
    assert not coding.wide_clmul("x86_64", [b"flagsx\t: avx512f vpclmulqdq\n"])  # another field's name
    assert not coding.wide_clmul("aarch64", [b"Features\t: fp asimd crc32 pmull\n"])
    assert not coding.wide_clmul("aarch64", avx512)


def test_an_unknown_implementation_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="zlib"):
        coding.load_bulk_crc("zlib")


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("value", [0, 1, 0xE3069283, 0xFFFFFFFF])
@pytest.mark.usefixtures("implementation")
def test_bulk_matches_the_crc32c_package(size: int, value: int) -> None:
    data = os.urandom(size)
    want = crc32c_package.crc32c(data, value)
    assert coding.crc32c_bulk(data, value) == want
    assert coding.crc32c_bulk(bytearray(data), value) == want
    assert coding.crc32c_bulk(memoryview(data), value) == want
    assert coding.crc32c(data, value) == want


@pytest.mark.usefixtures("implementation")
def test_the_check_value_and_chaining_across_the_threshold() -> None:
    assert coding.crc32c_bulk(b"123456789") == 0xE3069283  # the CRC-32C check value
    data = os.urandom(2 * coding.BULK_MIN + 12345)
    whole = crc32c_package.crc32c(data)
    for cut in (1, coding.BULK_MIN - 1, coding.BULK_MIN, coding.BULK_MIN + 3):
        head = coding.crc32c_bulk(data[:cut])
        assert coding.crc32c_bulk(memoryview(data)[cut:], head) == whole


@pytest.mark.usefixtures("implementation")
def test_typed_multidimensional_and_mapped_buffers() -> None:
    # What the reader and writers pass: numpy buffers of any item size and rank, slices of private mappings.
    x = np.random.default_rng(0).random((512, 300), dtype=np.float32)
    for view in (x.data, x.reshape(-1).data, x.view(np.uint8).reshape(-1)[5:].data):
        assert coding.crc32c_bulk(view) == crc32c_package.crc32c(view)
    m = mmap.mmap(-1, 1 << 20)
    m.write(os.urandom(1 << 20))
    with memoryview(m) as mv:
        assert coding.crc32c_bulk(mv[3 : 1 << 20]) == crc32c_package.crc32c(mv[3 : 1 << 20])
    m.close()
    with pytest.raises(BufferError):
        coding.crc32c_bulk(np.ones((512, 512))[:, ::2].data)  # never silently over a non-contiguous buffer


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=0, max_size=4096), st.integers(0, 0xFFFFFFFF), st.integers(0, 3),
       st.sampled_from(coding.BULK_IMPLEMENTATIONS))
def test_bulk_agrees_on_any_bytes(tail: bytes, value: int, blocks: int, use: str) -> None:
    data = os.urandom(blocks * coding.BULK_MIN) + tail
    was = coding.load_bulk_crc()
    try:
        coding.load_bulk_crc(use)
        assert coding.crc32c_bulk(data, value) == crc32c_package.crc32c(data, value)
    finally:
        coding.load_bulk_crc(was)


def test_without_awscrt_the_crc32c_package_does_the_bulk_work(tmp_path) -> None:
    # A platform with no awscrt wheel: the import fails, saves and checked reads still work, with crc32c.
    code = (
        "import sys; sys.modules['awscrt'] = None; sys.modules['awscrt.checksums'] = None\n"
        "import numpy as np, shardckpt as sc\n"
        "from shardckpt.format import coding\n"
        "assert coding.load_bulk_crc('awscrt') == 'crc32c', coding.load_bulk_crc()\n"
        "x = np.arange(1 << 20, dtype=np.float32).reshape(1024, 1024)\n"
        f"prefix = {str(tmp_path / 'ckpt')!r}\n"
        "mesh = sc.create_mesh([('x', 1)], local_device_ids=[0])\n"
        "sc.sharded_save(mesh, prefix, ['w'], [''], [sc.DTensor.from_global(x, sc.Layout.replicated(mesh, 2), [0])])\n"
        "got = sc.sharded_restore(mesh, prefix, ['w'], [sc.Layout.replicated(mesh, 2)])[0]\n"
        "assert np.array_equal(got.shards[0], x)\n"
        "print('ok', coding.BULK_IMPLEMENTATION, 'awscrt' in sys.modules and sys.modules['awscrt'] is not None)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ok", "crc32c", "False"]


def test_small_work_never_loads_awscrt(tmp_path) -> None:
    # The ~50 ms load is paid only by a process that checksums a large buffer.
    code = (
        "import sys, numpy as np, shardckpt as sc\n"
        "from shardckpt.format import BundleWriter, BundleReader\n"
        f"p = {str(tmp_path / 'c')!r}\n"
        "w = BundleWriter(p); w.add('a', np.arange(100, dtype=np.float32)); w.finish()\n"
        "assert BundleReader(p).read('a').sum() == 4950\n"
        "print('_awscrt' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_large_work_loads_awscrt_only_on_a_cpu_where_it_is_the_faster(tmp_path) -> None:
    # A save, a whole read and a partial checked read of a 16 MiB tensor: every bulk checksum path.
    code = (
        "import sys, numpy as np, shardckpt as sc\n"
        "from shardckpt.format import coding\n"
        f"p = {str(tmp_path / 'c')!r}\n"
        "x = np.random.default_rng(0).random((2048, 2048), dtype=np.float32)\n"
        "mesh = sc.create_mesh([('x', 2), ('y', 2)])\n"
        "def save(coord):\n"
        "    local = mesh.local_devices(coord.rank, coord.size)\n"
        "    sc.sharded_save(mesh, p, ['w'], [''], [sc.DTensor.from_global(x, sc.Layout(['x', 'y'], mesh), local)],\n"
        "                    coordinator=coord)\n"
        "sc.LocalGroup(4).run(save)\n"
        "with sc.BundleReader(p) as r:\n"
        "    assert np.array_equal(r.read('w'), x)\n"
        "    assert np.array_equal(r.read_bounds('w', [(3, 1500), (0, 2048)]), x[3:1500])\n"
        "print(coding.BULK_IMPLEMENTATION, any(m.startswith(('awscrt', '_awscrt')) for m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == (["awscrt", "True"] if _wide_cpu() else ["crc32c", "False"])


@pytest.mark.usefixtures("implementation")
def test_a_buffer_past_two_gib() -> None:
    # A whole-entry check over a mapping, or a raw read, hands over one buffer of the entry's size: past 2^31 an
    # `int` length would wrap in C.  (Checked by hand past 2^32 as well; 2 GiB of memory here, ~1-2 s.)
    big = np.full((1 << 31) + 12345, 0x5A, np.uint8)
    big[(1 << 31) - 3 :] = np.arange(12348, dtype=np.uint8)
    with memoryview(big) as mv:
        assert coding.crc32c_bulk(mv, 5) == crc32c_package.crc32c(mv, 5)
