#!/bin/sh
# Build (once) a real Debian bookworm guest disk for real-VM tests: firmware
# boot, disks, networking, the guest agent.
#
#   sh scripts/build-debian-guest.sh [CACHEDIR]
#
# CACHEDIR defaults to $CPRD_QEMU_CACHE/debian-guest (/var/cache/cprd-test/
# debian-guest): outside the clone, reused by every run. It ends up holding
#   debian.img       raw, 3 GiB sparse, GPT: 1 BIOS boot partition (GRUB's
#                    core for SeaBIOS), 2 EFI system partition (GRUB as
#                    EFI/BOOT/BOOTX64.EFI for OVMF), 3 ext4 root "cprd-root"
#   debian.stamp     hash of this script and guest/debian/: the image is
#                    reused while both are unchanged
#   debian.info      kernel, file system UUIDs, build time
#   debian.packages  the installed packages and their versions
#   build.log        everything the last build printed
# Boot it as a read-only base under a qcow2 overlay per VM
# (scripts/debian-guest-smoke.py shows how, with SeaBIOS and with OVMF).
#
# What is inside (guest/debian/ holds the files copied in):
# - debootstrap --variant=minbase plus systemd-sysv, udev, the kernel
#   (linux-image-amd64), grub-pc-bin and grub-efi-amd64-bin, qemu-guest-agent,
#   iproute2, e2fsprogs, iputils-ping, D-Bus (systemd-logind: the agent's
#   guest-shutdown runs `shutdown +0`, which logind schedules); no SSH.
# - GRUB on both firmware paths, its menu and the kernel on ttyS0 (115200),
#   timeout 0, "quiet"; the root is mounted rw at once (no fsck pass at boot:
#   the ext4 journal covers a VM that was killed).
# - root has an empty password and is logged in on ttyS0 by agetty.
# - "CPRD-DEBIAN ready" on ttyS0 when multi-user.target is reached.
# - a writer of durable numbered records on /dev/vdb when that disk exists
#   ("CPRD-DEBIAN disk seq=<k>", usr/local/sbin/cprd-disk-writer).
# - a TCP stream on port 7000, "SEQ n" lines (cprd-seq.socket).
# - systemd-networkd: each Ethernet NIC gets 10.77.0.<last MAC byte>/24.
# - qemu-guest-agent on the virtio-serial port org.qemu.guest_agent.0.
# - an empty /etc/machine-id, so that each clone gets its own at first boot.
# - timers and services a test VM does not need are masked (TCG boots slowly).
#
# Packages come from the Debian mirror that the machine's apt sources already
# name (scripts/mirror.sh). Needs root: loop devices, mounts, chroot.
# The image is built in CACHEDIR/.build.* and renamed into place, so a failed
# or interrupted build leaves the previous image (or none), never half of one;
# loop devices and mounts are released on any exit.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/.." && pwd)
overlay=$top/guest/debian
CACHE=${1:-${CPRD_QEMU_CACHE:-/var/cache/cprd-test}/debian-guest}
IMG_SIZE=3G
ESP_MIB=64
HOSTNAME=cprd-debian
PKGS="systemd-sysv,udev,kmod,linux-image-amd64,initramfs-tools,zstd,grub-pc-bin,grub-efi-amd64-bin,grub2-common,qemu-guest-agent,dbus,iproute2,e2fsprogs,iputils-ping,procps"
# Units that a test VM never needs and that cost boot time under TCG.
MASK="apt-daily.timer apt-daily-upgrade.timer apt-daily.service apt-daily-upgrade.service
dpkg-db-backup.timer dpkg-db-backup.service e2scrub_all.timer e2scrub_all.service
e2scrub_reap.service fstrim.timer fstrim.service man-db.timer man-db.service
systemd-firstboot.service systemd-networkd-wait-online.service getty@tty1.service
systemd-pstore.service systemd-journal-flush.service getty-static.service
systemd-network-generator.service modprobe@dm_mod.service modprobe@fuse.service
modprobe@loop.service modprobe@configfs.service modprobe@drm.service
sys-kernel-debug.mount sys-kernel-tracing.mount sys-kernel-config.mount
sys-fs-fuse-connections.mount dev-hugepages.mount"
umask 022

say() { echo "debian-guest: $*" >&2; }
die() {
	say "error: $*"
	exit 1
}

key() {
	{
		sha256sum <"$here/build-debian-guest.sh"
		(cd "$overlay" && find . -type f | LC_ALL=C sort | xargs sha256sum)
	} | sha256sum | cut -d' ' -f1
}

[ -d "$overlay" ] || die "missing $overlay"
want=$(key)
if [ -f "$CACHE/debian.img" ] && [ "$(cat "$CACHE/debian.stamp" 2>/dev/null)" = "$want" ]; then
	say "$CACHE/debian.img is current"
	echo "$CACHE/debian.img"
	exit 0
fi
[ "$(id -u)" -eq 0 ] || die "must run as root to build $CACHE/debian.img (loop devices, mounts)"
for tool in debootstrap sfdisk losetup partx mkfs.ext4 mkfs.vfat mcopy blkid chroot fstrim flock \
	unshare; do
	command -v "$tool" >/dev/null 2>&1 || die "$tool missing (make debian-guest installs it)"
done
# The build's mounts live in a mount namespace of its own: a process that
# makes a new namespace meanwhile (a container test, say) would otherwise
# copy them and keep the root file system busy after the build unmounts it.
# They also all go when the build ends, however it ends.
if [ "${CPRD_DEBIAN_GUEST_NS:-}" != "$$" ]; then
	CPRD_DEBIAN_GUEST_NS=$$ exec unshare --mount --propagation private \
		sh "$here/build-debian-guest.sh" "$@"
fi
. "$here/mirror.sh"
uri=$(mirror_uri) || die "no Debian mirror URI in the machine's apt sources"

mkdir -p "$CACHE"
# One build at a time; a second caller waits, then finds the image current.
exec 9>"$CACHE/.lock"
flock 9
if [ -f "$CACHE/debian.img" ] && [ "$(cat "$CACHE/debian.stamp" 2>/dev/null)" = "$want" ]; then
	say "$CACHE/debian.img is current (built meanwhile)"
	echo "$CACHE/debian.img"
	exit 0
fi

log=$CACHE/build.log
: >"$log"
tmp=$(mktemp -d "$CACHE/.build.XXXXXX")
root=$tmp/root
img=$tmp/debian.img
loop=

# Everything under $tmp is unmounted before it is removed, and rm never
# crosses into another file system (a /dev bind left mounted must not be
# emptied).
cleanup() {
	rc=$?
	set +e
	if [ -d "$root" ]; then
		for m in $(awk -v r="$root" '$2 == r || index($2, r "/") == 1 { print $2 }' /proc/self/mounts |
			sort -r); do
			umount "$m" 2>/dev/null || umount -l "$m"
		done
	fi
	[ -n "$loop" ] && losetup -d "$loop" 2>/dev/null
	if awk -v r="$tmp" 'index($2, r) == 1 { found = 1 } END { exit !found }' /proc/self/mounts; then
		say "still mounted under $tmp: left in place"
	else
		rm -rf --one-file-system "$tmp"
	fi
	[ "$rc" -eq 0 ] || say "build failed (log: $log)"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

# run CMD...: into the log; on failure the log's tail goes to stderr.
run() {
	echo "+ $*" >>"$log"
	"$@" >>"$log" 2>&1 || {
		rc=$?
		tail -n 25 "$log" >&2
		die "failed ($rc): $*"
	}
}
in_root() { run chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
	DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 "$@"; }

t0=$(date +%s)
say "building $CACHE/debian.img (log: $log)"

# The disk: GPT with a BIOS boot partition for GRUB's core image, an ESP, a root.
run truncate -s "$IMG_SIZE" "$img"
printf 'label: gpt\n%s\n%s\n%s\n' \
	"start=1MiB, size=1MiB, type=21686148-6449-6E6F-744E-656564454649, name=bios" \
	"size=${ESP_MIB}MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=esp" \
	"type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=root" >"$tmp/layout"
run sfdisk -q "$img" <"$tmp/layout"
loop=$(losetup -f --show -P "$img") || die "losetup failed"
echo "+ loop device $loop" >>"$log"
# losetup -P does not always make the partition devices appear: ask again.
[ -b "${loop}p3" ] || run partx -a "$loop"
i=0
while [ ! -b "${loop}p3" ]; do
	i=$((i + 1))
	[ "$i" -le 50 ] || die "${loop}p3 did not appear"
	sleep 0.1
done
run mkfs.vfat -F 32 -n CPRD-ESP "${loop}p2"
run mkfs.ext4 -q -L cprd-root "${loop}p3"
esp_uuid=$(blkid -s UUID -o value "${loop}p2")
root_uuid=$(blkid -s UUID -o value "${loop}p3")
mkdir -p "$root"
run mount "${loop}p3" "$root"
mkdir -p "$root/boot/efi"

say "debootstrap bookworm (minbase + $PKGS)"
run debootstrap --variant=minbase --include="$PKGS" bookworm "$root" "$uri"

say "configuring"
# Fixed name, empty machine id (each clone makes its own at first boot),
# the mirror for apt inside, file systems by UUID.
echo "$HOSTNAME" >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
	"$HOSTNAME" >"$root/etc/hosts"
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id" "$root/etc/resolv.conf"
echo "deb $uri bookworm main" >"$root/etc/apt/sources.list"
cat >"$root/etc/fstab" <<EOF
# cprd test guest
UUID=$root_uuid	/	ext4	rw,errors=remount-ro	0	1
UUID=$esp_uuid	/boot/efi	vfat	noauto,nofail,umask=0077	0	0
EOF
cp -R "$overlay/." "$root/"
in_root passwd -d root
in_root systemctl enable systemd-networkd.service cprd-ready.service cprd-disk-writer.service \
	cprd-seq.socket serial-getty@ttyS0.service
# shellcheck disable=SC2086
in_root systemctl mask $MASK
# The agent is started by udev when its port appears
# (60-qemu-guest-agent.rules): check that this is still so.
grep -rqs 'org.qemu.guest_agent.0' "$root/lib/udev/rules.d" "$root/usr/lib/udev/rules.d" ||
	die "qemu-guest-agent's udev rule is missing: the agent would not start"

# A small initramfs (guest/debian/etc/initramfs-tools).
for m in proc sys dev; do
	run mount --bind "/$m" "$root/$m"
done
kver=$(ls "$root/lib/modules" | sort -V | tail -n 1)
[ -n "$kver" ] && [ -f "$root/boot/vmlinuz-$kver" ] || die "no kernel in the image"
in_root update-initramfs -u -k "$kver"

say "GRUB for BIOS (on $loop) and for UEFI (removable path in the ESP)"
in_root grub-install --target=i386-pc --modules="part_gpt ext2" "$loop"
# The EFI side: grub-install refuses an --efi-directory that is not FAT, and
# the host kernel may have no vfat to mount the ESP with. So this does what
# grub-install does for --removable by hand: the modules into
# /boot/grub/x86_64-efi, a core image whose early config finds /boot/grub by
# the root's UUID, copied into the ESP as EFI/BOOT/BOOTX64.EFI with mtools.
# The ESP is not mounted in the guest (fstab: noauto).
mkdir -p "$root/boot/grub/x86_64-efi"
cp "$root/usr/lib/grub/x86_64-efi/"*.mod "$root/usr/lib/grub/x86_64-efi/"*.lst \
	"$root/boot/grub/x86_64-efi/"
printf 'search.fs_uuid %s root\nset prefix=($root)/boot/grub\n' "$root_uuid" \
	>"$root/boot/grub/x86_64-efi/load.cfg"
in_root grub-mkimage -O x86_64-efi -d /usr/lib/grub/x86_64-efi -p /boot/grub \
	-c /boot/grub/x86_64-efi/load.cfg -o /boot/grub/x86_64-efi/core.efi \
	part_gpt ext2 search search_fs_uuid normal configfile linux serial terminal echo test boot
run env MTOOLS_SKIP_CHECK=1 mmd -i "${loop}p2" ::/EFI ::/EFI/BOOT
run env MTOOLS_SKIP_CHECK=1 mcopy -i "${loop}p2" "$root/boot/grub/x86_64-efi/core.efi" \
	::/EFI/BOOT/BOOTX64.EFI
run env MTOOLS_SKIP_CHECK=1 mdir -/ -i "${loop}p2" ::/
# grub-mkconfig inside a chroot would name the root by its loop device here
# (no /dev/disk/by-uuid without udev): the menu is written by hand, by UUID.
cat >"$root/boot/grub/grub.cfg" <<EOF
# cprd test guest: written by scripts/build-debian-guest.sh
serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
set timeout=0
set timeout_style=hidden
insmod part_gpt
insmod ext2
search --no-floppy --fs-uuid --set=root $root_uuid
menuentry 'Debian GNU/Linux (cprd test guest)' {
	echo 'cprd: loading the kernel'
	linux /boot/vmlinuz-$kver root=UUID=$root_uuid console=ttyS0,115200 net.ifnames=0 rw quiet
	echo 'cprd: loading the initramfs'
	initrd /boot/initrd.img-$kver
	echo 'cprd: starting the kernel'
}
EOF

# No package lists or caches in the image; the freed blocks go back to the
# sparse file (fstrim through the loop device punches holes).
in_root apt-get clean
rm -rf "$root/var/lib/apt/lists/"* "$root/var/cache/apt/"*.bin "$root/var/log/"*.log \
	"$root/var/log/apt/"* "$root/tmp/"*
chroot "$root" dpkg-query -W -f '${Package} ${Version}\n' >"$tmp/debian.packages"
initrd_kb=$(($(stat -c %s "$root/boot/initrd.img-$kver") / 1024))
for m in dev sys proc; do
	run umount "$root/$m"
done
# Blocks freed by the deletions above are free for fstrim only once the
# journal has committed them.
run sync -f "$root"
run fstrim -v "$root"
run umount "$root"
run e2fsck -fn "${loop}p3"
run losetup -d "$loop"
loop=

cat >"$tmp/debian.info" <<EOF
kernel $kver
initrd_kb $initrd_kb
root_uuid $root_uuid
esp_uuid $esp_uuid
hostname $HOSTNAME
built $(date -u +%Y-%m-%dT%H:%M:%SZ)
build_seconds $(($(date +%s) - t0))
EOF
mv "$tmp/debian.packages" "$CACHE/debian.packages"
mv "$tmp/debian.info" "$CACHE/debian.info"
rm -f "$CACHE/debian.stamp"
mv "$img" "$CACHE/debian.img"
echo "$want" >"$CACHE/debian.stamp"
say "built $CACHE/debian.img in $(($(date +%s) - t0)) s" \
	"($(du -h "$CACHE/debian.img" | cut -f1) on disk, kernel $kver)"
echo "$CACHE/debian.img"
