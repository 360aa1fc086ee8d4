#!/usr/bin/env bash
# Build the local test image cloudbender-test/busybox:latest from Debian's busybox-static
# package. Nothing is pulled: the .deb comes from apt (cached in .cache/debs/) and the
# image is made with `docker import`.
#
# Idempotent: the image carries a label with the sha256 of the .deb and of this script,
# and is rebuilt only when that changes. Needs a running engine (scripts/dockerd.sh).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

IMAGE=cloudbender-test/busybox:latest
RECIPE_LABEL=org.cloudbender.test.recipe
DEBS=$CACHE/debs

engine_ok || die "no Docker engine: run this under 'scripts/dockerd.sh run' (as 'make images' does)"

newest_deb() {
    find "$DEBS" -maxdepth 1 -name 'busybox-static_*.deb' 2>/dev/null | sort -V | tail -n 1
}

fetch_deb() {
    local tmp rc=0
    tmp=$(mktemp -d "$CACHE/dl.XXXXXX")
    # As root, apt cannot hand the download to its _apt user here; say so, or it warns.
    (cd "$tmp" && apt-get -q -o APT::Sandbox::User=root download busybox-static) &&
        mv "$tmp"/busybox-static_*.deb "$DEBS"/ || rc=$?
    rm -rf "$tmp"
    return "$rc"
}

mkdir -p "$DEBS"
deb=$(newest_deb)
if [ -z "$deb" ]; then
    say "apt-get download busybox-static"
    # A fresh machine has no package lists; stale ones point at versions long gone.
    fetch_deb >/dev/null 2>&1 || { apt_update && quietly fetch_deb; } ||
        die "could not download busybox-static"
    deb=$(newest_deb)
fi

recipe=$(cat "$deb" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)
old_id=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
if [ -n "$old_id" ]; then
    have_recipe=$(docker image inspect -f "{{ index .Config.Labels \"$RECIPE_LABEL\" }}" "$IMAGE")
    [ "$have_recipe" = "$recipe" ] && exit 0
fi

source="busybox-static $(dpkg-deb -f "$deb" Version)"
say "building $IMAGE from $source"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dpkg -x "$deb" "$work/deb"
root=$work/rootfs
mkdir -p "$root"
chmod 0755 "$root"
install -D -m 0755 "$work/deb/bin/busybox" "$root/bin/busybox"
# busybox --install needs a chroot; the applet list gives the same links without one.
while read -r applet; do
    [ "$applet" = bin/busybox ] && continue
    mkdir -p "$root/$(dirname "$applet")"
    ln -s /bin/busybox "$root/$applet"
done < <("$root/bin/busybox" --list-full)
mkdir -p "$root"/{etc,dev,proc,sys,root,home,var/tmp,opt} "$root/tmp"
chmod 1777 "$root/tmp" "$root/var/tmp"
chmod 0700 "$root/root"
cat >"$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PASSWD
cat >"$root/etc/group" <<'GROUP'
root:x:0:
nogroup:x:65534:
GROUP

tar --numeric-owner --owner=0 --group=0 --sort=name --mtime=@0 -C "$root" -cf - . |
    quietly docker import \
        --change 'CMD ["/bin/sh"]' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change "LABEL $RECIPE_LABEL=$recipe org.cloudbender.test.source=\"$source\"" \
        --message "cloudbender test image from $source" \
        - "$IMAGE"

new_id=$(docker image inspect -f '{{.Id}}' "$IMAGE")
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
    docker image rm "$old_id" >/dev/null 2>&1 || true  # still used by a container: keep it
fi
