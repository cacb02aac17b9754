#!/usr/bin/env bash
# Install the reference mail servers the benchmarks compare against (Postfix,
# Dovecot IMAP/POP3) without ever letting them serve on this machine's ports.
#
# Contract:
# - Postfix is preseeded with "No configuration", so it gets no main.cf and
#   asks no questions; everything runs with DEBIAN_FRONTEND=noninteractive.
# - While installing, a temporary /usr/sbin/policy-rc.d forbids starting any
#   service (an existing policy-rc.d is kept and restored).
# - Afterwards the system services are stopped and masked/disabled (systemd
#   units including dovecot.socket, and the SysV links), so they do not start at
#   boot either. Benchmarks run their own instances with their own config
#   directories (`postfix -c DIR`, `dovecot -c FILE`) on loopback ports.
# - Idempotent: a second run installs nothing and only re-checks the services.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

if [[ $(id -u) -ne 0 ]]; then
    echo "bench-deps: must run as root" >&2
    exit 1
fi

packages=(postfix dovecot-imapd dovecot-pop3d)
missing=()
for pkg in "${packages[@]}"; do
    dpkg -s "$pkg" 2>/dev/null | grep -q '^Status: install ok installed$' || missing+=("$pkg")
done

if ((${#missing[@]})); then
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    policy=/usr/sbin/policy-rc.d
    backup=""
    if [[ -e $policy ]]; then
        backup=$(mktemp)
        cp -p "$policy" "$backup"
    fi
    restore_policy() {
        if [[ -n "$backup" ]]; then
            mv -f "$backup" "$policy"
        else
            rm -f "$policy"
        fi
    }
    trap restore_policy EXIT
    printf '#!/bin/sh\n# temporary, from mailharbor tools/bench-deps.sh\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    "$here/apt-install.sh" "${missing[@]}"
    restore_policy
    trap - EXIT
fi

units=(postfix.service postfix@-.service dovecot.service dovecot.socket)
if [[ -d /run/systemd/system ]]; then
    systemctl stop "${units[@]}" 2>/dev/null || true
fi
if command -v systemctl >/dev/null; then
    # mask works without a running systemd: it only writes symlinks
    systemctl mask "${units[@]}" >/dev/null 2>&1 || true
fi
for svc in postfix dovecot; do
    if [[ -x /etc/init.d/$svc ]]; then
        /etc/init.d/$svc stop >/dev/null 2>&1 || true
        update-rc.d "$svc" disable >/dev/null 2>&1 || true
    fi
done
# A Postfix or Dovecot master left running from before is stopped too.
for prog in /usr/lib/postfix/sbin/master /usr/sbin/dovecot; do
    pids=$(pgrep -x -f "$prog.*" 2>/dev/null || true)
    for pid in $pids; do
        # only the system instance: no private -c config
        if ! tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -q -- ' -c '; then
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done
done

echo "bench-deps: postfix $(dpkg-query -W -f='${Version}' postfix)," \
    "dovecot $(dpkg-query -W -f='${Version}' dovecot-core); system services stopped and disabled"
