#!/usr/bin/env bash
# Create or update .venv with the project and its pinned dependencies.
# Usage: scripts/setup-venv.sh [EXTRAS]   (default extras: torch,test,codecs)
# Installs Debian's iproute2 (for 'ip link set lo multicast on') when missing and run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-torch,test,codecs}"

if ! command -v ip >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing iproute2 (for multicast on the loopback interface)" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null
    else
        echo "warning: the 'ip' command is missing (Debian package iproute2); multi-consumer runs may not connect" >&2
    fi
fi

python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "Python >= 3.10 is required" >&2; exit 1; }
[ -x .venv/bin/python ] || "$python" -m venv .venv

# Reinstall only when the dependency pins or the extras change.
stamp=".venv/.edge-ptychonn-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $extras"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "installing edge-ptychonn[$extras] into .venv (pinned versions) ..." >&2
    .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip==25.3
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$extras]"
    echo "$want" > "$stamp"
fi
