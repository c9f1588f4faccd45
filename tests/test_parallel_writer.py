"""The parallel data-file writer lays out exactly the bytes the sequential writer appends."""

from __future__ import annotations

import os

import numpy as np
import pytest

from shardckpt.format.parallel_writer import start_writeback, write_data_file
from shardckpt.format.writer import DataFileWriter, prepare


def _tensors():
    rng = np.random.default_rng(3)
    big = rng.standard_normal((3000, 2048)).astype(np.float32)  # 24 MiB: chunked
    matrix = rng.standard_normal((512, 4096)).astype(np.float32)
    return [
        big,
        matrix[:, 1024:3072],  # a column block: rows contiguous, written row by row without a copy
        matrix[:, ::2],  # strided rows: gathered by a copy
        np.arange(7, dtype=np.int16),
        np.zeros((0, 5), np.float64),
        np.array([b"x", b"", b"\x00\xff" * 100], dtype=object),
        np.float64(3.5),
        rng.integers(0, 255, (70000,), dtype=np.uint8),
    ]


@pytest.mark.parametrize("alignment", [1, 64])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("durable", [False, True])  # durable: each job's range sent to writeback as it is written
def test_same_bytes_and_entries_as_sequential_writer(tmp_path, alignment, threads, durable):
    tensors = _tensors()
    seq = DataFileWriter(str(tmp_path / "seq"), shard_id=2, alignment=alignment)
    want = [seq.write(prepare(t)) for t in tensors]
    seq.close(durable=False)
    got, size = write_data_file(str(tmp_path / "par"), [prepare(t, contiguous=False) for t in tensors], shard_id=2,
                                alignment=alignment, threads=threads, durable=durable)
    assert got == want
    assert size == seq.size
    assert (tmp_path / "par").read_bytes() == (tmp_path / "seq").read_bytes()


def test_failure_removes_the_file(tmp_path):
    calls = []

    def boom():
        calls.append(1)
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        write_data_file(str(tmp_path / "f"), [prepare(t, contiguous=False) for t in _tensors()], midway=boom)
    assert calls == [1] and not (tmp_path / "f").exists()


def test_start_writeback_is_only_a_hint(tmp_path):
    """Where the kernel cannot start writeback (a pipe) nothing fails; on a file the bytes are untouched."""
    r, w = os.pipe()
    try:
        start_writeback(w, 0, 4096)
    finally:
        os.close(r)
        os.close(w)
    path = tmp_path / "f"
    data = np.random.default_rng(5).integers(0, 255, 3 << 20, dtype=np.uint8).tobytes()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        start_writeback(fd, 0, len(data))
        start_writeback(fd, len(data), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == data
