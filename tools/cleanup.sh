#!/usr/bin/env bash
# Remove what a killed test run may have left behind. Safe to run at any time,
# also while other test runs are going on, and when there is nothing to do.
#
# Usage: tools/cleanup.sh [--all] [--dry-run]
#
# What belongs to a test run: every name a test creates for things that can
# outlive it (processes' arguments, mount points, loop-device backing files,
# network namespaces, directories under /tmp) contains the marker
# `mh-test-<PID>-`, where PID is the pytest process of that run (fixture
# `unique_name` in tests/conftest.py). Every process a run starts also inherits
# MAILHARBOR_TEST_RUN=<PID> in its environment.
#
# A run is *stale* when its PID no longer exists. By default only stale runs are
# cleaned, so a concurrent `make test` is never disturbed; `--all` cleans every
# run, live or not. In order: processes are killed (TERM, then KILL), mounts are
# unmounted lazily (FUSE ones with fusermount), loop devices detached, network
# namespaces deleted, the acceptance rig's blackhole routes (proto 213, metric = run PID)
# deleted, cgroups under the cgroup2 mount thawed (before the processes) and removed, and /tmp/mh-test-* directories removed (without crossing
# into file systems that are still mounted). Steps that need root are skipped
# with a note when not root.
set -uo pipefail

all=0
dry=0
for arg in "$@"; do
    case "$arg" in
        --all) all=1 ;;
        --dry-run) dry=1 ;;
        -h | --help)
            sed -n '2,/^set /p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "cleanup: unknown argument $arg" >&2
            exit 2
            ;;
    esac
done

marker_re='mh-test-([0-9]+)-'
cleaned=0

# stale RUN_PID: true when the run is to be cleaned.
stale() {
    ((all)) && return 0
    [[ ! -e /proc/$1 ]]
}

exec 3>&2  # report on fd 3, so `act cmd 2>/dev/null` silences cmd, not the report
act() {
    cleaned=$((cleaned + 1))
    echo "cleanup: $*" >&3
    ((dry)) && return 0
    "$@"
}

# Our own ancestors are never killed (a run of make test from inside a test).
declare -A protected=()
pid=$$
while [[ -n "$pid" && "$pid" != 0 ]]; do
    protected[$pid]=1
    pid=$(awk '/^PPid:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
done

# Cgroups a run created (tests/test_repl_faults.py freezes a node in a cgroup named
# mh-test-<PID>-... directly under the cgroup2 mount): thawed first, so the processes in them
# can be stopped in step 1; removed in step 4c.
cgroup2=$(awk '$3 == "cgroup2" {print $2; exit}' /proc/self/mounts 2>/dev/null)
run_cgroups=()
if [[ -n "$cgroup2" ]]; then
    for dir in "$cgroup2"/mh-test-*; do
        [[ -d "$dir" && "$(basename "$dir")" =~ ^$marker_re ]] || continue
        stale "${BASH_REMATCH[1]}" || continue
        run_cgroups+=("$dir")
        if [[ -w "$dir/cgroup.freeze" ]] && grep -q '^frozen 1' "$dir/cgroup.events" 2>/dev/null; then
            act sh -c "echo 0 > '$dir/cgroup.freeze'" || echo "cleanup: could not thaw $dir" >&2
        fi
    done
fi

# 1. processes
victims=()
for dir in /proc/[0-9]*; do
    pid=${dir#/proc/}
    [[ -n "${protected[$pid]:-}" ]] && continue
    run=""
    cmd=$(tr '\0' ' ' 2>/dev/null <"$dir/cmdline") || continue
    if [[ "$cmd" =~ $marker_re ]]; then
        run=${BASH_REMATCH[1]}
    else
        env_run=$(tr '\0' '\n' 2>/dev/null <"$dir/environ" | sed -n 's/^MAILHARBOR_TEST_RUN=\([0-9]*\)$/\1/p')
        run=${env_run:-}
    fi
    [[ -z "$run" || "$run" == "$pid" ]] && continue
    if stale "$run"; then
        victims+=("$pid")
        echo "cleanup: process $pid of run $run: ${cmd:0:120}" >&2
    fi
done
if ((${#victims[@]})); then
    act kill -TERM "${victims[@]}" 2>/dev/null
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        alive=()
        for pid in "${victims[@]}"; do [[ -e /proc/$pid ]] && alive+=("$pid"); done
        ((${#alive[@]})) || break
        sleep 0.2
    done
    for pid in "${victims[@]}"; do
        [[ -e /proc/$pid ]] && act kill -KILL "$pid" 2>/dev/null
    done
fi

is_root=0
[[ $(id -u) -eq 0 ]] && is_root=1

# 2. mounts, deepest first
mapfile -t mounts < <(
    awk '{print length($2) "\t" $2 "\t" $3}' /proc/self/mounts | sort -rn | cut -f2-
)
for line in "${mounts[@]}"; do
    mp_escaped=${line%%$'\t'*}
    fstype=${line#*$'\t'}
    mp=$(printf '%b' "$mp_escaped")
    [[ "$fstype" == nsfs ]] && continue  # network namespaces: step 4
    [[ "$mp" =~ $marker_re ]] || continue
    stale "${BASH_REMATCH[1]}" || continue
    if [[ "$fstype" == fuse* ]]; then
        if command -v fusermount3 >/dev/null; then
            act fusermount3 -u -z "$mp" 2>/dev/null && continue
        fi
        if command -v fusermount >/dev/null; then
            act fusermount -u -z "$mp" 2>/dev/null && continue
        fi
    fi
    if ((is_root)); then
        act umount -l "$mp" || echo "cleanup: could not unmount $mp" >&2
    else
        echo "cleanup: not root, leaving mount $mp" >&2
    fi
done

# 3. loop devices
if ((is_root)) && command -v losetup >/dev/null; then
    while read -r dev backing; do
        [[ "$backing" =~ $marker_re ]] || continue
        stale "${BASH_REMATCH[1]}" || continue
        act losetup -d "$dev" || echo "cleanup: could not detach $dev" >&2
    done < <(losetup -n -l -O NAME,BACK-FILE 2>/dev/null)
fi

# 4. network namespaces
if ((is_root)) && command -v ip >/dev/null; then
    while read -r ns _; do
        [[ "$ns" =~ $marker_re ]] || continue
        stale "${BASH_REMATCH[1]}" || continue
        act ip netns delete "$ns" || echo "cleanup: could not delete netns $ns" >&2
    done < <(ip netns list 2>/dev/null)
fi

# 4b. blackhole routes of the acceptance rig (tests/acceptance/rig.py) in the root namespace:
# `blackhole 10.213.0.0/16 proto 213 metric <run PID>`. Removed after the namespaces, never before.
if ((is_root)) && command -v ip >/dev/null; then
    while read -r line; do
        [[ "$line" =~ ^blackhole\ ([0-9./]+)\ .*metric\ ([0-9]+) ]] || continue
        dst=${BASH_REMATCH[1]}
        run=${BASH_REMATCH[2]}
        stale "$run" || continue
        act ip route del blackhole "$dst" proto 213 metric "$run" ||
            echo "cleanup: could not delete route blackhole $dst metric $run" >&2
    done < <(ip route show proto 213 2>/dev/null)
fi

# 4c. the run's cgroups (thawed above): leftover processes back to the root cgroup, then rmdir.
for dir in "${run_cgroups[@]}"; do
    [[ -d "$dir" ]] || continue
    if [[ -r "$dir/cgroup.procs" ]]; then
        for pid in $(cat "$dir/cgroup.procs" 2>/dev/null); do
            act sh -c "echo $pid > '$cgroup2/cgroup.procs'" 2>/dev/null
        done
    fi
    act rmdir "$dir" || echo "cleanup: could not remove cgroup $dir" >&2
done

# 5. directories
shopt -s nullglob
declare -A seen=()
for dir in "${TMPDIR:-/tmp}"/mh-test-* /tmp/mh-test-*; do
    [[ -n "${seen[$dir]:-}" ]] && continue  # listed twice when TMPDIR=/tmp
    seen[$dir]=1
    [[ "$(basename "$dir")" =~ ^$marker_re ]] || continue
    stale "${BASH_REMATCH[1]}" || continue
    act rm -rf --one-file-system -- "$dir" || echo "cleanup: could not remove $dir" >&2
done

if ((cleaned)); then
    echo "cleanup: $cleaned item(s) cleaned" >&2
fi
exit 0
