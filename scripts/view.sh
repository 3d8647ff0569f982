#!/usr/bin/env bash
# Open c2dv (c2dataviewer) on the live chain's channels: the stitched object phase and
# an inference output. Usage:
#   bash scripts/view.sh [CHANNEL ...]      (default: stitch:1:output inference:1:output)
# Needs c2dv: pip install 'edge-ptychonn[viewer]'. Without a display it runs under
# xvfb-run when that exists (apt-get install xvfb), else set QT_QPA_PLATFORM=offscreen.
#
# Levels and rate: c2dv 1.15.4 has no command-line option for either. This script
# turns on its auto gain on the first frame (AUTOGAIN=ENABLED in a generated config),
# which suits the stitched phase: the stitcher only counts the well-lit centre of each
# patch, so no meaningless pixels set the levels. For an inference output channel,
# pick "Full IOC Rate" in the window (the default 5 Hz request reports missed frames)
# and type levels by hand if its unlit border saturates the auto gain. The stitched
# channel is published at 2 Hz by default, below the 5 Hz request: nothing is missed.
# Ctrl-C closes every viewer this script opened.
set -euo pipefail
cd "$(dirname "$0")/.."
channels=("$@")
[ ${#channels[@]} -eq 0 ] && channels=(stitch:1:output inference:1:output)

# Without EPICS settings of your own, look for the channels on this host only (loopback),
# where `edge-ptychonn launch` and the demo run the chain.
if [ -z "${EPICS_PVA_ADDR_LIST-}" ]; then
    export EPICS_PVA_AUTO_ADDR_LIST=NO EPICS_PVA_ADDR_LIST=127.0.0.1
fi

c2dv=$(command -v c2dv || true)
[ -z "$c2dv" ] && [ -x .venv/bin/c2dv ] && c2dv=.venv/bin/c2dv
if [ -z "$c2dv" ]; then
    echo "view.sh: c2dv not found; install it with: pip install 'edge-ptychonn[viewer]'" >&2
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

tmp=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$tmp"
}
trap cleanup EXIT INT TERM
for channel in "${channels[@]}"; do
    cfg="$tmp/${channel//[:\/]/_}.cfg"
    printf '[DEFAULT]\nAPP=IMAGE\n\n[IMAGE]\nSECTION=ADIMAGE\n\n[ADIMAGE]\nPV=%s\nSCALE=1.0\nAUTOGAIN=ENABLED\n' "$channel" > "$cfg"
    "${wrap[@]}" "$c2dv" --app image --config "$cfg" &
    pids+=($!)
    echo "c2dv on $channel (pid $!)"
done
wait
