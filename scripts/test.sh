#!/usr/bin/env bash
# The test command: set up .venv (pinned) and run the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k e2e
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh torch,test,codecs,bench
# Loopback-only EPICS settings for every PVA process the tests start (the tests set them too).
export EPICS_PVA_AUTO_ADDR_LIST=NO EPICS_PVA_ADDR_LIST=127.0.0.1 \
       EPICS_PVAS_AUTO_BEACON_ADDR_LIST=NO EPICS_PVAS_BEACON_ADDR_LIST=127.0.0.1 \
       EPICS_PVAS_INTF_ADDR_LIST=127.0.0.1
exec .venv/bin/python -m pytest -q -ra "$@"
