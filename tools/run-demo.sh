#!/usr/bin/env bash
# `make run`: a demo cluster on loopback — two nodes (a, b) and a witness, replication protocol C,
# the cluster manager and proxy mode. Creates run/demo once (two node directories sharing one
# service certificate, a witness, a pair secret, a demo domain and account with a generated
# password), starts the witness and both nodes in the background, prints the endpoints of both
# nodes and the demo account, and runs until Ctrl-C (or SIGTERM), which stops all three
# processes (TERM, then KILL after DEMO_STOP_TIMEOUT seconds): nothing is left running.
#
# Node a starts as the pair's first node (UpToDate, holds the demo account); b starts empty and
# syncs from it. The cluster's decision loop makes a primary; the other node's mail ports
# forward to it with PROXY v2 (from 127.0.0.2 / 127.0.0.3, which the peer trusts), so either
# node's ports reach the service. A node that self-fences (exit 75) is restarted, as a supervisor
# would; any other exit stops the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$PWD/.venv/bin
DIR=${DEMO_DIR:-run/demo}
HOST=${DEMO_HOSTNAME:-localhost}
DOMAIN=example.test
USER=demo@$DOMAIN
PWFILE=$DIR/demo-password
STOP_TIMEOUT=${DEMO_STOP_TIMEOUT:-20}

# Ports: node a on 2xxx, node b on 3xxx (the same last digits), the witness on UDP 2799.
declare -A PORT=(
    [a_mx]=2525 [a_sub]=2587 [a_subs]=2465 [a_imap]=2143 [a_imaps]=2993 [a_pop3]=2110
    [a_pop3s]=2995 [a_repl]=2700 [a_hb1]=2701 [a_hb2]=2702
    [b_mx]=3525 [b_sub]=3587 [b_subs]=3465 [b_imap]=3143 [b_imaps]=3993 [b_pop3]=3110
    [b_pop3s]=3995 [b_repl]=3700 [b_hb1]=3701 [b_hb2]=3702
)
WITNESS_PORT=2799
declare -A SOURCE=([a]=127.0.0.2 [b]=127.0.0.3) # each node's forwarder's source address
declare -A PEER=([a]=b [b]=a)

# set_keys FILE SECTION 'key = value'...: add keys right after the [SECTION] header (the
# template only has them commented out).
set_keys() {
    "$BIN/python" - "$@" <<'PY'
import sys
path, section, *lines = sys.argv[1:]
text = open(path, encoding="utf-8").read()
header = f"\n[{section}]\n"
assert text.count(header) == 1, f"{path}: no single [{section}]"
open(path, "w", encoding="utf-8").write(text.replace(header, header + "".join(l + "\n" for l in lines)))
PY
}

node_id() { sed -n 's/^node_id = "\(.*\)"$/\1/p' "$DIR/$1/mailharbor.toml"; }

create() {
    mkdir -p "$DIR"
    umask 077
    [ -f "$DIR/secret" ] || "$BIN/python" -c 'import secrets; print(secrets.token_hex(24))' >"$DIR/secret"
    for n in a b; do
        [ -f "$DIR/$n/mailharbor.toml" ] || "$BIN/mailharbor" init "$DIR/$n" --hostname "$HOST" --name "$n" >/dev/null
    done
    # One service certificate for both nodes (clients may reach either).
    cp "$DIR/a/tls/cert.pem" "$DIR/a/tls/key.pem" "$DIR/b/tls/"
    local ida idb
    ida=$(node_id a)
    idb=$(node_id b)
    for n in a b; do
        local p=${PEER[$n]} cfg=$DIR/$n/mailharbor.toml role=secondary
        [ "$n" = a ] && role=primary
        local trust="trusted_proxies = [\"${SOURCE[$p]}\"]"
        set_keys "$cfg" smtp "mx = [\"127.0.0.1:${PORT[${n}_mx]}\"]" \
            "submission = [\"127.0.0.1:${PORT[${n}_sub]}\"]" \
            "submissions = [\"127.0.0.1:${PORT[${n}_subs]}\"]" "$trust"
        set_keys "$cfg" imap "listen = [\"127.0.0.1:${PORT[${n}_imap]}\"]" \
            "listen_tls = [\"127.0.0.1:${PORT[${n}_imaps]}\"]" "$trust"
        set_keys "$cfg" pop3 "listen = [\"127.0.0.1:${PORT[${n}_pop3]}\"]" \
            "listen_tls = [\"127.0.0.1:${PORT[${n}_pop3s]}\"]" "$trust"
        set_keys "$cfg" replication "peer = \"127.0.0.1:${PORT[${p}_repl]}\"" \
            "listen = \"127.0.0.1:${PORT[${n}_repl]}\"" "secret_file = \"../secret\"" \
            "protocol = \"C\"" "role = \"$role\"" "fencing = \"resource-only\""
        local routes="" s
        for s in mx sub subs imap imaps pop3 pop3s; do
            routes+="[\"127.0.0.1:${PORT[${n}_$s]}\", \"127.0.0.1:${PORT[${p}_$s]}\"], "
        done
        local pid=$ida
        [ "$n" = a ] && pid=$idb
        set_keys "$cfg" cluster "name = \"mh-demo\"" \
            "links = [[\"127.0.0.1:${PORT[${n}_hb1]}\", \"127.0.0.1:${PORT[${p}_hb1]}\"], [\"127.0.0.1:${PORT[${n}_hb2]}\", \"127.0.0.1:${PORT[${p}_hb2]}\"]]" \
            "peer_node_id = \"$pid\"" "peer_name = \"$p\"" "witness = \"127.0.0.1:$WITNESS_PORT\"" \
            "preferred = \"$ida\"" "proxy = [${routes%, }]" "proxy_source = \"${SOURCE[$n]}\""
    done
    mkdir -p "$DIR/witness"
    cat >"$DIR/witness/witness.toml" <<TOML
listen = "127.0.0.1:$WITNESS_PORT"
state_dir = "state"

[[pair]]
name = "mh-demo"
nodes = ["$ida", "$idb"]
secret_file = "../secret"
TOML
    # The demo account, on node a (the pair's first node; b receives it by replication).
    "$BIN/mailharbor" domain add "$DOMAIN" --config "$DIR/a/mailharbor.toml" >/dev/null
    "$BIN/python" -c 'import secrets; print(secrets.token_urlsafe(12))' >"$PWFILE.new"
    "$BIN/mailharbor" account add "$USER" --password-stdin --config "$DIR/a/mailharbor.toml" \
        <"$PWFILE.new" >/dev/null
    mv "$PWFILE.new" "$PWFILE"
    touch "$DIR/.created"
}

if [ ! -f "$DIR/.created" ]; then
    if [ -f "$DIR/mailharbor.toml" ] && [ ! -e "$DIR.single-node" ]; then
        # The single-node demo of earlier versions: kept, moved aside.
        mv "$DIR" "$DIR.single-node"
        echo "run-demo: the earlier single-node demo was moved to $DIR.single-node"
    fi
    if [ -f "$DIR/mailharbor.toml" ]; then
        echo "run-demo: $DIR holds an older single-node demo; move it away (or set DEMO_DIR)" >&2
        exit 1
    fi
    if [ -e "$DIR/a" ] || [ -e "$DIR/b" ]; then
        echo "run-demo: $DIR is half made (a previous run was interrupted); remove it and retry" >&2
        exit 1
    fi
    create
fi

declare -A PID=()
LOGS=$DIR/logs
mkdir -p "$LOGS"

start() { # start NAME: the witness or a node, in the background, its log in $LOGS/NAME.log
    if [ "$1" = witness ]; then
        "$BIN/mailharbor" witness --config "$DIR/witness/witness.toml" >>"$LOGS/witness.log" 2>&1 &
    else
        "$BIN/mailharbor" serve --config "$DIR/$1/mailharbor.toml" >>"$LOGS/$1.log" 2>&1 &
    fi
    PID[$1]=$!
}

# running PID: the process exists and is not a zombie (exited, not yet reaped).
running() {
    local st
    st=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [ -n "$st" ] && [ "${st:0:1}" != Z ]
}

stopping=0
stop_all() {
    [ "$stopping" = 1 ] && return
    stopping=1
    trap '' INT TERM HUP
    echo
    echo "run-demo: stopping the nodes and the witness..."
    local name pids=()
    for name in "${!PID[@]}"; do
        pids+=("${PID[$name]}")
    done
    [ ${#pids[@]} -gt 0 ] || return 0
    # The reporter's status command too (a child of the reporter, not of this script).
    [ -n "${PID[reporter]:-}" ] && pkill -TERM -P "${PID[reporter]}" 2>/dev/null || true
    kill -TERM "${pids[@]}" 2>/dev/null || true
    local deadline=$((SECONDS + STOP_TIMEOUT)) p left
    while true; do
        left=()
        for p in "${pids[@]}"; do running "$p" && left+=("$p"); done
        [ ${#left[@]} -gt 0 ] && [ $SECONDS -lt $deadline ] || break
        sleep 0.2
    done
    for p in "${left[@]}"; do
        echo "run-demo: process $p did not stop in ${STOP_TIMEOUT}s, killing it" >&2
        kill -KILL "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    echo "run-demo: stopped (logs in $LOGS)"
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM HUP
trap 'stop_all' EXIT

start witness
for _ in $(seq 50); do
    grep -q listening "$LOGS/witness.log" 2>/dev/null && break
    kill -0 "${PID[witness]}" 2>/dev/null || { echo "run-demo: the witness did not start:" >&2; tail -5 "$LOGS/witness.log" >&2; exit 1; }
    sleep 0.1
done
start a
start b

ep() { echo "127.0.0.1:${PORT[$1]}"; }
cat <<INFO

  mailharbor demo cluster ($DIR): nodes a and b, a witness, replication protocol C, proxy mode
  demo account:  $USER
  password:      $(cat "$PWFILE")   (also in $PWFILE)

                 node a           node b
  SMTP (MX):     $(ep a_mx)   $(ep b_mx)
  submission:    $(ep a_sub)   $(ep b_sub)   (STARTTLS, then AUTH PLAIN/LOGIN)
  submissions:   $(ep a_subs)   $(ep b_subs)   (implicit TLS)
  IMAP:          $(ep a_imap)   $(ep b_imap)   (STARTTLS, then LOGIN/AUTHENTICATE PLAIN)
  IMAPS:         $(ep a_imaps)   $(ep b_imaps)   (implicit TLS; self-signed certificate)
  POP3:          $(ep a_pop3)   $(ep b_pop3)   (STLS, then USER/PASS or AUTH PLAIN)
  POP3S:         $(ep a_pop3s)   $(ep b_pop3s)   (implicit TLS)
  witness:       127.0.0.1:$WITNESS_PORT (UDP)

  The primary serves; the standby's ports forward to it (PROXY v2), so both columns work.
  e.g.           swaks --server $(ep b_mx) --to $USER
  try:           $BIN/mailharbor cluster status --config $DIR/a/mailharbor.toml
                 $BIN/mailharbor cluster switchover --config $DIR/a/mailharbor.toml   (on the primary)
  logs:          $LOGS/{a,b,witness}.log
  Ctrl-C stops everything.

INFO

# Report the first primary (in the background), then supervise until Ctrl-C.
report_primary() {
    local n
    for _ in $(seq 240); do
        for n in a b; do
            if "$BIN/mailharbor" cluster status --json --config "$DIR/$n/mailharbor.toml" 2>/dev/null \
                | "$BIN/python" -c 'import json,sys; s=json.load(sys.stdin)["node"]; sys.exit(not (s["role"] == "Primary" and s["resources"] == "started"))' 2>/dev/null; then
                echo "  node $n is primary and serves; node ${PEER[$n]} forwards to it."
                return 0
            fi
        done
        sleep 0.5
    done
    echo "run-demo: no primary after 2 minutes; see $LOGS" >&2
}
report_primary &
PID[reporter]=$!

while true; do
    exited=""
    wait -n -p exited "${PID[@]}" && rc=0 || rc=$?
    [ -n "$exited" ] || continue # a signal interrupted the wait; its trap runs
    for name in "${!PID[@]}"; do
        [ "${PID[$name]}" = "$exited" ] || continue
        unset "PID[$name]"
        if [ "$name" = reporter ]; then
            :
        elif [ "$name" != witness ] && [ "$rc" = 75 ]; then
            echo "run-demo: node $name self-fenced (exit 75); restarting it (it rejoins as secondary)"
            start "$name"
        elif [ "$rc" = 0 ]; then
            echo "run-demo: $name stopped; stopping the demo"
            exit 0
        else
            echo "run-demo: $name exited with status $rc; stopping the demo (see $LOGS/$name.log)" >&2
            exit 1
        fi
    done
done
