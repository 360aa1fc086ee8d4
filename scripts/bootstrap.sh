#!/usr/bin/env bash
# Make this machine ready for `make test`: the Debian packages the tests need, then the
# project's virtualenv (.venv) with the project and its test extras.
#
# Idempotent. Silent when there is nothing to do; runs apt-get only for what is missing
# and pip only when pyproject.toml changed since the last install. Needs root only when
# a package is missing.
#
# PYTHON picks the interpreter (default: /usr/bin/python3, Debian's own, which is what
# a consumer installs the agent with: 3.11.2 on Debian 12, not whatever python3 comes
# first on PATH). A .venv made by another interpreter, or by this one before an upgrade,
# is rebuilt: the tests must run on the Python the README promises.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO"

PYTHON=${PYTHON:-/usr/bin/python3}
VENV=$REPO/.venv
STAMP=$VENV/.bootstrap-stamp

# --- system packages -----------------------------------------------------------------
missing=()
{ have docker && have dockerd; } || missing+=(docker.io)
have systemd-analyze || missing+=(systemd)
# Job outputs are loop-mounted ext4 images (agent/jobs/outputfs.py).
{ have mkfs.ext4 && have mount && have losetup; } || missing+=(e2fsprogs mount)
if ! have "$PYTHON"; then
    missing+=(python3 python3-venv)
# Debian ships ensurepip, without which `python3 -m venv` fails, in python3-venv.
elif ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    missing+=(python3-venv)
fi
if [ ${#missing[@]} -gt 0 ]; then
    apt_install "${missing[@]}"
fi

# --- virtualenv ----------------------------------------------------------------------
# The stamp records where the venv was made, by which interpreter (its real path and
# version: a shim or a symlink may point elsewhere tomorrow) and from which
# pyproject.toml. A venv copied along with the checkout still runs, but its scripts' #!
# lines point at the old place; a venv of another interpreter tests the wrong Python.
interp() { "$1" -c 'import os, sys; print(os.path.realpath(getattr(sys, "_base_executable", sys.executable)), sys.version.split()[0])'; }
want_py=$(interp "$PYTHON") || die "$PYTHON does not run"
want_py=${want_py// /@}
want="$VENV $want_py $(sha256sum pyproject.toml | cut -d' ' -f1)"
have=$(cat "$STAMP" 2>/dev/null || true)
if [ -e "$VENV" ]; then
    venv_py=$(interp "$VENV/bin/python" 2>/dev/null) || venv_py=
    venv_py=${venv_py// /@}
    why=
    if [ -z "$venv_py" ]; then
        why="made by a Python that is gone"
    elif [ "$venv_py" != "$want_py" ]; then
        why="made by ${venv_py//@/ }, not $PYTHON (${want_py//@/ })"
    elif [ -n "$have" ] && [ "${have%% *}" != "$VENV" ]; then
        why="moved from ${have%% *}"
    fi
    if [ -n "$why" ]; then
        say "removing $VENV ($why)"
        rm -rf "$VENV"
        have=
    fi
fi
if [ ! -e "$VENV" ]; then
    say "creating $VENV with $PYTHON (${want_py//@/ })"
    quietly "$PYTHON" -m venv "$VENV"
fi
if [ "$have" != "$want" ]; then
    say "pip install -e '.[test]'"
    rm -f "$STAMP"
    PIP_ROOT_USER_ACTION=ignore quietly "$VENV/bin/python" -m pip install \
        --disable-pip-version-check --no-input -e '.[test]'
    echo "$want" >"$STAMP"
fi
