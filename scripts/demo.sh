#!/usr/bin/env bash
# The demo command: set up .venv (pinned), then replay the held-out simulated scan through
# two live PtychoNN consumers with the shipped model and print the summary and accuracy.
# Extra arguments go to 'edge-ptychonn demo' (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh torch,codecs
# No EPICS exports needed: the demo sets the loopback-only settings (edge_ptychonn.tools.processes.LOOPBACK_ENV)
# in its own process before any PVA channel, and in every process it starts.
exec .venv/bin/edge-ptychonn demo "$@"
