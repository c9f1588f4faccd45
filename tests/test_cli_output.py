"""What the command line prints: one unit system, bars only on a terminal (never with --json), a sane rate,
and a useful word about an interrupted save."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
import time

import numpy as np

import shardckpt as sc
from shardckpt import cli

BIG = 80 << 20  # above the 64 MiB below which no bar is drawn


def _terminal() -> tuple[int, int, list[bytes], threading.Thread]:
    """A pseudo-terminal of 120 columns (a fresh one has 0, and a bar of 0 columns is empty): its two ends, the
    chunks read from it, and the (unstarted) thread that reads them until the other side closes."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the other side is closed
                return
            if not data:
                return
            chunks.append(data)

    return master, slave, chunks, threading.Thread(target=drain)


def _run(argv: list[str], *, tty: bool, timeout: float = 300) -> tuple[int, str, str]:
    """Run the CLI with stdout piped and stderr a pseudo-terminal (``tty``) or a pipe; (status, stdout, stderr)."""
    cmd = [sys.executable, "-m", "shardckpt", *argv]
    env = dict(os.environ, COLUMNS="120")
    if not tty:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        return r.returncode, r.stdout, r.stderr
    master, slave, chunks, reader = _terminal()
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave, text=True, env=env)
        os.close(slave)
        slave = -1
        reader.start()
        out, _ = proc.communicate(timeout=timeout)
        reader.join(30)
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    return proc.returncode, out, b"".join(chunks).decode(errors="replace")


def _big_checkpoint(prefix: str) -> None:
    with sc.BundleWriter(prefix) as w:
        w.add("big", np.ones(BIG // 4, np.float32))


def test_verify_draws_a_binary_unit_bar_only_on_a_terminal_and_never_with_json(tmp_path):
    prefix = str(tmp_path / "big")
    _big_checkpoint(prefix)
    code, out, err = _run(["verify", prefix], tty=True)
    assert code == 0 and out.startswith("OK") and "80.0 MiB verified" in out, (out, err)
    assert "verify" in err and "80.0MiB/80.0MiB" in err and re.search(r"\d+(\.\d+)?[MG]iB/s", err), err
    assert not re.search(r"\d(k|M|G)B\b", err), err  # no decimal units next to the binary ones
    code, out, err = _run(["verify", "--json", prefix], tty=True)
    assert code == 0 and json.loads(out)["ok"] and err == "", err
    code, out, err = _run(["verify", prefix], tty=False)
    assert code == 0 and err == "", err


def _rate_mib_s(err: str) -> float:
    """The rate on the bar's last drawing, in MiB/s."""
    rates = re.findall(r"(\d+(?:\.\d+)?)([KMGT]i)B/s", err)
    assert rates, err
    value, unit = rates[-1]
    return float(value) * {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024**2}[unit]


def test_diff_and_convert_draw_a_bar_only_on_a_terminal_never_with_json_and_diff_rates_its_whole_run(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _big_checkpoint(a)
    with sc.BundleWriter(b) as w:
        w.add("big", np.full(BIG // 4, 2, np.float32))
    code, out, err = _run(["diff", a, b], tty=True)
    assert code == 1 and "differ" in out, (out, err)
    assert "diff" in err and "160MiB/160MiB" in err and not re.search(r"\d(k|M|G)B\b", err), err
    code, out, err = _run(["diff", "--json", a, b], tty=True)
    assert code == 1 and json.loads(out)["identical"] is False and err == "", err
    code, out, err = _run(["diff", a, b], tty=False)
    assert code == 1 and err == "", err
    for i, (flags, tty) in enumerate([([], True), (["--json"], True), ([], False)]):
        dest = str(tmp_path / f"out{i}.safetensors")
        code, out, err = _run(["convert", *flags, a, dest], tty=tty)
        assert code == 0 and os.path.getsize(dest) > BIG, (out, err)
        if flags:
            json.loads(out)
        if tty and not flags:
            assert "convert" in err and "80.0MiB/80.0MiB" in err and re.search(r"[MG]iB/s", err), err
        else:
            assert err == "", err
    code, out, err = _run(["convert", str(tmp_path / "out0.safetensors"), str(tmp_path / "back")], tty=True)
    assert code == 0 and "convert" in err and "80.0MiB/80.0MiB" in err, (out, err)


PAUSE = 2.0  # seconds the diff below is held stopped before it reports anything


def _diff_held_before_its_first_report(a: str, b: str) -> str | None:
    """Run ``diff A B`` on a terminal, SIGSTOPped for `PAUSE` s once it has opened A's data file and before it
    drew anything; its stderr, or None when it drew its bar before the stop landed (the caller tries again)."""
    import signal

    master, slave, chunks, reader = _terminal()
    proc = subprocess.Popen([sys.executable, "-m", "shardckpt", "diff", a, b], stdout=subprocess.PIPE,
                            stderr=slave, env=dict(os.environ, COLUMNS="120"))
    os.close(slave)
    reader.start()
    try:
        data_file = os.path.realpath(a + ".data-00000-of-00001")
        fds = f"/proc/{proc.pid}/fd"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                links = [os.readlink(os.path.join(fds, n)) for n in os.listdir(fds)]
            except OSError:  # an fd closed while listed
                continue
            if data_file in links:
                break
        proc.send_signal(signal.SIGSTOP)
        time.sleep(0.3)  # whatever it wrote before the stop reaches `chunks`
        early = bool(chunks)
        time.sleep(PAUSE - 0.3)
        proc.send_signal(signal.SIGCONT)
        proc.communicate(timeout=120)
        reader.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return None if early else b"".join(chunks).decode(errors="replace")


def test_diffs_rate_counts_the_time_before_its_first_report(tmp_path):
    # A diff of one tensor reports once, at the end.  The process is held stopped between opening the files
    # and that report, so a rate over the command's run is at most 160 MiB / PAUSE; a bar timed from its first
    # report (the bug) showed the bytes over almost no time (2.34 TiB/s here).
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _big_checkpoint(a)
    with sc.BundleWriter(b) as w:
        w.add("big", np.full(BIG // 4, 2, np.float32))
    for _ in range(5):
        err = _diff_held_before_its_first_report(a, b)
        if err is not None:
            break
    assert err is not None, "the diff drew its bar before every stop landed"
    assert "160MiB/160MiB" in err and _rate_mib_s(err) <= 160 / PAUSE, err


def test_a_bars_clock_starts_with_the_command_not_at_its_first_report():
    # diff and convert report after each tensor: a bar made at the first report timed that tensor's bytes
    # over almost no time.  Its start must be no later than a moment between creation and the first report.
    bar = cli._Bar("diff", quiet=False)
    bar.show = True
    between = time.time()
    while time.time() == between:
        pass
    try:
        bar(BIG, 2 * BIG)
        assert bar._bar.start_t <= between
        assert bar._bar.n == BIG and bar._bar.total == 2 * BIG
    finally:
        bar.close()


def test_bars_are_wanted_only_on_a_terminal(capsys):
    assert cli.bars_wanted(quiet=True) is False and cli.bars_wanted(json_output=True) is False
    assert cli.bars_wanted() is False  # pytest captures stderr: not a terminal


def test_inspect_of_an_interrupted_save_says_what_is_there_and_to_clean(tmp_path):
    prefix = str(tmp_path / "ckpt")
    script = ("import sys, numpy as np, shardckpt as sc\n"
              "sc.sharded_save(sc.create_mesh([('x', 1)]), sys.argv[1], ['w'], [''], [np.ones(1000, np.float32)])\n")
    env = dict(os.environ, SHARDCKPT_FAULT="after_data_fsync@0:kill")
    killed = subprocess.run([sys.executable, "-c", script, prefix], env=env, capture_output=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    code, out, err = _run(["inspect", prefix], tty=False)
    assert code == 1 and out == ""
    assert "no index, but" in err and "interrupted save" in err, err
    assert f"shardckpt clean {prefix}" in err and ".staging-" in err, err
    assert _run(["clean", prefix], tty=False)[0] == 0
    code, out, err = _run(["inspect", prefix], tty=False)
    assert code == 1 and "no checkpoint" in err and "shardckpt clean" not in err, err


def test_the_demo_shows_progress_on_a_terminal_and_binary_units(tmp_path):
    code, out, err = _run(["demo", "--size-mb", "16", "--dir", str(tmp_path)], tty=True)
    assert code == 0, out + err
    assert "save: building shards" in err and "restore:" in err and "tensor" in err, err
    assert "GiB/s" in out and "GB/s" not in out, out
    assert not [n for n in os.listdir(tmp_path) if n.endswith((".progress", ".tmp"))]
    code, out, err = _run(["demo", "--size-mb", "16", "--dir", str(tmp_path / "piped")], tty=False)
    assert code == 0 and err == "", err
