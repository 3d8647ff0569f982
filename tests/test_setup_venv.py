"""scripts/setup-venv.sh on a Python whose venv cannot install pip (Debian and Ubuntu ship
ensurepip apart, in python3-venv, which a fresh machine lacks)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_python_without_ensurepip_is_named_and_leaves_no_broken_venv(tmp_path):
    """Before: 'python3 -m venv' failed half-way with venv's own traceback-like error and left a
    .venv without pip, which the next run took as made ('No module named pip' from then on)."""
    tree = tmp_path / "tree"
    (tree / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup-venv.sh", tree / "scripts")
    shutil.copy(ROOT / "pyproject.toml", tree)
    hide = tmp_path / "hide" / "ensurepip"  # this Python's ensurepip as a machine without python3-venv has it
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text("raise ImportError('ensurepip is not installed here')\n")
    fake_bin = tmp_path / "bin"  # apt-get as root does nothing here (no package index in a test)
    fake_bin.mkdir()
    (fake_bin / "apt-get").write_text("#!/bin/sh\necho \"apt-get $*\" >> \"$(dirname \"$0\")/apt.log\"\n")
    (fake_bin / "apt-get").chmod(0o755)
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(hide.parent),
               PATH=os.pathsep.join([str(fake_bin), os.environ.get("PATH", "")]))
    env.pop("VIRTUAL_ENV", None)
    done = subprocess.run(["bash", "scripts/setup-venv.sh", "test"], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=120)
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"python{version}-venv" in done.stderr, done.stderr
    assert not (tree / ".venv").exists()


def _run_copy(tmp_path: Path, *args: str) -> tuple[Path, subprocess.CompletedProcess]:
    """setup-venv.sh run with ``args`` in a tree of its own (the script and pyproject.toml)."""
    tree = tmp_path / "tree"
    (tree / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup-venv.sh", tree / "scripts")
    shutil.copy(ROOT / "pyproject.toml", tree)
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("VIRTUAL_ENV", None)
    done = subprocess.run(["bash", "scripts/setup-venv.sh", *args], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=60)
    return tree, done


def test_help_prints_the_usage_and_makes_nothing(tmp_path):
    """Before: --help was taken as an extra, a .venv was made and pip failed with a traceback."""
    tree, done = _run_copy(tmp_path, "--help")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Usage: scripts/setup-venv.sh [EXTRAS]" in done.stdout
    assert not (tree / ".venv").exists()


def test_an_unknown_extra_is_refused_before_anything_is_made(tmp_path):
    """Before: a misspelt extra was only a pip warning, and was recorded as installed."""
    tree, done = _run_copy(tmp_path, "torch,viewr")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "unknown extra 'viewr'" in done.stderr and "viewer" in done.stderr, done.stderr
    assert not (tree / ".venv").exists()
