# Helpers shared by scripts/*.sh. Sourced, never run.
# shellcheck shell=bash

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck disable=SC2034  # used by the scripts that source this file
CACHE=$REPO/.cache
export DEBIAN_FRONTEND=noninteractive

say() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
die() { say "error: $*"; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }

# quietly CMD...: run CMD with its output held back; print it only if CMD fails, so a
# run with nothing to report stays silent and a failure shows everything.
quietly() {
    local log rc
    log=$(mktemp)
    if "$@" >"$log" 2>&1; then
        rm -f "$log"
    else
        rc=$?
        say "failed (exit $rc): $*"
        cat "$log" >&2
        rm -f "$log"
        return "$rc"
    fi
}

# apt-get update runs at most once per script, and only when something is to be fetched:
# a fresh machine has no package lists, an old one may have stale ones.
_apt_updated=
apt_update() {
    [ -z "$_apt_updated" ] || return 0
    [ "$(id -u)" = 0 ] || die "apt-get needs root; run as root, or install by hand what is missing"
    say "apt-get update"
    quietly apt-get -q -o DPkg::Lock::Timeout=300 update
    _apt_updated=1
}

apt_install() {
    apt_update
    say "apt-get install $*"
    quietly apt-get -q -y -o DPkg::Lock::Timeout=300 install --no-install-recommends "$@"
}

engine_ok() { docker info >/dev/null 2>&1; }
