#!/usr/bin/env bash
# `make run`: a demo node on loopback. Creates run/demo once (config, data, certificate, a demo
# domain and account with a generated password), prints what a user needs, then serves in the
# foreground until Ctrl-C. Today that is one node with its store, its SMTP, IMAP and POP3
# listeners on loopback and its admin socket; the peer and the witness join as their issues land.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DIR=${DEMO_DIR:-run/demo}
HOST=${DEMO_HOSTNAME:-localhost}
CFG=$DIR/mailharbor.toml
DOMAIN=example.test
USER=demo@$DOMAIN
PWFILE=$DIR/demo-password

MX_PORT=${DEMO_MX_PORT:-2525}
SUB_PORT=${DEMO_SUBMISSION_PORT:-2587}
SUBS_PORT=${DEMO_SUBMISSIONS_PORT:-2465}
IMAP_PORT=${DEMO_IMAP_PORT:-2143}
IMAPS_PORT=${DEMO_IMAPS_PORT:-2993}
POP3_PORT=${DEMO_POP3_PORT:-2110}
POP3S_PORT=${DEMO_POP3S_PORT:-2995}
if [ ! -f "$CFG" ]; then
    "$BIN/mailharbor" init "$DIR" --hostname "$HOST"
    # The demo listens on loopback only, on unprivileged ports.
    sed -i -e "s|^# mx = \[\]|mx = [\"127.0.0.1:$MX_PORT\"]|" \
        -e "s|^# submission = \[\]|submission = [\"127.0.0.1:$SUB_PORT\"]|" \
        -e "s|^# submissions = \[\]|submissions = [\"127.0.0.1:$SUBS_PORT\"]|" "$CFG"
fi
# POP3 on loopback (also added to a demo config made before POP3 existed).
grep -q '^\[pop3\]' "$CFG" || printf '\n[pop3]\n' >>"$CFG"
if ! sed -n '/^\[pop3\]/,/^\[/p' "$CFG" | grep -q '^listen = '; then
    sed -i "/^\[pop3\]/a listen = [\"127.0.0.1:$POP3_PORT\"]\nlisten_tls = [\"127.0.0.1:$POP3S_PORT\"]" "$CFG"
fi
# IMAP (also added to a demo config made before IMAP existed; only the commented defaults change).
sed -i -e "/^\[imap\]/,/^\[/ s|^# listen = \[\]|listen = [\"127.0.0.1:$IMAP_PORT\"]|" \
    -e "/^\[imap\]/,/^\[/ s|^# listen_tls = \[\]|listen_tls = [\"127.0.0.1:$IMAPS_PORT\"]|" "$CFG"
if [ ! -f "$PWFILE" ]; then
    "$BIN/mailharbor" domain list --config "$CFG" | grep -qx "$DOMAIN" \
        || "$BIN/mailharbor" domain add "$DOMAIN" --config "$CFG"
    pw=$("$BIN/python" -c 'import secrets; print(secrets.token_urlsafe(12))')
    printf '%s\n' "$pw" | "$BIN/mailharbor" account add "$USER" --password-stdin --config "$CFG"
    umask 077
    printf '%s\n' "$pw" > "$PWFILE"
fi
cat <<INFO

  mailharbor demo node ($DIR)
  config:        $CFG
  demo account:  $USER
  password:      $(cat "$PWFILE")   (also in $PWFILE)
  SMTP (MX):     $(sed -n 's/^mx = //p' "$CFG")
  submission:    $(sed -n 's/^submission = //p' "$CFG") (STARTTLS, then AUTH PLAIN/LOGIN)
  submissions:   $(sed -n 's/^submissions = //p' "$CFG") (implicit TLS)
  IMAP:          127.0.0.1:$IMAP_PORT (STARTTLS, then LOGIN/AUTHENTICATE PLAIN)
  IMAPS:         127.0.0.1:$IMAPS_PORT (implicit TLS; self-signed certificate)
  POP3:          127.0.0.1:$POP3_PORT (STLS, then USER/PASS or AUTH PLAIN), 127.0.0.1:$POP3S_PORT (implicit TLS)
  e.g.           swaks --server 127.0.0.1:$MX_PORT --to $USER
                 openssl s_client -quiet -connect 127.0.0.1:$POP3S_PORT   (then USER/PASS/LIST/RETR)
  try:           $BIN/mailharbor status --config $CFG
                 $BIN/mailharbor account list --config $CFG
  (the peer node and the witness arrive with the replication and cluster issues)
  Ctrl-C stops the node.

INFO
exec "$BIN/mailharbor" serve --config "$CFG"
