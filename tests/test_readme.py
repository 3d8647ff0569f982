"""The README's beamline, configure and chaining commands, run as written with only
the channel names (and the saver's folder) changed, from another directory."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge_ptychonn.tools.processes import OutputCollector, sim_server_argv, start, wait_status
from channel_names import PREFIX

pytestmark = pytest.mark.e2e
README = Path(__file__).resolve().parent.parent / "README.md"
START_DELAY_S = 15.0  # four consumers load the shipped model on two cores


def readme_block(marker: str) -> str:
    """The first fenced block after ``<!-- marker: ... -->``, comments and c2dv lines left out."""
    text = README.read_text()
    match = re.search(rf"<!-- {marker}:.*?-->\s*```bash\n(.*?)```", text, re.S)
    assert match, f"README has no block marked {marker}"
    lines = [line for line in match.group(1).splitlines() if not line.startswith(("#", "c2dv "))]
    return "\n".join(lines)


def test_readme_commands_run_as_written(pva_env, procs, tmp_path):
    image, prefix = f"{PREFIX}:readme:image", f"{PREFIX}:readme:inference"
    env = dict(pva_env, PATH=os.pathsep.join([str(Path(sys.executable).parent), pva_env.get("PATH", "")]))
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()

    def rename(command: str) -> str:
        return command.replace("13SIM1:Pva1:Image", image).replace("inference:", f"{prefix}:")

    beamline = rename(readme_block("beamline-command"))
    consumers = start("consumers", ["bash", "-c", beamline], env, tmp_path, cwd=workdir)
    procs.append(consumers)
    saved = tmp_path / "phase"
    saver = start("saver", ["bash", "-c", rename(readme_block("chaining-commands")).replace("/tmp/phase", str(saved))],
                  env, tmp_path, cwd=workdir)
    procs.append(saver)
    n = 40
    np.save(tmp_path / "scan.npy", np.random.default_rng(9).poisson(20, (n, 128, 128)).astype(np.int16))
    procs.append(start("sim", sim_server_argv(tmp_path / "scan.npy", image, fps=20, start_delay_s=START_DELAY_S),
                       env, tmp_path))
    outputs = [f"{prefix}:{i}:output" for i in (1, 2, 3, 4)]
    collector = OutputCollector(outputs, keep_images=False)
    try:
        assert collector.wait_connected(START_DELAY_S - 2), consumers.log()[-3000:]
        got = collector.wait_count(n, timeout_s=START_DELAY_S + 40, idle_s=15)
        import subprocess

        configure = rename(readme_block("configure-command"))
        done = subprocess.run(["bash", "-c", configure], env=env, cwd=workdir, capture_output=True, text=True, timeout=30)
        # status records refresh every report period: poll until they have caught up
        statuses = wait_status([f"{prefix}:{i}:status" for i in (1, 2, 3, 4)],
                               lambda rs: sum(r["userStats"]["nFramesProcessed"] for r in rs) == n, timeout_s=20)
    finally:
        collector.close()
    assert got == n, consumers.log()[-3000:]
    assert sorted(r.unique_id for name in outputs for r in collector.received[name]) == list(range(1, n + 1))
    assert done.returncode == 0 and "Configuration successful" in done.stdout, (done.stdout, done.stderr)
    assert all(r and r["userStats"]["engine"] for r in statuses), statuses
    assert sum(r["userStats"]["nFramesProcessed"] for r in statuses) == n
    # the saver wrote one file per frame of consumer 1
    ids_1 = sorted(r.unique_id for r in collector.received[outputs[0]])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(list(saved.glob("*.tiff"))) < len(ids_1):
        time.sleep(0.2)
    assert sorted(int(f.name.split(".")[0]) for f in saved.glob("*.tiff")) == ids_1, saver.log()[-3000:]
