#!/usr/bin/env bash
# Open c2dv (c2dataviewer) windows on the live chain's channels, at full rate, with the phase
# levels of the model card (0 .. 1.5 rad for the shipped model). Usage:
#   bash scripts/view.sh [CHANNEL ...] [edge-ptychonn view options]
#        (default channels: stitch:1:output inference:1:output; see: bash scripts/view.sh --help)
# It runs 'edge-ptychonn view' (the viewer extra: pip install 'edge-ptychonn[viewer]';
# scripts/setup-venv.sh torch,viewer installs it). Without a display it runs under xvfb-run
# when that exists (apt-get install xvfb), else with QT_QPA_PLATFORM=offscreen (nothing visible).
# Ctrl-C closes every window. It runs in the directory you call this from (a relative --model is
# taken from there).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

tool=$(command -v edge-ptychonn || true)
[ -x "$root/.venv/bin/edge-ptychonn" ] && tool="$root/.venv/bin/edge-ptychonn"
if [ -z "$tool" ]; then
    echo "view.sh: edge-ptychonn not found; run: bash scripts/setup-venv.sh torch,viewer" >&2
    exit 2
fi
wrap=()
if [ -z "${DISPLAY:-}" ] && [ -z "${QT_QPA_PLATFORM:-}" ]; then
    if command -v xvfb-run >/dev/null; then
        wrap=(xvfb-run -a)
    else
        echo "view.sh: no DISPLAY and no xvfb-run; using QT_QPA_PLATFORM=offscreen (nothing visible)" >&2
        export QT_QPA_PLATFORM=offscreen
    fi
fi
exec ${wrap[@]+"${wrap[@]}"} "$tool" view "$@"  # (an empty array under set -u fails before bash 4.4)
