"""`benchmarks/bench_crc.py` runs both bulk CRC32C implementations on this CPU and reports the one shardckpt chooses."""

from __future__ import annotations

import importlib.util
import os
import sys

from shardckpt.format import coding

_BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
_PATH = os.path.join(_BENCHMARKS, "bench_crc.py")
if _BENCHMARKS not in sys.path:
    sys.path.insert(0, _BENCHMARKS)  # as when the script runs: its own directory first (`sections`)
_spec = importlib.util.spec_from_file_location("bench_crc", _PATH)
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_crc"] = bench
_spec.loader.exec_module(bench)


def test_a_small_run_writes_its_section_and_restores_the_choice(tmp_path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n")
    choice = coding.load_bulk_crc()
    # the run saves and restores through both implementations, and raises if a tensor comes back wrong
    assert bench.main(["--gib", "0.01", "--reps", "1", "--dir", str(tmp_path / "work"), "--output", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Benchmarks\n")
    section = text.split(bench.START, 1)[1].split(bench.END, 1)[0]
    assert f"shardckpt chooses **{choice}** on this CPU" in section
    for row in ("checksum in cache", "checksum from memory", "save 2x2", "whole checked restore"):
        assert row in section
    assert choice == coding.BULK_IMPLEMENTATION
    # a second run replaces the section rather than appending another
    assert bench.main(["--gib", "0.01", "--reps", "1", "--dir", str(tmp_path / "work"), "--output", str(out)]) == 0
    assert out.read_text().count(bench.START) == 1
