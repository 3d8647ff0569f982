#!/usr/bin/env bash
# The demo command: set up .venv (pinned), then replay the held-out simulated scan through the live
# chain, started by 'edge-ptychonn launch': two PtychoNN consumers with the shipped model, the live
# stitcher and two HDF5 writers; it prints a status line each second, then the summary, the accuracy
# of the live stitched phase and the path of its PNG beside the truth (in results/demo/).
# Extra arguments go to 'edge-ptychonn demo' (see --help); it runs in the directory you call this
# from, so relative paths (--scan, --model, --out) are taken from there.
set -euo pipefail
here=$PWD
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh torch,codecs,hdf5
root=$PWD
cd "$here"
# No EPICS exports needed: the demo sets the loopback-only settings (edge_ptychonn.tools.processes.LOOPBACK_ENV)
# in its own process before any PVA channel, and in every process it starts.
exec "$root/.venv/bin/edge-ptychonn" demo "$@"
