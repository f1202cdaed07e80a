#!/bin/sh
# Install what cprd needs to build, test and demo on Debian 12 (bookworm).
# With --check also what `make check` needs beyond that: clang-format for
# format-check, clang and its sanitizer and libFuzzer runtimes for the ASan
# build and the fuzz run, systemd-nspawn and debootstrap for the container
# tests (systemd as PID 1, tests/container/).
# With --debian-guest only what scripts/build-debian-guest.sh needs to build
# the Debian guest disk (partitioning, file systems, an ESP without mounting
# it, debootstrap) and scripts/debian-guest-smoke.py to boot it (qemu-img,
# OVMF; SeaBIOS comes with QEMU, which `make deps` installs).
# QEMU >= 10 comes from bookworm-backports; the backports source is added by
# reusing the mirror URI that the machine's apt sources already name, so no
# archive host is written here.
set -eu

PKGS_BUILD="build-essential pkg-config libsystemd-dev libjson-c-dev libev-dev libseccomp-dev libxxhash-dev check scdoc"
# prometheus-node-exporter: the metrics test scrapes cprd's --metrics-file
# through its textfile collector (it runs its own, on a loopback port).
# ansible-core: the rolling-update role (contrib/ansible) runs against three
# cprd instances on this machine (tests/integration/test_ansible.py).
PKGS_RUN="socat cpio busybox-static zstd xz-utils gnuplot-nox procps iproute2 python3 util-linux"
PKGS_CHECK="clang-format clang libclang-rt-dev systemd-container debootstrap prometheus-node-exporter ansible-core"
PKGS_DEBIAN_GUEST="debootstrap fdisk util-linux mount e2fsprogs dosfstools mtools qemu-utils ovmf"
QEMU_MIN=10

case "${1:-}" in
--check) PKGS_RUN="$PKGS_RUN $PKGS_CHECK" ;;
--debian-guest) ;;
"") ;;
*)
	echo "usage: install-deps.sh [--check|--debian-guest]" >&2
	exit 2
	;;
esac

need_root() {
	if [ "$(id -u)" -ne 0 ]; then
		echo "install-deps: must run as root to install packages ($*)" >&2
		exit 1
	fi
}

have_pkgs() {
	for p in "$@"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || return 1
	done
	return 0
}

qemu_major() {
	command -v qemu-system-x86_64 >/dev/null 2>&1 || { echo 0; return; }
	qemu-system-x86_64 --version | sed -n 's/^QEMU emulator version \([0-9]*\).*/\1/p'
}

. "$(dirname "$0")/mirror.sh"

add_backports() {
	list=/etc/apt/sources.list.d/cprd-bookworm-backports.list
	[ -f "$list" ] && return 0
	uri=$(mirror_uri) || { echo "install-deps: no Debian mirror URI in apt sources" >&2; exit 1; }
	echo "deb $uri bookworm-backports main" >"$list"
	echo "install-deps: added bookworm-backports from the configured mirror"
}

updated=0
apt_update() {
	[ "$updated" -eq 1 ] && return 0
	apt-get update -qq
	updated=1
}

if [ "${1:-}" = --debian-guest ]; then
	if ! have_pkgs $PKGS_DEBIAN_GUEST; then
		need_root "$PKGS_DEBIAN_GUEST"
		apt_update
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			$PKGS_DEBIAN_GUEST
	fi
	echo "install-deps: ok (Debian guest build)"
	exit 0
fi

if ! have_pkgs $PKGS_BUILD $PKGS_RUN; then
	need_root "$PKGS_BUILD $PKGS_RUN"
	apt_update
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $PKGS_BUILD $PKGS_RUN
fi

if [ "$(qemu_major)" -lt "$QEMU_MIN" ]; then
	need_root "qemu-system-x86 from bookworm-backports"
	add_backports
	updated=0
	apt_update
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		-t bookworm-backports qemu-system-x86 qemu-utils
fi
echo "install-deps: ok (QEMU $(qemu-system-x86_64 --version | head -n 1 | sed 's/.*version //'))"
