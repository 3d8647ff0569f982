"""The project installed without -e (built and installed into a fresh folder) finds its
shipped model, and a real consumer from that install runs it without ``modelPath``."""

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from edge_ptychonn.tools.processes import OutputCollector, consumer_argv, sim_server_argv, start, wait_status
from channel_names import PREFIX

ROOT = Path(__file__).resolve().parent.parent
# what a source tree holds besides the project: never copied into the build
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "generated", "plans", "results",
                                    "__pycache__", ".pytest_cache", "tests")


def test_every_package_of_the_tree_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for top in ("edge_ptychonn", "engines", "processors")
        for p in (ROOT / top).rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert found | {"edge_ptychonn.data"} == listed, "list new package folders in pyproject's [tool.setuptools]"


def _pins(lines) -> dict[str, str]:
    """``name==version`` (pip) and ``name=version`` (conda) requirements -> {lower-case name: version}."""
    pins = {}
    for line in lines:
        req = line.split("#")[0].strip().lstrip("-").strip()
        name, sep, version = req.partition("==") if "==" in req else req.partition("=")
        if sep and name and not name.startswith(("python", "name", "-e")):
            pins[name.strip().lower()] = version.strip()
    return pins


def test_the_conda_environment_pins_what_pyproject_pins():
    """environment.yml (beamline GPU hosts: every engine, the viewer, codecs, HDF5) pins each package
    as pyproject.toml does, and lists every package of those extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = _pins(project["dependencies"] + [r for e in ("torch", "gpu", "viewer", "codecs", "hdf5") for r in extras[e]])
    conda = _pins((ROOT / "environment.yml").read_text().splitlines())
    assert {name: conda.get(name) for name in wanted} == wanted
    assert conda.get("bitshuffle") == "0.5.2"  # the codecs extra's bslz4 decoder


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """``pip install --no-deps --target DIR`` of a copy of this tree (a wheel build, not editable)."""
    tmp = tmp_path_factory.mktemp("install")
    src, target = tmp / "src", tmp / "site"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "--target", str(target), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return target


def _env(installed: Path, base: dict | None = None) -> dict:
    """Only the install on the path (ahead of this checkout's editable install, if any)."""
    return {**(base or os.environ), "PYTHONPATH": str(installed)}


def test_installed_project_finds_the_shipped_model(installed, tmp_path):
    code = (
        "import edge_ptychonn\n"
        "from edge_ptychonn.model_card import default_model_path, load_card\n"
        "path = default_model_path()\n"
        "print(edge_ptychonn.__file__)\nprint(path)\nprint(load_card(path).preprocess.transform)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env=_env(installed), timeout=60)
    assert done.returncode == 0, done.stderr
    package, model, transform = done.stdout.split()
    assert Path(package).is_relative_to(installed)
    assert Path(model) == installed / "edge_ptychonn" / "data" / "ptychonn.onnx" and Path(model).is_file()
    assert Path(model).read_bytes() == (ROOT / "data" / "ptychonn.onnx").read_bytes()
    assert transform == "sqrt"


@pytest.mark.e2e
def test_a_consumer_from_the_install_runs_the_default_model(installed, pva_env, tmp_path):
    n_frames, prefix, channel = 11, f"{PREFIX}:install", f"{PREFIX}:install:image"
    frames = np.random.default_rng(11).poisson(200, (n_frames, 128, 128)).astype(np.int16)  # the shipped model's size
    np.save(tmp_path / "scan.npy", frames)
    env = _env(installed, pva_env)
    procs = [start("consumer", consumer_argv(channel, prefix, 1, "processors.ptychonn.PtychoNNProcessor",
                                             {"engine": "onnxruntime", "cpuThreads": 1}), env, tmp_path)]
    collector = None
    try:
        procs.append(start("sim-server", sim_server_argv(tmp_path / "scan.npy", channel, 20.0, start_delay_s=7.0),
                           env, tmp_path))
        collector = OutputCollector([f"{prefix}:1:output"])
        assert collector.wait_connected(6.0), procs[0].log()[-3000:]
        got = collector.wait_count(n_frames, timeout_s=60.0, idle_s=15.0)
        status = wait_status([f"{prefix}:1:status"],
                             lambda rs: rs[0]["userStats"]["nFramesProcessed"] >= n_frames)[0]
    finally:
        if collector is not None:
            collector.close()
        for proc in reversed(procs):
            proc.stop()
    assert got == n_frames, procs[0].log()[-3000:]
    images = [r.image for r in collector.received[f"{prefix}:1:output"]]
    assert all(im.shape == (128, 128) and np.isfinite(im).all() for im in images)
    assert status["userStats"]["nFramesProcessed"] == n_frames
