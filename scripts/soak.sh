#!/usr/bin/env bash
# The soak run (not part of the test suite): 10 minutes at a steady rate through live
# consumers; exits 0 when nothing was lost and memory stayed flat.
# Extra arguments go to 'edge-ptychonn soak' (see --help), e.g. --fps 110 --minutes 10; it runs in
# the directory you call this from, so a relative --model is taken from there.
set -euo pipefail
here=$PWD
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh torch,codecs
root=$PWD
cd "$here"
exec "$root/.venv/bin/edge-ptychonn" soak "$@"
