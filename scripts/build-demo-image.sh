#!/usr/bin/env bash
# Build the demo's job image cloudbender-demo/onnx: Debian 12 (minbase) with its own
# Python 3.11, plus onnxruntime and numpy. Nothing is pulled from a registry: the root
# filesystem comes from debootstrap, the Python packages are installed into it from the
# package index by the host's pip (the chroot never runs with network), and the image is
# made with `docker import`.
#
# Idempotent: the image carries a label with the sha256 of this script (the recipe: the
# Debian release and the pinned versions below) and is rebuilt only when that changes.
# Tagged cloudbender-demo/onnx:<recipe hash, 12 hex> and :latest. Debian packages and
# wheels are cached in .cache/demo/. Needs root (debootstrap) and a running engine.
# Prints one line per step, so a first build (about a minute) shows its progress.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

REPO_NAME=cloudbender-demo/onnx
RECIPE_LABEL=org.cloudbender.demo.recipe
SUITE=bookworm
# The Debian mirror: DEMO_DEBIAN_MIRROR, else the one this machine's apt already uses
# (deb822 .sources or one-line .list; not the security archive).
host_mirror() {
    # Missing files and no match are normal here: never let them end the script.
    {
        grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources || true
        grep -hsE '^deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list |
            sed -E 's/\[[^]]*\]//; s/^deb[[:space:]]+/URIs: /' || true
    } | awk '!found && $1 == "URIs:" && $2 !~ /-security/ {print $2; found = 1}'
}
MIRROR=${DEMO_DEBIAN_MIRROR:-$(host_mirror)}
[ -n "$MIRROR" ] || die "no Debian mirror found in apt's sources: set DEMO_DEBIAN_MIRROR"
# The Debian packages on top of minbase: the interpreter and its full standard library.
DEBS=python3-minimal,libpython3.11-stdlib
# Every wheel pinned, the dependencies of onnxruntime included, so that one recipe hash
# always means the same image.
WHEELS=(onnxruntime==1.30.0 numpy==2.3.5 protobuf==7.36.2 flatbuffers==25.12.19 packaging==26.4)
# Debian 12 has glibc 2.36: any of these wheel tags runs there.
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)
PIP=${PIP:-$REPO/.venv/bin/python -m pip}

engine_ok || die "no Docker engine: run this under 'scripts/dockerd.sh run' (as 'make demo' does)"

recipe=$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)
IMAGE=$REPO_NAME:${recipe:0:12}
have_recipe=$(docker image inspect -f "{{ index .Config.Labels \"$RECIPE_LABEL\" }}" \
    "$REPO_NAME:latest" 2>/dev/null || true)
if [ "$have_recipe" = "$recipe" ]; then
    exit 0
fi
old_id=$(docker image inspect -f '{{.Id}}' "$REPO_NAME:latest" 2>/dev/null || true)

[ "$(id -u)" = 0 ] || die "building $IMAGE needs root (debootstrap); run as root (make demo does)"
have debootstrap || apt_install debootstrap
started=$SECONDS
step() { say "[$((SECONDS - started)) s] $*"; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
mkdir -p "$CACHE/demo/debs" "$CACHE/demo/wheels"

step "1/4 debootstrap --variant=minbase $SUITE (+ $DEBS) from $MIRROR"
# One line per phase (Retrieving, Validating, Extracting, ...) instead of one per package;
# the whole log is printed if debootstrap fails.
log=$work/debootstrap.log
if ! debootstrap --variant=minbase --include="$DEBS" --cache-dir="$CACHE/demo/debs" \
    "$SUITE" "$root" "$MIRROR" 2>&1 | tee "$log" |
    awk '$1 == "I:" && $2 != "Validating" && $2 != last { print "    " $0; fflush(); last = $2 }'; then
    cat "$log" >&2
    die "debootstrap failed"
fi

step "2/4 pip: ${WHEELS[*]} (cp311, manylinux) into the root filesystem"
platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
pip_target=(--only-binary=:all: "${platform_args[@]}" --python-version 3.11
    --implementation cp --abi cp311)
# Download (cached) first, then install from the cache alone: the second step can only
# install what the first fetched, and a rebuild with the same pins needs no network.
PIP_ROOT_USER_ACTION=ignore quietly $PIP download --disable-pip-version-check --no-input \
    "${pip_target[@]}" -d "$CACHE/demo/wheels" "${WHEELS[@]}"
PIP_ROOT_USER_ACTION=ignore quietly $PIP install --disable-pip-version-check --no-input \
    --no-index --find-links "$CACHE/demo/wheels" "${pip_target[@]}" --no-compile \
    --target "$root/usr/lib/python3/dist-packages" "${WHEELS[@]}"

step "3/4 trimming (apt caches, docs, locales)"
rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
    "$root"/usr/share/man/* "$root"/usr/share/locale/* "$root"/usr/share/info/* \
    "$root"/usr/lib/python3/dist-packages/bin
mkdir -p "$root"/opt/{data,model,output}

step "4/4 docker import $IMAGE"
tar --numeric-owner --sort=name --mtime=@0 -C "$root" -cf - . |
    quietly docker import \
        --change 'CMD ["/usr/bin/python3"]' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV PYTHONDONTWRITEBYTECODE=1' \
        --change "LABEL $RECIPE_LABEL=$recipe" \
        --message "cloudbender demo image: Debian $SUITE, python3, ${WHEELS[*]}" \
        - "$IMAGE"
docker tag "$IMAGE" "$REPO_NAME:latest"
# The import must have produced a working interpreter with onnxruntime: check it here
# rather than in the middle of the demo. --network none: this check needs none either.
quietly docker run --rm --pull never --network none --user 65534:65534 "$IMAGE" \
    python3 -c 'import onnxruntime, numpy' ||
    die "$IMAGE was built, but python3 cannot import onnxruntime in it"

if [ -n "$old_id" ] && [ "$old_id" != "$(docker image inspect -f '{{.Id}}' "$IMAGE")" ]; then
    docker image rm "$old_id" >/dev/null 2>&1 || true # still used by a container: keep it
fi
step "done: $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE" | numfmt --to=iec))"
