#!/bin/sh
# Build a second, newer QEMU (x86_64 system emulator only) from Debian's own
# source package, so that updates can move a guest between two QEMU versions.
#
# The source comes from Debian unstable through a deb-src entry that reuses
# the mirror URI the machine's apt sources already name (scripts/mirror.sh),
# in a private apt state directory: the machine's apt never sees unstable,
# nothing from it is ever installed, and apt verifies the source files against
# the signed Sources index as it does for any Debian source. The newest version
# >= QEMU_NEXT_MIN whose files the mirror actually serves is built (the index
# may list versions whose files are not there yet).
#
# The result is cached outside the clone, in $CPRD_QEMU_CACHE/qemu-VERSION
# (default /var/cache/cprd-test), with a stamp naming the version; when a
# stamp is there nothing is fetched or built. When no version can be fetched,
# $CPRD_QEMU_CACHE/qemu-next.unavailable says why and the script exits 0 (the
# tests that need the second QEMU skip with that reason); a failed build fails.
#
# Usage: sh scripts/build-qemu-next.sh           build when missing; print the binary
#        sh scripts/build-qemu-next.sh --print   print the cached binary (or fail)
set -eu

CACHE=${CPRD_QEMU_CACHE:-/var/cache/cprd-test}
MIN=${QEMU_NEXT_MIN:-10.2}
# The stamp's second line: a build made with other configure options than
# these is not reused (bump it when they change).
CONFIG_ID=seccomp-1
JOBS=${JOBS:-$(nproc)}
umask 022

say() { echo "qemu-next: $*" >&2; }

# The newest cached build: its binary's path.
cached() {
	best= bestv=
	for s in "$CACHE"/qemu-*/.stamp; do
		[ -f "$s" ] || continue
		[ "$(sed -n 2p "$s")" = "$CONFIG_ID" ] || continue
		v=$(sed -n 1p "$s")
		if [ -z "$bestv" ] || dpkg --compare-versions "$v" gt "$bestv"; then
			best=${s%/.stamp} bestv=$v
		fi
	done
	[ -n "$best" ] || return 1
	echo "$best/bin/qemu-system-x86_64"
}

if [ "${1:-}" = --print ]; then
	cached
	exit
fi
if bin=$(cached); then
	say "using $bin (QEMU $(sed -n 1p "${bin%/bin/*}/.stamp"), built before)"
	echo "$bin"
	exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
	say "must run as root (installs build dependencies, writes $CACHE)"
	exit 1
fi

unavailable() {
	mkdir -p "$CACHE"
	echo "$*" >"$CACHE/qemu-next.unavailable"
	say "$*"
	exit 0
}

. "$(dirname "$0")/mirror.sh"
uri=$(mirror_uri) || unavailable "no Debian mirror URI in the machine's apt sources"

# Build dependencies. QEMU >= 10.2 needs meson >= 1.5: bookworm has 1.0.1,
# bookworm-backports a newer one (Debian's +ds tarball bundles no wheels).
PKGS="dpkg-dev ninja-build libglib2.0-dev libfdt-dev libpixman-1-dev libslirp-dev flex bison \
python3-venv libseccomp-dev"
meson_ok() {
	v=$(dpkg-query -W -f='${Version}' meson 2>/dev/null) || return 1
	dpkg --compare-versions "$v" ge 1.5
}
missing=
for p in $PKGS; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ] || ! meson_ok; then
	list=/etc/apt/sources.list.d/cprd-bookworm-backports.list
	[ -f "$list" ] || echo "deb $uri bookworm-backports main" >"$list"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $PKGS
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		-t bookworm-backports meson
	meson_ok || { say "meson >= 1.5 could not be installed"; exit 1; }
fi

# A private apt: its own sources (deb-src unstable only), state, cache and no
# preferences or other sources of the machine's. Only `apt-get source` and
# `apt-cache showsrc` use it; it has no dpkg status to install into.
APT="$CACHE/apt-unstable"
mkdir -p "$APT/etc/sources.list.d" "$APT/etc/preferences.d" "$APT/lists/partial" \
	"$APT/cache/archives/partial"
echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri unstable main" \
	>"$APT/etc/sources.list"
set -- -o Dir::Etc="$APT/etc" -o Dir::Etc::sourcelist="$APT/etc/sources.list" \
	-o Dir::Etc::sourceparts="$APT/etc/sources.list.d" \
	-o Dir::Etc::preferencesparts="$APT/etc/preferences.d" \
	-o Dir::State::Lists="$APT/lists" -o Dir::Cache="$APT/cache" \
	-o Dir::State::status=/dev/null -o APT::Sandbox::User=root
apt-get "$@" -qq update || unavailable "apt could not read unstable's source index from the mirror"

versions=$(apt-cache "$@" showsrc qemu 2>/dev/null | sed -n 's/^Version: //p' | sort -u)
[ -n "$versions" ] || unavailable "unstable's source index lists no qemu"
# Newest first (dpkg's version order), only those >= MIN.
cands=$(for v in $versions; do
	dpkg --compare-versions "${v#*:}" ge "$MIN" && echo "$v"
done | while read -r v; do
	n=0
	for w in $versions; do dpkg --compare-versions "$w" gt "$v" && n=$((n + 1)); done
	echo "$n $v"
done | sort -n | cut -d' ' -f2)
[ -n "$cands" ] || unavailable "unstable lists qemu $(echo $versions), none >= $MIN"

SRC="$CACHE/qemu-src"
rm -rf "$SRC"
mkdir -p "$SRC"
ver=
for v in $cands; do
	if (cd "$SRC" && apt-get "$@" -qq source --download-only "qemu=$v" >/dev/null 2>&1); then
		ver=$v
		break
	fi
	say "qemu $v is listed but the mirror does not serve its files; trying an older one"
	rm -f "$SRC"/*
done
[ -n "$ver" ] || unavailable "the mirror serves none of qemu $(echo $cands) (all >= $MIN)"
upver=${ver#*:}
upver=${upver%%+*}
upver=${upver%%-*}
say "building QEMU $upver (Debian source qemu $ver)"

dsc=$(ls "$SRC"/qemu_*.dsc)
(cd "$SRC" && dpkg-source --no-check -x "$dsc" tree >/dev/null)

# --enable-seccomp: cprd runs a confined VMM with QEMU's -sandbox.
# Debian's installed QEMU knows where its firmware lives; this build shares it
# (the +ds source ships no BIOS images).
fwpath=$(qemu-system-x86_64 -L help 2>/dev/null | paste -sd: -)
[ -n "$fwpath" ] || { say "Debian's qemu-system-x86_64 is needed for its firmware"; exit 1; }

PREFIX="$CACHE/qemu-$upver"
rm -rf "$PREFIX"
mkdir -p "$SRC/build"
start=$(date +%s)
(cd "$SRC/build" && ../tree/configure --prefix="$PREFIX" --python=/usr/bin/python3 \
	--target-list=x86_64-softmmu --without-default-features --disable-docs --disable-werror \
	--disable-download --disable-install-blobs --enable-kvm --disable-user --disable-tools \
	--disable-guest-agent --enable-seccomp --firmwarepath="$fwpath") >"$SRC/configure.log" 2>&1 || {
	tail -n 30 "$SRC/configure.log" >&2
	say "configure failed ($SRC/configure.log)"
	exit 1
}
# The emulator alone, not QEMU's own tests (half of the default target);
# should installing without them miss a file, the whole build and install.
meson=meson
[ -x "$SRC/build/pyvenv/bin/meson" ] && meson="$SRC/build/pyvenv/bin/meson"
if { ninja -C "$SRC/build" -j "$JOBS" qemu-system-x86_64 trace/trace-events-all &&
	"$meson" install -C "$SRC/build" --no-rebuild; } >"$SRC/build.log" 2>&1; then
	say "built and installed the emulator alone"
elif say "installing the emulator alone failed; building everything" &&
	ninja -C "$SRC/build" -j "$JOBS" install >>"$SRC/build.log" 2>&1; then
	:
else
	tail -n 30 "$SRC/build.log" >&2
	say "build failed ($SRC/build.log)"
	exit 1
fi
"$PREFIX/bin/qemu-system-x86_64" --version >/dev/null
printf '%s\n%s\n' "$ver" "$CONFIG_ID" >"$PREFIX/.stamp"
cp "$SRC/configure.log" "$SRC/build.log" "$PREFIX/" 2>/dev/null || :
rm -rf "$SRC" "$CACHE/qemu-next.unavailable"
say "QEMU $upver built in $(($(date +%s) - start)) s into $PREFIX"
echo "$PREFIX/bin/qemu-system-x86_64"
