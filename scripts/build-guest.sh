#!/bin/sh
# Build the cprd test guest from Debian packages:
#   OUTDIR/vmlinuz     kernel of the real package behind linux-image-amd64
#   OUTDIR/initrd.img  gzip'd newc initramfs: static busybox + guest/init as /init
#                      + /lib/modules: the kernel's modules for a virtio disk
#   OUTDIR/modules/    those modules (uncompressed .ko, from the kernel package)
#                      and `order`, their names one a line, dependencies first
#   OUTDIR/vmlinux     the same kernel uncompressed (ELF, PVH entry): boots
#                      ~2.5 s faster under TCG; optional (needs xz)
#   OUTDIR/kernel.txt  "<package> <version>" of the kernel used
#   OUTDIR/kernel.config  its build configuration
# Usage: sh scripts/build-guest.sh OUTDIR
# Packages are fetched with `apt-get download` into OUTDIR/cache and unpacked
# there; nothing is installed on the host. Re-running with up-to-date outputs
# does nothing.
# Modules: guest/init loads $GUEST_MODULES and what they depend on only when
# asked for a disk (cprd.disk=); the dependencies come from each module's own
# `depends=` field (the package ships no modules.dep: depmod makes it when the
# package is installed), and only those .ko files are unpacked.
set -eu

OUT=${1:-build/guest}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SELF=$ROOT/scripts/build-guest.sh
INIT=$ROOT/guest/init
CACHE=$OUT/cache
# Modules a virtio-blk disk on the PCI bus needs (the rest follow from these):
# the virtio PCI transport and the virtio block driver.
GUEST_MODULES="virtio_pci virtio_blk"

say() { echo "guest: $*"; }
die() {
	echo "guest: error: $*" >&2
	exit 1
}

[ -f "$INIT" ] || die "missing $INIT"

uptodate() {
	for o in "$OUT/vmlinuz" "$OUT/initrd.img" "$OUT/kernel.txt"; do
		[ -s "$o" ] || return 1
		[ "$o" -nt "$INIT" ] && [ "$o" -nt "$SELF" ] || return 1
	done
	return 0
}
if uptodate; then
	say "up to date ($OUT: $(cat "$OUT/kernel.txt"))"
	exit 0
fi

for t in apt-get apt-cache dpkg-deb dpkg-query tar gzip find sort sed tr; do
	command -v "$t" >/dev/null 2>&1 || die "'$t' not found (run on Debian 12 with dpkg/apt)"
done
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
OUT=$(cd "$OUT" && pwd)
LOG=$CACHE/apt.log

# --- apt helpers -------------------------------------------------------------
UPDATED=0
apt_update() {
	[ "$UPDATED" -eq 0 ] || return 1
	UPDATED=1
	[ "$(id -u)" -eq 0 ] || die "package lists are missing or stale and 'apt-get update' needs root"
	say "refreshing package lists (apt-get update)"
	apt-get -q update >"$LOG" 2>&1 || {
		cat "$LOG" >&2
		die "apt-get update failed"
	}
}

# Candidate version of a package, empty if unknown.
cand_version() {
	apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: *//p' | grep -v '^(none)$' | head -n 1
}

# apt-get download PKG=VER into $CACHE; prints the .deb path. Reuses a cached
# copy. When the download fails, refresh the lists once and retry.
fetch_deb() {
	pkg=$1 ver=$2
	# apt encodes the epoch colon as %3a in file names
	deb=$CACHE/${pkg}_$(echo "$ver" | sed 's/:/%3a/')_amd64.deb
	if [ -s "$deb" ]; then
		echo "$deb"
		return 0
	fi
	# As root, apt drops to user _apt for downloads; it cannot write into a
	# root-owned cache dir, so download as root (as apt itself would fall back to).
	sandbox=
	[ "$(id -u)" -ne 0 ] || sandbox="-o APT::Sandbox::User=root"
	# shellcheck disable=SC2086
	if ! (cd "$CACHE" && apt-get -q $sandbox download "$pkg=$ver") >"$LOG" 2>&1; then
		return 1
	fi
	[ -s "$deb" ] || deb=$(ls -t "$CACHE/${pkg}"_*_amd64.deb 2>/dev/null | head -n 1)
	[ -n "$deb" ] && [ -s "$deb" ] || return 1
	echo "$deb"
}

# Real kernel package behind the linux-image-amd64 meta package.
resolve_kernel() {
	KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null |
		sed -n 's/^ *Depends: *\(linux-image-[0-9][^ <>]*-amd64\)$/\1/p' | head -n 1)
	KVER=
	[ -n "$KPKG" ] && KVER=$(cand_version "$KPKG")
	[ -n "$KPKG" ] && [ -n "$KVER" ]
}

# --- kernel --------------------------------------------------------------------
# Optional OUTDIR/vmlinux: the uncompressed ELF inside the xz-compressed
# bzImage. QEMU boots it through the kernel's PVH entry (CONFIG_PVH), which
# skips the in-guest decompression (~2.5 s under TCG). Skipped, with a note,
# if xz or GNU grep -P is missing.
extract_vmlinux() {
	rm -f "$OUT/vmlinux" "$OUT/vmlinux.tmp"
	command -v xz >/dev/null 2>&1 || {
		say "note: xz not found, no vmlinux (PVH) image"
		return 0
	}
	off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$OUT/vmlinuz" 2>/dev/null | head -n 1 | cut -d: -f1) || true
	case "$off" in '' | *[!0-9]*)
		say "note: no xz payload found in vmlinuz, no vmlinux (PVH) image"
		return 0
		;;
	esac
	tail -c +$((off + 1)) "$OUT/vmlinuz" | xz -dc --single-stream >"$OUT/vmlinux.tmp" 2>/dev/null || true
	if [ "$(head -c 4 "$OUT/vmlinux.tmp" 2>/dev/null | od -An -tx1 | tr -d ' \n')" = 7f454c46 ] &&
		grep -qx 'CONFIG_PVH=y' "$OUT/kernel.config"; then
		mv -f "$OUT/vmlinux.tmp" "$OUT/vmlinux"
		say "wrote $OUT/vmlinux ($(wc -c <"$OUT/vmlinux") bytes, uncompressed ELF for PVH boot)"
	else
		rm -f "$OUT/vmlinux.tmp"
		say "note: could not extract a PVH-bootable vmlinux; use vmlinuz"
	fi
}

# --- modules -------------------------------------------------------------------
# tar patterns for the files of modules $@ (names as in depends=: the file of
# module foo_bar may be foo-bar.ko, and compressed).
module_patterns() {
	for m in "$@"; do
		printf ' ./lib/modules/*/kernel/*/%s.ko*' "$(echo "$m" | sed 's/_/[-_]/g')"
	done
}

# The unpacked file of module $1 in $kx, empty if none.
module_path() {
	[ -d "$kx/lib/modules" ] || return 0
	find "$kx/lib/modules" -type f | grep -E "/$(echo "$1" | sed 's/_/[-_]/g')\.ko(\.(xz|zst|gz))?\$" |
		head -n 1
}

# Unpack modules $@ from $KDEB into $kx (one pass over the package).
unpack_modules() {
	set -f
	# tar fails on a pattern it does not find: the caller names the module.
	# shellcheck disable=SC2046
	dpkg-deb --fsys-tarfile "$KDEB" |
		tar -x -C "$kx" -f - --wildcards $(module_patterns "$@") 2>/dev/null || true
	set +f
}

# $kx/mods/$1.ko: module $1, uncompressed.
module_ko() {
	f=$(module_path "$1")
	[ -n "$f" ] || die "$KPKG: no module '$1' in $(basename "$KDEB")"
	ko=$kx/mods/$1.ko
	case "$f" in
	*.ko) cp "$f" "$ko" ;;
	*.xz)
		command -v xz >/dev/null 2>&1 || die "module $1 is xz-compressed and xz is not installed"
		xz -dc "$f" >"$ko" || die "cannot decompress $f"
		;;
	*.zst)
		command -v zstd >/dev/null 2>&1 || die "module $1 is zstd-compressed and zstd is not installed"
		zstd -qdc "$f" >"$ko" || die "cannot decompress $f"
		;;
	*.gz) gzip -dc "$f" >"$ko" || die "cannot decompress $f" ;;
	esac
	[ "$(head -c 4 "$ko" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ] || die "$f is not an ELF module"
}

# OUTDIR/modules: $GUEST_MODULES and their dependencies from $KDEB, and the
# order to load them in.
build_modules() {
	mkdir -p "$kx/mods"
	todo=$GUEST_MODULES
	seen=
	while [ -n "$todo" ]; do
		need=
		for m in $todo; do
			[ -n "$(module_path "$m")" ] || need="$need $m"
		done
		# shellcheck disable=SC2086
		[ -z "$need" ] || unpack_modules $need
		next=
		for m in $todo; do
			seen="$seen $m"
			module_ko "$m"
			# .modinfo holds NUL-terminated key=value strings
			deps=$(tr '\0' '\n' <"$kx/mods/$m.ko" | sed -n 's/^depends=//p' | head -n 1 | tr ',' ' ')
			echo "$deps" >"$kx/mods/$m.deps"
			for d in $deps; do
				case " $seen $todo $next " in *" $d "*) ;; *) next="$next $d" ;; esac
			done
		done
		todo=$next
	done
	# dependencies first: repeatedly take the modules whose deps are all taken
	order=
	left=$seen
	while [ -n "$left" ]; do
		rest=
		for m in $left; do
			ok=1
			for d in $(cat "$kx/mods/$m.deps"); do
				case " $order " in *" $d "*) ;; *) ok=0 ;; esac
			done
			if [ $ok -eq 1 ]; then order="$order $m"; else rest="$rest $m"; fi
		done
		[ "$rest" != "$left" ] || die "module dependency cycle among:$left"
		left=$rest
	done
	rm -rf "$OUT/modules.tmp"
	mkdir -p "$OUT/modules.tmp"
	for m in $order; do
		cp "$kx/mods/$m.ko" "$OUT/modules.tmp/$m.ko"
		echo "$m" >>"$OUT/modules.tmp/order"
	done
	rm -rf "$OUT/modules"
	mv "$OUT/modules.tmp" "$OUT/modules"
	say "modules for a virtio disk, in load order:$order"
}

build_kernel() {
	say "resolving linux-image-amd64"
	if ! resolve_kernel; then
		apt_update || true
		resolve_kernel || true
	fi
	KDEB=
	if [ -n "$KPKG" ] && [ -n "$KVER" ]; then
		say "kernel package $KPKG $KVER"
		if ! KDEB=$(fetch_deb "$KPKG" "$KVER"); then
			if apt_update; then
				resolve_kernel || die "linux-image-amd64 has no installable kernel dependency"
				say "kernel package $KPKG $KVER"
				KDEB=$(fetch_deb "$KPKG" "$KVER") || {
					cat "$LOG" >&2
					die "apt-get download $KPKG=$KVER failed"
				}
			else
				cat "$LOG" >&2
				die "apt-get download $KPKG=$KVER failed"
			fi
		fi
	else
		# no usable package lists: fall back to a previously downloaded kernel
		KDEB=$(ls -t "$CACHE"/linux-image-[0-9]*-amd64_*_amd64.deb 2>/dev/null | head -n 1) ||
			true
		[ -n "$KDEB" ] || die "cannot resolve linux-image-amd64 (apt-cache depends) and no cached kernel .deb"
		say "package lists unusable, using cached $(basename "$KDEB")"
	fi
	KPKG=$(dpkg-deb -f "$KDEB" Package) || die "bad package file $KDEB"
	KVER=$(dpkg-deb -f "$KDEB" Version)

	say "extracting kernel from $(basename "$KDEB")"
	kx=$CACHE/kernel-x
	rm -rf "$kx"
	mkdir -p "$kx"
	# same as dpkg-deb -x, but only ./boot and the modules we start from (not
	# the ~4000 others); build_modules unpacks their dependencies
	set -f
	# shellcheck disable=SC2046,SC2086
	dpkg-deb --fsys-tarfile "$KDEB" |
		tar -x -C "$kx" -f - --wildcards ./boot $(module_patterns $GUEST_MODULES) 2>/dev/null || true
	set +f
	vmlinuz=$(ls "$kx"/boot/vmlinuz-* 2>/dev/null | head -n 1)
	config=$(ls "$kx"/boot/config-* 2>/dev/null | head -n 1)
	[ -n "$vmlinuz" ] && [ -s "$vmlinuz" ] || die "no /boot/vmlinuz-* in $KDEB"
	[ -n "$config" ] && [ -s "$config" ] || die "no /boot/config-* in $KDEB"

	# Everything the guest needs for the console and its RAM data must be
	# built in; the modules (build_modules) are only for the optional disk.
	for opt in SERIAL_8250 SERIAL_8250_CONSOLE BLK_DEV_INITRD RD_GZIP DEVTMPFS \
		TMPFS PROC_FS SYSFS BINFMT_ELF BINFMT_SCRIPT TTY PRINTK; do
		grep -qx "CONFIG_$opt=y" "$config" ||
			die "$KPKG: CONFIG_$opt is not built in (=y); the guest needs it without modules"
	done
	say "kernel config ok: 8250 serial console, initrd (gzip), devtmpfs, tmpfs built in"

	cp "$vmlinuz" "$OUT/vmlinuz.tmp"
	mv -f "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
	cp "$config" "$OUT/kernel.config"
	extract_vmlinux
	build_modules
	echo "$KPKG $KVER" >"$OUT/kernel.txt"
	rm -rf "$kx"
	say "wrote $OUT/vmlinuz ($(wc -c <"$OUT/vmlinuz") bytes, $KPKG $KVER)"
}

# --- busybox -----------------------------------------------------------------------
find_busybox() {
	st=$(dpkg-query -W -f='${Status}' busybox-static 2>/dev/null || true)
	case "$st" in
	*" ok installed")
		if [ -x /bin/busybox ]; then
			BB=/bin/busybox
			say "busybox from host (busybox-static $(dpkg-query -W -f='${Version}' busybox-static))"
			return 0
		fi
		;;
	esac
	ver=$(cand_version busybox-static)
	if [ -z "$ver" ]; then
		apt_update || true
		ver=$(cand_version busybox-static)
	fi
	[ -n "$ver" ] || die "busybox-static: no candidate version (apt-get update?)"
	if ! bdeb=$(fetch_deb busybox-static "$ver"); then
		apt_update || {
			cat "$LOG" >&2
			die "apt-get download busybox-static=$ver failed"
		}
		ver=$(cand_version busybox-static)
		bdeb=$(fetch_deb busybox-static "$ver") || {
			cat "$LOG" >&2
			die "apt-get download busybox-static=$ver failed"
		}
	fi
	bx=$CACHE/busybox-x
	rm -rf "$bx"
	mkdir -p "$bx"
	dpkg-deb -x "$bdeb" "$bx" || die "cannot unpack $bdeb"
	BB=$bx/bin/busybox
	[ -x "$BB" ] || die "no /bin/busybox in $bdeb"
	say "busybox from $(basename "$bdeb")"
}

build_initrd() {
	find_busybox
	"$BB" sh -n "$INIT" || die "$INIT: shell syntax error"
	applets=$("$BB" --list) || die "$BB does not run on this host"
	for a in sh mount md5sum dd od tr sleep mkdir cat insmod grep printf; do
		echo "$applets" | grep -qx "$a" || die "busybox lacks applet '$a'"
	done
	"$BB" sleep 0.01 || die "busybox sleep does not take fractional seconds"

	r=$CACHE/initramfs
	rm -rf "$r"
	mkdir -p "$r/bin" "$r/sbin" "$r/dev" "$r/proc" "$r/sys" "$r/run" "$r/tmp" "$r/root" "$r/etc"
	cp "$BB" "$r/bin/busybox"
	chmod 755 "$r/bin/busybox"
	for a in $applets; do
		[ "$a" = busybox ] || ln -s busybox "$r/bin/$a"
	done
	cp "$INIT" "$r/init"
	chmod 755 "$r/init"
	# loaded by guest/init only for a disk (cprd.disk=)
	mkdir -p "$r/lib/modules"
	cp "$OUT/modules/order" "$OUT"/modules/*.ko "$r/lib/modules/"
	# The kernel's built-in initramfs already has /dev/console; add our own
	# nodes when we can (needs root).
	mknod -m 600 "$r/dev/console" c 5 1 2>/dev/null || true
	mknod -m 666 "$r/dev/null" c 1 3 2>/dev/null || true

	if command -v cpio >/dev/null 2>&1; then
		(cd "$r" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) |
			gzip -9n >"$OUT/initrd.img.tmp"
	else
		(cd "$r" && find . -mindepth 1 | LC_ALL=C sort | "$BB" cpio -o -H newc 2>/dev/null) |
			gzip -9n >"$OUT/initrd.img.tmp"
	fi
	[ -s "$OUT/initrd.img.tmp" ] || die "cpio produced nothing"
	mv -f "$OUT/initrd.img.tmp" "$OUT/initrd.img"
	rm -rf "$r"
	say "wrote $OUT/initrd.img ($(wc -c <"$OUT/initrd.img") bytes)"
}

# The kernel only depends on this script; a changed guest/init rebuilds the initrd.
if [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/kernel.txt" ] && [ "$OUT/vmlinuz" -nt "$SELF" ] &&
	[ -s "$OUT/modules/order" ]; then
	say "kernel up to date ($(cat "$OUT/kernel.txt"))"
	[ -s "$OUT/vmlinux" ] || extract_vmlinux
	touch "$OUT/vmlinuz" "$OUT/kernel.txt"
else
	build_kernel
fi
build_initrd
