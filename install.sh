#!/usr/bin/env bash
# Install kmodd on a Debian/Ubuntu machine, as root: its runtime dependencies from apt,
# the Python package in /opt/kmodd (a venv, so the system's Python stays untouched),
# and the commands on PATH.  Usage: ./install.sh [--uninstall]
set -euo pipefail
cd "$(dirname "$0")"
PREFIX=/opt/kmodd
BIN=/usr/local/sbin

if [[ ${1:-} == --uninstall ]]; then
    rm -f "$BIN/kmodctl"
    rm -rf "$PREFIX"
    echo "kmodd uninstalled (state in /var/lib/kmodd kept)" >&2
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends python3-venv kmod make gcc xz-utils zstd >/dev/null

python3 -m venv "$PREFIX"
"$PREFIX/bin/pip" install --quiet --upgrade pip
"$PREFIX/bin/pip" install --quiet .
ln -sf "$PREFIX/bin/kmodctl" "$BIN/kmodctl"
echo "kmodd installed: $("$BIN/kmodctl" --version)" >&2
