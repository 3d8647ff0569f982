#!/usr/bin/env bash
# The soak run (not part of the test suite): 10 minutes at a steady rate through live
# consumers; exits 0 when nothing was lost and memory stayed flat.
# Extra arguments go to 'edge-ptychonn soak' (see --help), e.g. --fps 110 --minutes 10.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh torch,codecs
exec .venv/bin/edge-ptychonn soak "$@"
