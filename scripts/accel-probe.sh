#!/bin/sh
# Decide how the test guest can run here: writes "kvm" or "tcg" to
# GUESTDIR/accel. /dev/kvm can exist and still not boot a Linux guest (a
# nested hypervisor that hides CPU features: QEMU then hangs in the
# guest's early boot), so the only proof is booting the real guest.
# Usage: sh scripts/accel-probe.sh GUESTDIR
set -eu

DIR=${1:-build/guest}
OUT=$DIR/accel
PROBE_SECONDS=${CPRD_ACCEL_PROBE_SECONDS:-20}

if [ -s "$OUT" ] && [ "$OUT" -nt "$DIR/vmlinuz" ] && [ "$OUT" -nt "$0" ]; then
	echo "accel: $(cat "$OUT") (probed before)"
	exit 0
fi
if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
	echo tcg >"$OUT"
	echo "accel: tcg (no usable /dev/kvm)"
	exit 0
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
timeout "$PROBE_SECONDS" qemu-system-x86_64 -accel kvm -machine q35 -m 256 -display none \
	-nodefaults -serial "file:$log" -kernel "$DIR/vmlinuz" -initrd "$DIR/initrd.img" \
	-append "console=ttyS0 quiet cprd.hb_ms=200" >/dev/null 2>&1 &
qemu=$!
i=0
while [ "$i" -lt $((PROBE_SECONDS * 5)) ]; do
	grep -q 'CPRD-GUEST hb' "$log" 2>/dev/null && break
	kill -0 "$qemu" 2>/dev/null || break
	sleep 0.2
	i=$((i + 1))
done
kill "$qemu" 2>/dev/null || true
wait "$qemu" 2>/dev/null || true
if grep -q 'CPRD-GUEST hb' "$log"; then
	echo kvm >"$OUT"
	echo "accel: kvm (the guest booted under KVM)"
else
	echo tcg >"$OUT"
	echo "accel: tcg (/dev/kvm exists but the guest did not boot under KVM in ${PROBE_SECONDS} s)"
fi
