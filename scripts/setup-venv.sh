#!/usr/bin/env bash
# Create or update .venv with the project and its pinned dependencies.
# Usage: scripts/setup-venv.sh [EXTRAS]   (comma-separated extras of pyproject.toml; default:
# torch,test,codecs; extras installed before are kept)
# Installs Debian's iproute2 (for 'ip link set lo multicast on') and python3.N-venv (for
# 'python3 -m venv') when missing and run as root, and with the viewer extra Xvfb and Qt's xcb libraries.
set -euo pipefail
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sed -n '2,6s/^# \{0,1\}//p' "$0"
    exit 0
fi
cd "$(dirname "$0")/.."
extras="${1:-torch,test,codecs}"
# Each extra must be one of pyproject.toml's: pip only warns about an unknown one (a typo), and it
# would be recorded below as installed.
known="$(sed -n '/^\[project.optional-dependencies\]/,/^\[/s/^\([a-z0-9_-]*\) = \[.*/\1/p' pyproject.toml | paste -sd, -)"
for extra in ${extras//,/ }; do
    if [[ ",$known," != *",$extra,"* ]]; then
        echo "setup-venv.sh: unknown extra '$extra'; the extras are $known (comma-separated, e.g. torch,test,codecs)" >&2
        exit 2
    fi
done

if ! command -v ip >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing iproute2 (for multicast on the loopback interface)" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null
    else
        echo "warning: the 'ip' command is missing (Debian package iproute2); multi-consumer runs may not connect" >&2
    fi
fi

# The viewer extra (c2dv, Qt) draws on an X display: Xvfb for machines without one, and the
# Qt xcb platform's libraries, which the PyQt5 wheel does not ship.
if [[ ",$extras," == *",viewer,"* ]]; then
    viewer_debs=(xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-image0 libxcb-render-util0
                 libxcb-randr0 libxcb-shape0 libxcb-xkb1 libxkbcommon-x11-0)
    missing=()
    for deb in "${viewer_debs[@]}"; do
        dpkg-query -W -f='${Status}' "$deb" 2>/dev/null | grep -q "install ok installed" || missing+=("$deb")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            echo "installing ${missing[*]} (Xvfb and Qt's xcb libraries, for the viewer)" >&2
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
        else
            echo "warning: the viewer needs Debian packages ${missing[*]} (apt-get install as root); its test is skipped without them" >&2
        fi
    fi
fi

python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "Python >= 3.10 is required" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
    # 'python3 -m venv' installs pip with ensurepip, which Debian and Ubuntu ship apart (python3.N-venv,
    # missing on a fresh machine): without it venv fails half-way and leaves a .venv without pip.
    if ! "$python" -c 'import ensurepip' 2>/dev/null; then
        venv_deb="python$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv"
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            echo "installing $venv_deb (for 'python3 -m venv')" >&2
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$venv_deb" >/dev/null || true
        fi
        if ! "$python" -c 'import ensurepip' 2>/dev/null; then
            echo "$python cannot make a virtual environment with pip: its ensurepip is missing (Debian/Ubuntu: apt-get install $venv_deb)" >&2
            exit 1
        fi
    fi
    made_here=$([ -e .venv ] || echo 1)
    # a venv that failed half-way would pass for made at the next run: removed, unless .venv was there before
    "$python" -m venv .venv || { [ -z "$made_here" ] || rm -rf .venv; echo "'$python -m venv .venv' failed" >&2; exit 1; }
fi

# Install only when the dependency pins change or an extra is asked for that is not installed
# yet; the extras installed before are kept (the demo's and the tests' sets in turn install once).
stamp=".venv/.edge-ptychonn-installed"
pins="$(sha256sum pyproject.toml | cut -d' ' -f1)"
had_pins="" had_extras=""
[ -f "$stamp" ] && read -r had_pins had_extras < "$stamp"
all="$(printf '%s\n' ${had_extras//,/ } ${extras//,/ } | sort -u | paste -sd, -)"
if [ "$had_pins" != "$pins" ] || [ "$all" != "$(printf '%s\n' ${had_extras//,/ } | sort -u | paste -sd, -)" ]; then
    echo "installing edge-ptychonn[$all] into .venv (pinned versions) ..." >&2
    .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip==25.3
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$all]"
    echo "$pins $all" > "$stamp"
fi
