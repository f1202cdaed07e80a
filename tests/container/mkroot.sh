#!/bin/sh
# Build (once) the Debian bookworm root that the container tests boot with
# systemd as PID 1 under systemd-nspawn (tests/container/container.py).
#
#   sh tests/container/mkroot.sh [ROOT]
#
# ROOT defaults to $CPRD_CONTAINER_ROOT, else /var/cache/cprd-test/root: a
# cache outside the clone, reused by every run. The root is rebuilt only when
# the package list below (or this script's recipe version) changes: the stamp
# file ROOT.stamp holds a hash of both. Prints the root's path last.
#
# The root holds systemd, dbus, what cprd links at run time, and QEMU >= 10
# from bookworm-backports, installed into the root with its own apt so that
# dpkg resolves QEMU's libraries against the root's (binding the host's
# binary in would need every library and firmware path it opens, kept in step
# with the host by hand). The mirror is the one the machine's apt sources
# already name, found as scripts/install-deps.sh finds it; no archive host is
# written here.
set -eu

ROOT=${1:-${CPRD_CONTAINER_ROOT:-/var/cache/cprd-test/root}}
RECIPE=1
PKGS="systemd,systemd-sysv,dbus,libev4,libjson-c5,libseccomp2,libsystemd0,procps,python3,iproute2"
PKGS_BACKPORTS="qemu-system-x86"

here=$(cd "$(dirname "$0")" && pwd)
want=$(printf '%s\n%s\n%s\n' "$RECIPE" "$PKGS" "$PKGS_BACKPORTS" | sha256sum | cut -d' ' -f1)
stamp=$ROOT.stamp

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$ROOT/lib/systemd/systemd" ]; then
	echo "mkroot: $ROOT is current"
	echo "$ROOT"
	exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
	echo "mkroot: must run as root to build $ROOT" >&2
	exit 1
fi
for tool in debootstrap systemd-nspawn; do
	command -v "$tool" >/dev/null 2>&1 || {
		echo "mkroot: $tool missing (make deps installs it)" >&2
		exit 1
	}
done

# shellcheck source=../../scripts/mirror.sh
. "$here/../../scripts/mirror.sh"
uri=$(mirror_uri) || { echo "mkroot: no Debian mirror URI in apt sources" >&2; exit 1; }

t0=$(date +%s)
tmp=$ROOT.new
rm -rf "$tmp" "$stamp"
mkdir -p "$(dirname "$ROOT")"
echo "mkroot: debootstrap bookworm into $tmp"
debootstrap --variant=minbase --include="$PKGS" bookworm "$tmp" "$uri" >"$tmp.log" 2>&1 || {
	tail -n 20 "$tmp.log" >&2
	echo "mkroot: debootstrap failed (log: $tmp.log)" >&2
	exit 1
}

echo "deb $uri bookworm-backports main" >"$tmp/etc/apt/sources.list.d/bookworm-backports.list"
cp /etc/resolv.conf "$tmp/etc/resolv.conf" 2>/dev/null || true
echo "mkroot: $PKGS_BACKPORTS from bookworm-backports"
chroot "$tmp" sh -ec "apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		-t bookworm-backports $PKGS_BACKPORTS
	apt-get clean
	rm -rf /var/lib/apt/lists/*" >>"$tmp.log" 2>&1 || {
	tail -n 20 "$tmp.log" >&2
	echo "mkroot: installing $PKGS_BACKPORTS failed (log: $tmp.log)" >&2
	exit 1
}

# A container that boots fast and quietly: no login prompts, no network
# configuration to wait for, a fixed machine id is written per boot by the
# volatile overlay.
rm -f "$tmp/etc/machine-id"
: >"$tmp/etc/machine-id"
echo cprd-test >"$tmp/etc/hostname"
for u in getty@tty1.service console-getty.service systemd-networkd-wait-online.service; do
	ln -sf /dev/null "$tmp/etc/systemd/system/$u"
done
# journald keeps the journal in /run (volatile): enough for the tests.
mkdir -p "$tmp/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\nRateLimitBurst=0\n' >"$tmp/etc/systemd/journald.conf.d/cprd-test.conf"

rm -rf "$ROOT"
mv "$tmp" "$ROOT"
mv "$tmp.log" "$ROOT.log"
echo "$want" >"$stamp"
echo "mkroot: built $ROOT in $(($(date +%s) - t0)) s ($(du -sh "$ROOT" | cut -f1))"
echo "$ROOT"
