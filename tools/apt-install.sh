#!/usr/bin/env bash
# Install Debian packages that are not installed yet.
#
# Usage: tools/apt-install.sh [-f FILE] [PACKAGE...]
#   -f FILE  read package names from FILE, one per line ('#' comments and
#            blank lines are skipped); may be combined with PACKAGE arguments.
#
# Contract: when every package is already installed (dpkg -s says
# "install ok installed") it does nothing and needs no network. Otherwise it
# runs `apt-get update` once, then `apt-get install -y --no-install-recommends`
# for the missing ones only, non-interactively. It waits up to 10 minutes for
# another apt/dpkg run to release its locks. Needs root (or sudo).
set -euo pipefail

packages=()
while (($#)); do
    case "$1" in
        -f)
            [[ $# -ge 2 ]] || { echo "apt-install: -f needs a file" >&2; exit 2; }
            while IFS= read -r line || [[ -n "$line" ]]; do
                line="${line%%#*}"
                line="${line//[[:space:]]/}"
                [[ -n "$line" ]] && packages+=("$line")
            done <"$2"
            shift 2
            ;;
        -*)
            echo "apt-install: unknown option $1" >&2
            exit 2
            ;;
        *)
            packages+=("$1")
            shift
            ;;
    esac
done

missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg -s "$pkg" 2>/dev/null | grep -q '^Status: install ok installed$'; then
        missing+=("$pkg")
    fi
done
((${#missing[@]})) || exit 0

sudo=()
if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null; then
        sudo=(sudo)
    else
        echo "apt-install: need root to install: ${missing[*]}" >&2
        exit 1
    fi
fi

echo "apt-install: installing ${missing[*]}" >&2
lock=(-o DPkg::Lock::Timeout=600)
# DPkg::Lock::Timeout covers dpkg's lock; the lists lock of a concurrent
# `apt-get update` is not covered everywhere, so retry a few times.
for attempt in 1 2 3 4 5 6 7 8 9 10; do
    if "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "${lock[@]}" -q update </dev/null; then
        break
    fi
    if ((attempt == 10)); then
        echo "apt-install: apt-get update failed" >&2
        exit 1
    fi
    echo "apt-install: apt-get update failed (attempt $attempt), retrying in 15s" >&2
    sleep 15
done
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "${lock[@]}" -q install -y \
    --no-install-recommends "${missing[@]}" </dev/null
