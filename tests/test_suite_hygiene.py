"""The suite's own promises: a test that leaves a file behind fails the session (conftest's guard, run here on
a session of its own), and the S3 stack of the test extras is pinned so pip has nothing to backtrack through."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import tomllib

HERE = Path(__file__).resolve().parent

LEAKS = """
import os, tempfile

def test_leaves_a_file():
    fd, path = tempfile.mkstemp(prefix="leaked-")
    os.close(fd)

def test_leaves_an_shm_entry():
    name = os.environ.get("SHM_NAME")
    if name:
        open(os.path.join("/dev/shm", name), "w").close()
"""

CLEAN = """
import os, tempfile

def test_cleans_up(tmp_path):
    fd, path = tempfile.mkstemp()
    os.close(fd)
    os.unlink(path)
    (tmp_path / "x").write_text("pytest's own tree is fine")
"""


def _session(tmp_path: Path, name: str, body: str, **env: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run ``body`` as a pytest session of its own under the suite's conftest; its TMPDIR is inside tmp_path
    (pytest's tree, which the outer guard ignores), so what the inner session keeps cannot trip this one."""
    root = tmp_path / name
    tmp = root / "tmp"
    tmp.mkdir(parents=True)
    shutil.copy(HERE / "conftest.py", root / "conftest.py")
    (root / f"test_{name}.py").write_text(body)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(root)], cwd=root,
                            capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, TMPDIR=str(tmp), **env))
    return result, tmp


def test_a_file_left_in_the_temporary_directory_fails_the_session(tmp_path):
    result, tmp = _session(tmp_path, "leaks", LEAKS)
    assert result.returncode != 0, result.stdout
    assert re.search(r"left in the temporary directory .*\['leaked-\w+'\]", result.stdout), result.stdout
    result, tmp = _session(tmp_path, "clean", CLEAN)
    assert result.returncode == 0, result.stdout
    assert os.listdir(tmp) == []  # the session's private directory went with it


def test_a_new_dev_shm_entry_fails_the_session_in_strict_mode(tmp_path):
    name = f"shardckpt-hygiene-{uuid.uuid4().hex}"
    try:
        result, _ = _session(tmp_path, "shm", LEAKS.replace("test_leaves_a_file", "_not_run"), SHM_NAME=name,
                             SHARDCKPT_STRICT_SHM="1")
    finally:
        try:
            os.unlink(os.path.join("/dev/shm", name))
        except FileNotFoundError:
            pass
    assert result.returncode != 0 and "new entries in /dev/shm" in result.stdout and name in result.stdout, \
        result.stdout


def test_the_s3_stack_of_the_test_extras_is_pinned_exactly():
    with open(HERE.parent / "pyproject.toml", "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]["test"]
    pins = {re.split(r"[\[=<>!~; ]", req, maxsplit=1)[0]: req for req in extras}
    for name in ("boto3", "botocore", "aiobotocore", "s3fs", "moto"):
        assert re.match(rf"{name}(\[[^]]*\])?==\d", pins[name]), pins.get(name)
