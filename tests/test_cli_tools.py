"""`shardckpt convert`, `shardckpt diff`, `--help` and `--json`, run as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

import shardckpt as sc  # noqa: E402
from shardckpt.cli import build_parser, main  # noqa: E402
from shardckpt.convert import open_source  # noqa: E402
from shardckpt.diff import diff_tensors  # noqa: E402

MESH = sc.create_mesh([("x", 2), ("y", 2)])


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardckpt", *args], capture_output=True, text=True,
                          timeout=timeout)


def _cli_many(*argvs: tuple[str, ...], timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """Several commands at once (start-up dominates), results in order."""
    procs = [subprocess.Popen([sys.executable, "-m", "shardckpt", *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for argv in argvs]
    out = []
    for argv, proc in zip(argvs, procs):
        stdout, stderr = proc.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr))
    return out


def _main(capsys, *args: str) -> tuple[int, str, str]:
    """The command line in this process (as the real process runs it): exit status, stdout, stderr."""
    try:
        rc = main(list(args))
    except SystemExit as exc:  # argparse's usage errors
        rc = int(exc.code or 0)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _model() -> dict[str, np.ndarray]:
    return {
        "dense/kernel": np.arange(12 * 8, dtype=np.float32).reshape(12, 8) / 7,
        "emb": (np.arange(16 * 4, dtype=np.float32).reshape(16, 4) / 3).astype(ml_dtypes.bfloat16),
        "step": np.array(1234, dtype=np.int64),
        "f8": np.linspace(-2, 2, 6).astype(ml_dtypes.float8_e4m3fn),
        "flags": np.array([True, False, True]),
    }


def _save_sharded(prefix: str, with_strings: bool) -> None:
    """Four clients save the model; the 2-D tensors are partitioned (stored as slices)."""
    model = _model()
    layouts = {"dense/kernel": sc.Layout(["x", "y"], MESH), "emb": sc.Layout(["y", "unsharded"], MESH)}

    def client(coord):
        local = MESH.local_devices(coord.rank, coord.size)
        tensors: dict[str, object] = {n: sc.DTensor.from_global(v, layouts[n], local) if n in layouts else v
                                      for n, v in model.items()}
        if with_strings:
            tensors["vocab"] = np.array([b"a", b"bc"], dtype=object)
        sc.name_based_save(MESH, prefix, tensors, coordinator=coord, timeout=30)

    sc.LocalGroup(4).run(client)


def test_help_explains_every_subcommand():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    commands = sorted(subparsers.choices)
    assert {"inspect", "verify", "clean", "launch", "convert", "diff", "demo"} <= set(commands)
    top, unknown, short, *helps = _cli_many(("--help",), ("no-such-command",), ("diff", "only-one-argument"),
                                            *[(command, "--help") for command in commands])
    assert top.returncode == 0
    assert unknown.returncode == 2 and short.returncode == 2
    for command, result in zip(commands, helps):
        assert command in top.stdout
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"usage: shardckpt {command}")
        description = result.stdout.split("\n\n")[1]
        assert len(description) > 40, f"{command} --help has no real description"
    assert "exit status (as diff(1)): 0 identical, 1 different, 2 trouble" in helps[commands.index("diff")].stdout


def test_convert_both_ways_with_partitioned_bfloat16_and_strings(tmp_path):
    prefix = str(tmp_path / "ckpt")
    _save_sharded(prefix, with_strings=True)
    assert sc.load_checkpoint(prefix).bundle.entry("emb").slices  # really partitioned
    out = str(tmp_path / "model.safetensors")

    refused = _cli("convert", prefix, out)
    assert refused.returncode == 1
    assert "vocab: DT_STRING tensors have no safetensors dtype" in refused.stderr
    assert "--skip-unsupported" in refused.stderr
    assert not os.path.exists(out)

    done = _cli("convert", prefix, out, "--skip-unsupported", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["direction"] == "checkpoint-to-safetensors"
    assert report["skipped"] == [{"name": "vocab", "reason": "DT_STRING tensors have no safetensors dtype"}]
    assert report["tensors"] == 5
    with safe_open(out, framework="np") as f:  # the safetensors package reads what we wrote
        assert sorted(f.keys()) == sorted(_model())
        np.testing.assert_array_equal(f.get_tensor("emb"), _model()["emb"])
        assert f.get_tensor("emb").dtype == ml_dtypes.bfloat16
    with open_source(out) as source:
        loaded = {name: source.read(name) for name in source.tensors()}
    for name, value in _model().items():
        assert loaded[name].dtype == value.dtype, name
        assert loaded[name].shape == value.shape, name
        np.testing.assert_array_equal(loaded[name], value)

    back = str(tmp_path / "back")
    result = _cli("convert", out, back)
    assert result.returncode == 0, result.stderr
    assert "model.safetensors -> " in result.stdout
    # TensorFlow reads the converted checkpoint, bfloat16 and the 0-d scalar included.
    reader = tf.train.load_checkpoint(back)
    assert reader.get_variable_to_dtype_map()["emb"] == tf.bfloat16
    np.testing.assert_array_equal(reader.get_tensor("emb"), _model()["emb"])
    assert reader.get_tensor("step") == 1234
    np.testing.assert_array_equal(reader.get_tensor("dense/kernel"), _model()["dense/kernel"])

    # The round trip lost only the string tensor.
    diff = _cli("diff", prefix, back, "--json")
    assert diff.returncode == 1, diff.stderr
    summary = json.loads(diff.stdout)
    assert summary["only_in_a"] == ["vocab"] and summary["only_in_b"] == []
    assert all(t["equal"] and t["max_abs_diff"] == 0 for t in summary["tensors"])
    same = _cli("diff", out, back)
    assert same.returncode == 0, same.stdout + same.stderr
    assert "identical: 5 tensors" in same.stdout


def test_convert_into_a_directory_that_does_not_exist_yet(tmp_path, capsys):
    # As a save does: the prefix's directory is made (the lease that guards the prefix lives in it).
    st = str(tmp_path / "a.safetensors")
    save_file({"w": np.arange(4, dtype=np.float32)}, st)
    prefix = str(tmp_path / "new" / "deeper" / "ckpt")
    assert _main(capsys, "convert", st, prefix, "-q")[0] == 0
    np.testing.assert_array_equal(sc.load_checkpoint(prefix).get_tensor("w"), np.arange(4, dtype=np.float32))
    (tmp_path / "file").write_text("x")
    rc, _, err = _main(capsys, "convert", st, str(tmp_path / "file" / "ckpt"))
    assert rc == 1 and str(tmp_path / "file" / "ckpt") in err  # a parent that is a file: a clear error, no trace


def test_convert_refuses_bad_directions_existing_outputs_and_missing_inputs(tmp_path, capsys):
    st = str(tmp_path / "a.safetensors")
    save_file({"w": np.ones((2, 2), np.float32), "c": np.zeros(2, np.complex64)}, st)
    prefix = str(tmp_path / "p")
    both, neither, missing = _cli_many(("convert", st, str(tmp_path / "b.safetensors")), ("convert", prefix, "q"),
                                       ("convert", str(tmp_path / "missing.safetensors"), prefix))
    assert both.returncode == 2 and "exactly one of SOURCE and DESTINATION" in both.stderr
    assert neither.returncode == 2
    assert missing.returncode == 1 and "no such safetensors file" in missing.stderr
    assert _main(capsys, "convert", str(tmp_path / "missing"), str(tmp_path / "x.safetensors"))[0] == 1
    assert _main(capsys, "convert", st, prefix, "-q")[0] == 0
    rc, _, err = _main(capsys, "convert", st, prefix)
    assert rc == 1 and "--overwrite" in err
    assert _main(capsys, "convert", st, prefix, "--overwrite")[0] == 0
    np.testing.assert_array_equal(sc.load_checkpoint(prefix).get_tensor("c"), np.zeros(2, np.complex64))
    # complex128 has no safetensors dtype.
    with sc.BundleWriter(str(tmp_path / "z")) as w:
        w.add("z", np.ones(3, np.complex128))
    rc, _, err = _main(capsys, "convert", str(tmp_path / "z"), str(tmp_path / "z.safetensors"))
    assert rc == 1 and "complex128 has no safetensors dtype" in err
    assert not os.path.exists(tmp_path / "z.safetensors")


def _write(prefix: str, tensors: dict[str, np.ndarray]) -> None:
    with sc.BundleWriter(prefix) as w:
        for name, value in tensors.items():
            w.add(name, value)


def test_diff_reports_names_shapes_dtypes_and_max_abs_difference(tmp_path, capsys):
    big = np.iinfo(np.int64)
    a = {
        "same": np.arange(6, dtype=np.float32),
        "changed": np.zeros((2, 3), np.float32),
        "nan_same": np.array([1.0, np.nan], np.float32),
        "nan_moved": np.array([1.0, np.nan], np.float32),
        "widened": np.arange(4, dtype=np.float32),
        "reshaped": np.zeros((2, 3), np.float32),
        "ints": np.array([big.min, 0], np.int64),
        "words": np.array([b"x", b"y"], dtype=object),
        "bf": np.array([1.0, 2.0], ml_dtypes.bfloat16),
        "gone": np.ones(1, np.float32),
    }
    b = dict(a)
    del b["gone"]
    b.update({
        "changed": np.array([[0, 0.5, 0], [0, 0, -0.25]], np.float32),
        "nan_moved": np.array([np.nan, 1.0], np.float32),
        "widened": np.arange(4, dtype=np.float64),
        "reshaped": np.zeros((3, 2), np.float32),
        "ints": np.array([big.max, 0], np.int64),
        "words": np.array([b"x", b"z"], dtype=object),
        "bf": np.array([1.0, 2.015625], ml_dtypes.bfloat16),
        "new": np.ones(1, np.float32),
    })
    pa, pb = str(tmp_path / "a"), str(tmp_path / "b")
    _write(pa, a)
    _write(pb, b)

    result, text, same, missing = _cli_many(("diff", pa, pb, "--json"), ("diff", pa, pb), ("diff", pa, pa),
                                            ("diff", pa, str(tmp_path / "missing")))
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["identical"] is False
    assert report["only_in_a"] == ["gone"] and report["only_in_b"] == ["new"]
    t = {row["name"]: row for row in report["tensors"]}
    assert t["same"]["equal"] and t["same"]["max_abs_diff"] == 0
    assert not t["changed"]["equal"] and t["changed"]["max_abs_diff"] == 0.5
    assert t["changed"]["differing_elements"] == 2
    assert t["nan_same"]["equal"]
    assert not t["nan_moved"]["equal"] and t["nan_moved"]["max_abs_diff"] == "nan"
    assert not t["widened"]["equal"] and t["widened"]["max_abs_diff"] == 0
    assert (t["widened"]["dtype_a"], t["widened"]["dtype_b"]) == ("float32", "float64")
    assert "dtypes differ" in t["widened"]["note"]
    assert not t["reshaped"]["equal"] and t["reshaped"]["max_abs_diff"] is None
    assert (t["reshaped"]["shape_a"], t["reshaped"]["shape_b"]) == ([2, 3], [3, 2])
    assert t["ints"]["max_abs_diff"] == 2**64 - 1  # exact, no overflow
    assert not t["words"]["equal"] and t["words"]["differing_elements"] == 1
    assert t["bf"]["max_abs_diff"] == 0.015625  # one bfloat16 step at 2

    assert text.returncode == 1
    assert "only in A: gone" in text.stdout and "only in B: new" in text.stdout
    assert "float32 -> float64" in text.stdout and "[2, 3] -> [3, 2]" in text.stdout
    assert "2 only in A" not in text.stdout and "1 only in A, 1 only in B" in text.stdout

    assert same.returncode == 0 and "identical: 10 tensors" in same.stdout
    assert missing.returncode == 2 and "error:" in missing.stderr

    # --atol: small differences count as equal (in-process, the same function the command runs).
    _write(str(tmp_path / "c"), {"w": np.array([1.0, 2.0], np.float32)})
    _write(str(tmp_path / "d"), {"w": np.array([1.0, 2.0 + 1e-6], np.float32)})
    assert not diff_tensors(tmp_path / "c", tmp_path / "d").identical
    assert diff_tensors(tmp_path / "c", tmp_path / "d", atol=1e-5).identical
    assert _main(capsys, "diff", "--atol", "1e-5", str(tmp_path / "c"), str(tmp_path / "d"))[0] == 0
    assert _main(capsys, "diff", str(tmp_path / "c"), str(tmp_path / "d"))[0] == 1


def test_diff_takes_a_directory_for_its_latest_checkpoint_and_verify_speaks_json(tmp_path, capsys):
    d = str(tmp_path / "run")

    def client(coord):
        manager = sc.CheckpointManager(d, max_to_keep=2, coordinator=coord)
        for step in (1, 2):
            manager.save(step, MESH, {"w": np.full((4, 4), step, np.float32)})

    sc.LocalGroup(2).run(client)
    expected = str(tmp_path / "expected")
    _write(expected, {"w": np.full((4, 4), 2, np.float32)})
    assert _main(capsys, "diff", d, expected)[0] == 0
    assert _main(capsys, "diff", os.path.join(d, "ckpt-1"), expected)[0] == 1

    rc, out, _ = _main(capsys, "verify", os.path.join(d, "ckpt-2"), "--json")
    assert rc == 0 and json.loads(out)["ok"] is True
    data = max((os.path.join(d, f"ckpt-2.data-0000{r}-of-00002") for r in range(2)), key=os.path.getsize)
    with open(data, "r+b") as f:
        f.seek(3)
        byte = f.read(1)
        f.seek(3)
        f.write(bytes([byte[0] ^ 0xFF]))
    rc, out, _ = _main(capsys, "verify", os.path.join(d, "ckpt-2"), "--json")
    assert rc == 1
    report = json.loads(out)
    assert report["ok"] is False and report["problems"]


@pytest.mark.parametrize("value", [np.float16(1.5), np.array([[1, 2]], np.uint16)])
def test_diff_across_formats_in_process(tmp_path, value):
    st = str(tmp_path / "x.safetensors")
    save_file({"v": np.asarray(value)}, st)
    prefix = str(tmp_path / "x")
    _write(prefix, {"v": np.asarray(value)})
    report = diff_tensors(st, prefix)
    assert report.identical, report.to_json()
