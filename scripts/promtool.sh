#!/usr/bin/env bash
# Print the path of a promtool binary, fetching it once into .cache/promtool.
#
# promtool (`promtool check metrics`) comes from Debian's prometheus package. The package
# is never installed: that would start a Prometheus server. Its .deb is downloaded from
# the apt mirror (`apt-get download`), unpacked with `dpkg -x` in a scratch directory,
# and only usr/bin/promtool is kept. `make distclean` removes .cache, and with it this.
# A promtool already on PATH is used as it is.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if have promtool; then
    command -v promtool
    exit 0
fi
dest=$CACHE/promtool/promtool
if [ -x "$dest" ] && "$dest" --version >/dev/null 2>&1; then
    echo "$dest"
    exit 0
fi
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
chmod 0755 "$scratch"  # apt's _apt user writes the download here
say "fetching promtool (apt-get download prometheus; the package is not installed)"
if ! (cd "$scratch" && quietly apt-get -q download prometheus); then
    apt_update
    (cd "$scratch" && quietly apt-get -q download prometheus)
fi
deb=$(find "$scratch" -maxdepth 1 -name 'prometheus_*.deb' | head -n 1)
[ -n "$deb" ] || die "apt-get download prometheus gave no .deb"
dpkg -x "$deb" "$scratch/root"
[ -x "$scratch/root/usr/bin/promtool" ] || die "no usr/bin/promtool in $deb"
mkdir -p "$(dirname "$dest")"
install -m 0755 "$scratch/root/usr/bin/promtool" "$dest.tmp"
mv "$dest.tmp" "$dest"  # a concurrent run sees either no file or the whole one
echo "$dest"
