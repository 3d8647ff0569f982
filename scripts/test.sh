#!/usr/bin/env bash
# The test command: set up .venv (pinned) and run the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k e2e. The 15 slowest tests are listed at the
# end: the suite must stay under 15 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh torch,test,codecs,bench,viewer
# No EPICS exports needed: tests/conftest.py sets the loopback-only settings
# (edge_ptychonn.tools.processes.LOOPBACK_ENV) before any test runs; started processes inherit them.
exec .venv/bin/python -m pytest -q -ra --durations=15 "$@"
