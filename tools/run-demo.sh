#!/usr/bin/env bash
# `make run`: a demo node on loopback. Creates run/demo once (config, data, certificate, a demo
# domain and account with a generated password), prints what a user needs, then serves in the
# foreground until Ctrl-C. Today that is one node with its store and admin socket; the mail
# listeners, the peer and the witness join as their issues land.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DIR=${DEMO_DIR:-run/demo}
HOST=${DEMO_HOSTNAME:-localhost}
CFG=$DIR/mailharbor.toml
DOMAIN=example.test
USER=demo@$DOMAIN
PWFILE=$DIR/demo-password

if [ ! -f "$CFG" ]; then
    "$BIN/mailharbor" init "$DIR" --hostname "$HOST"
fi
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
  try:           $BIN/mailharbor status --config $CFG
                 $BIN/mailharbor account list --config $CFG
  (SMTP/IMAP/POP3 listeners, the peer node and the witness arrive with their issues)
  Ctrl-C stops the node.

INFO
exec "$BIN/mailharbor" serve --config "$CFG"
