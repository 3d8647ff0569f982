#!/usr/bin/env bash
# The demo command: set up .venv (pinned), then replay the held-out simulated scan through the live
# chain, started by 'edge-ptychonn launch': two PtychoNN consumers with the shipped model, the live
# stitcher and two HDF5 writers; it prints a status line each second, then the summary, the accuracy
# of the live stitched phase and the path of its PNG beside the truth (in results/demo/).
# Extra arguments go to 'edge-ptychonn demo' (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh torch,codecs,hdf5
# No EPICS exports needed: the demo sets the loopback-only settings (edge_ptychonn.tools.processes.LOOPBACK_ENV)
# in its own process before any PVA channel, and in every process it starts.
exec .venv/bin/edge-ptychonn demo "$@"
