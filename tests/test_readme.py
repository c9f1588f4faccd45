"""Every code block of README.md runs as written.

Convention (stated in the README before its first example): each ```python block is a whole script.  It runs
as ``python this.py`` in an empty directory, unless its first line is ``# run with: COMMAND``, where ``COMMAND``
names the block's file ``this.py`` (``# run with: shardckpt launch -n 4 python this.py``).  The command runs
verbatim, with this interpreter's ``bin`` directory first on PATH, so ``python`` and ``shardckpt`` are the ones
the tests use.  Shell blocks (```sh, ```bash) run with ``bash -e`` in an empty directory too, except the ones
listed in `SHELL_NOT_RUN` with the reason each cannot run inside the suite.

Blocks are found by parsing the file, so a section added to the README is tested without touching this file.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK_TIMEOUT = 420
RUN_WITH = re.compile(r"#\s*run with:\s*(?P<command>.+?)\s*$")

# Shell blocks the suite does not run, by their exact text, and why.  Each is excluded by design, not because
# something is missing: a test run cannot install the package it is testing into its own environment.
SHELL_NOT_RUN = {
    "python -m pip install . && shardckpt demo\npython -m pip install -e \".[test]\" && python -m pytest":
        "Quickstart: both lines install into the running environment (pip install), and the second runs the "
        "whole suite, this test included; `shardckpt demo` itself runs in tests/test_launch.py::"
        "test_demo_runs_end_to_end and tests/test_readme.py::test_the_quickstart_demo_command_runs",
}


@dataclass(frozen=True)
class Block:
    language: str
    text: str
    line: int  # 1-based line of the opening fence
    section: str

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.section.lower()).strip("-") or "top"
        return f"{self.language}-line{self.line}-{slug}"


def readme_blocks(path: Path = README) -> list[Block]:
    """Every fenced block of the file, with its language and the heading it sits under."""
    blocks, section = [], ""
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#") and not line.startswith("#!"):
            section = line.lstrip("#").strip()
        fence = re.match(r"^(```+|~~~+)\s*([A-Za-z0-9_+-]*)", line)
        if fence:
            marker, language = fence.group(1), fence.group(2).lower()
            body: list[str] = []
            j = i + 1
            while j < len(lines) and not lines[j].startswith(marker):
                body.append(lines[j])
                j += 1
            assert j < len(lines), f"README.md:{i + 1}: a code block is never closed"
            blocks.append(Block(language, "\n".join(body), i + 1, section))
            i = j + 1
            continue
        i += 1
    return blocks


BLOCKS = readme_blocks()
PYTHON = [b for b in BLOCKS if b.language in ("python", "py")]
SHELL = [b for b in BLOCKS if b.language in ("sh", "bash", "shell", "console")]


def command_of(block: Block) -> list[str]:
    """How the README says to run a python block: its ``# run with:`` line, else ``python this.py``."""
    first = block.text.splitlines()[0] if block.text else ""
    match = RUN_WITH.match(first)
    if first.lstrip().startswith("#") and "run with" in first.lower() and not match:
        raise AssertionError(f"README.md:{block.line}: malformed run-with line {first!r}")
    if not match:
        return ["python", "this.py"]
    argv = shlex.split(match.group("command"))
    assert "this.py" in argv, f"README.md:{block.line}: the run-with command must name this.py: {first!r}"
    return argv


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(argv: list[str], cwd: Path, block: Block) -> None:
    env = _env()
    scratch = cwd / "tmp"  # what a block's tools leave in TMPDIR (torchrun's torchelastic_* logs) goes with it
    scratch.mkdir(exist_ok=True)
    env["TMPDIR"] = str(scratch)
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT)
    assert result.returncode == 0, (
        f"README.md:{block.line} ({block.section}) failed with status {result.returncode} under {argv}:\n"
        f"--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}")


def test_the_readme_has_the_blocks_this_test_runs():
    # Guards the parser: were it to miss blocks, every parametrised test below would silently vanish.
    sections = {b.section for b in PYTHON}
    assert {"Many clients: numpy", "PyTorch", "JAX", "TensorFlow", "Checkpoint manager"} <= sections, sections
    assert SHELL, "the Quickstart's shell block is gone"
    for text in SHELL_NOT_RUN:
        assert text in {b.text for b in SHELL}, f"an exclusion names a shell block the README no longer has: {text!r}"


def test_the_run_with_convention_is_documented_and_parsed(tmp_path):
    text = README.read_text(encoding="utf-8")
    assert "# run with:" in text and "this.py" in text
    sample = tmp_path / "r.md"
    sample.write_text("# T\n\n```python\n# run with: shardckpt launch -n 3 python this.py\nprint(1)\n```\n"
                      "\n## U\n\n```python\nprint(2)\n```\n```sh\necho hi\n```\n")
    got = readme_blocks(sample)
    assert [(b.language, b.section, b.line) for b in got] == [("python", "T", 3), ("python", "U", 10),
                                                              ("sh", "U", 13)]
    assert command_of(got[0]) == ["shardckpt", "launch", "-n", "3", "python", "this.py"]
    assert command_of(got[1]) == ["python", "this.py"]


@pytest.mark.parametrize("block", PYTHON, ids=[b.id for b in PYTHON])
def test_python_block_runs_verbatim(block: Block, tmp_path: Path):
    (tmp_path / "this.py").write_text(block.text + "\n", encoding="utf-8")
    _run(command_of(block), tmp_path, block)


# Shell blocks the suite can run (today none besides the excluded Quickstart; a section that adds one is run).
SHELL_RUN = [b for b in SHELL if b.text not in SHELL_NOT_RUN]
if SHELL_RUN:
    @pytest.mark.parametrize("block", SHELL_RUN, ids=[b.id for b in SHELL_RUN])
    def test_shell_block_runs_verbatim(block: Block, tmp_path: Path):
        (tmp_path / "this.sh").write_text(block.text + "\n", encoding="utf-8")
        _run(["bash", "-e", "this.sh"], tmp_path, block)


def test_the_quickstart_demo_command_runs(tmp_path: Path):
    # The Quickstart's first line minus its install step, at a size the suite can afford.
    result = subprocess.run(["shardckpt", "demo", "--size-mb", "16", "--dir", str(tmp_path)], cwd=tmp_path,
                            env=_env(), capture_output=True, text=True, timeout=BLOCK_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.rstrip().endswith("OK")
