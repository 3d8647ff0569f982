#!/usr/bin/env bash
# The demo command: set up .venv (pinned), then replay the held-out simulated scan through
# two live PtychoNN consumers with the shipped model and print the summary and accuracy.
# Extra arguments go to 'edge-ptychonn demo' (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh torch,codecs
export EPICS_PVA_AUTO_ADDR_LIST=NO EPICS_PVA_ADDR_LIST=127.0.0.1 \
       EPICS_PVAS_AUTO_BEACON_ADDR_LIST=NO EPICS_PVAS_BEACON_ADDR_LIST=127.0.0.1 \
       EPICS_PVAS_INTF_ADDR_LIST=127.0.0.1
exec .venv/bin/edge-ptychonn demo "$@"
