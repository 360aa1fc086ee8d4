#!/usr/bin/env bash
# A Docker engine for the tests, started only when none is running and stopped only by
# whoever started it.
#
#   scripts/dockerd.sh up          start dockerd unless `docker info` already works
#   scripts/dockerd.sh down        stop the dockerd this script started (else do nothing)
#   scripts/dockerd.sh run CMD...  run CMD with an engine up, exit with CMD's status;
#                                  afterwards stop the engine if a `run` started it and
#                                  no other `run` still uses it
#   scripts/dockerd.sh status
#
# The engine is one per machine, so its bookkeeping is too (STATE, in /run): a marker
# "started" (pid, owner, log) exists only while a dockerd we started runs. Concurrent
# `run`s of any checkout hold a shared lock on STATE/users; the last one out stops the
# engine. An engine started with `up` (owner=manual) stays up until `down`. Every
# command may be repeated: `up` twice starts once, `down` twice stops once.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [ "$(id -u)" = 0 ]; then
    STATE=${CLOUDBENDER_DOCKERD_STATE:-/run/cloudbender-test-dockerd}
else
    STATE=${CLOUDBENDER_DOCKERD_STATE:-${XDG_RUNTIME_DIR:-/tmp}/cloudbender-test-dockerd-$(id -u)}
fi
MARKER=$STATE/started
LOG=$CACHE/dockerd.log
START_TIMEOUT_S=60
STOP_TIMEOUT_S=60  # dockerd gives running containers 15 s, then kills them
DOCKER_PIDFILE=/var/run/docker.pid

mkdir -p "$STATE"

is_dockerd() { [ -n "${1:-}" ] && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = dockerd ]; }
marker_get() { if [ -e "$MARKER" ]; then sed -n "s/^$1=//p" "$MARKER"; fi; }

# Serialises up/down across processes. fd 9 must not leak into dockerd or CMD: a child
# holding it would hold the lock for its whole life.
lock() { exec 9>"$STATE/lock"; flock 9; }
unlock() { exec 9>&-; }

wait_for_engine() {  # wait_for_engine PID: until `docker info` works or PID exits
    local deadline=$((SECONDS + START_TIMEOUT_S))
    until engine_ok; do
        if [ -n "$1" ] && ! is_dockerd "$1"; then
            say "dockerd (pid $1) exited; last lines of $LOG:"
            tail -n 30 "$LOG" >&2 || true
            return 1
        fi
        if [ $SECONDS -ge $deadline ]; then
            say "no engine after ${START_TIMEOUT_S} s; last lines of $LOG:"
            tail -n 30 "$LOG" >&2 || true
            return 1
        fi
        sleep 0.2
    done
}

up_locked() {  # up_locked OWNER
    local owner=$1 pid
    pid=$(marker_get pid)
    if [ -n "$pid" ] && ! is_dockerd "$pid"; then
        rm -f "$MARKER"  # our dockerd died since; forget it
        pid=
    fi
    if engine_ok; then
        # An explicit `up` keeps an engine that a `run` started from being stopped under it.
        if [ -n "$pid" ] && [ "$owner" = manual ]; then
            sed -i 's/^owner=.*/owner=manual/' "$MARKER"
        fi
        return 0
    fi
    if [ -n "$pid" ]; then
        wait_for_engine "$pid"
        return
    fi
    local other
    other=$(cat "$DOCKER_PIDFILE" 2>/dev/null || true)
    if is_dockerd "$other"; then
        # Someone else's dockerd, still starting (or stuck): wait for it, never start a
        # second one on the same socket.
        say "waiting for the dockerd already running (pid $other)"
        wait_for_engine "$other"
        return
    fi
    local bin
    bin=$(command -v dockerd || echo /usr/sbin/dockerd)
    [ -x "$bin" ] || die "dockerd not found; run scripts/bootstrap.sh (it installs docker.io)"
    mkdir -p "$CACHE"
    say "starting dockerd (log: $LOG)"
    # setsid: a Ctrl-C meant for `make` must not reach the engine; `down` stops it.
    setsid "$bin" >"$LOG" 2>&1 </dev/null 8>&- 9>&- &
    pid=$!
    printf 'pid=%s\nowner=%s\nlog=%s\n' "$pid" "$owner" "$LOG" >"$MARKER"
    if ! wait_for_engine "$pid"; then
        down_locked
        return 1
    fi
}

down_locked() {
    local pid
    pid=$(marker_get pid)
    if [ -z "$pid" ]; then
        return 0  # not ours: leave it alone
    fi
    if ! is_dockerd "$pid"; then
        rm -f "$MARKER"
        return 0
    fi
    say "stopping dockerd (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + STOP_TIMEOUT_S))
    while is_dockerd "$pid" && [ $SECONDS -lt $deadline ]; do
        sleep 0.2
    done
    if is_dockerd "$pid"; then
        say "dockerd (pid $pid) ignored SIGTERM for ${STOP_TIMEOUT_S} s; killing it"
        local ctr
        ctr=$(cat /var/run/docker/containerd/containerd.pid 2>/dev/null || true)
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
        # Killed, it cannot clean up: its managed containerd and its pid file are ours
        # to remove. The socket is replaced by the next dockerd anyway.
        if [ -n "$ctr" ] && [ "$(cat "/proc/$ctr/comm" 2>/dev/null)" = containerd ]; then
            kill -TERM "$ctr" 2>/dev/null || true
        fi
        if [ "$(cat "$DOCKER_PIDFILE" 2>/dev/null)" = "$pid" ]; then
            rm -f "$DOCKER_PIDFILE"
        fi
    fi
    rm -f "$MARKER"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
up)
    lock
    up_locked manual
    ;;
down)
    lock
    exec 7>"$STATE/users"
    if ! flock -n -x 7; then
        die "the engine is in use by a running 'scripts/dockerd.sh run'; not stopping it"
    fi
    down_locked
    ;;
status)
    if engine_ok; then echo "engine: up"; else echo "engine: down"; fi
    if [ -e "$MARKER" ]; then sed 's/^/started by this script: /' "$MARKER"; fi
    ;;
run)
    [ $# -gt 0 ] || die "usage: $0 run CMD..."
    lock
    up_locked run
    exec 8>"$STATE/users"
    flock -s 8
    unlock
    leave() {
        exec 8>&-
        lock
        exec 7>"$STATE/users"
        if flock -n -x 7 && [ "$(marker_get owner)" = run ]; then
            down_locked
        fi
        exec 7>&-
        unlock
    }
    trap leave EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    status=0
    "$@" 7>&- 8>&- 9>&- || status=$?
    exit "$status"
    ;;
*)
    echo "usage: $0 up|down|status|run CMD..." >&2
    exit 2
    ;;
esac
