#!/usr/bin/env bash
# Make this machine ready for `make test`: the Debian packages the tests need, then the
# project's virtualenv (.venv) with the project and its test extras.
#
# Idempotent. Silent when there is nothing to do; runs apt-get only for what is missing
# and pip only when pyproject.toml changed since the last install. Needs root only when
# a package is missing. PYTHON picks the interpreter for a new venv (default: python3).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO"

PYTHON=${PYTHON:-python3}
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
# The stamp records where the venv was made and from which pyproject.toml. A venv copied
# along with the checkout still runs, but its scripts' #! lines point at the old place.
want="$VENV $(sha256sum pyproject.toml | cut -d' ' -f1)"
have=$(cat "$STAMP" 2>/dev/null || true)
if [ -e "$VENV" ] && { [ -n "$have" ] && [ "${have%% *}" != "$VENV" ] ||
    ! "$VENV/bin/python" -c '' >/dev/null 2>&1; }; then
    say "removing $VENV (moved, or made by a Python that is gone)"
    rm -rf "$VENV"
    have=
fi
if [ ! -e "$VENV" ]; then
    say "creating $VENV"
    quietly "$PYTHON" -m venv "$VENV"
fi
if [ "$have" != "$want" ]; then
    say "pip install -e '.[test]'"
    rm -f "$STAMP"
    PIP_ROOT_USER_ACTION=ignore quietly "$VENV/bin/python" -m pip install \
        --disable-pip-version-check --no-input -e '.[test]'
    echo "$want" >"$STAMP"
fi
