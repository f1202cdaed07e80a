#!/bin/sh
# make demo: start cprd in a private runtime directory, run a real Linux guest
# under it, show its heartbeat and `cprctl list`, update its QEMU twice under
# the running guest, then clean everything up.
set -eu
B=${1:-build}
B=$(cd "$B" && pwd)
STATE=$(mktemp -d /tmp/cprd-demo.XXXXXX)
export CPRD_SOCKET="$STATE/cprd.sock"
CPRCTL="$B/cprctl"

cleanup() {
	"$CPRCTL" destroy demo >/dev/null 2>&1 || true
	[ -f "$STATE/pid" ] && kill "$(cat "$STATE/pid")" 2>/dev/null || true
	sleep 0.2
	rm -rf "$STATE" "$STATE.kept"
}
trap cleanup EXIT INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "starting cprd (state in $STATE)"
# The accelerator `make guest` found able to boot the guest here.
"$B/cprd" --state-dir "$STATE" --log-dir "$STATE.kept" \
	--accel "$(cat "$B/guest/accel" 2>/dev/null || echo auto)"
"$CPRCTL" daemon status --json | sed -n 's/.*"pid": \([0-9]*\).*/\1/p' >"$STATE/pid"
"$CPRCTL" daemon status

step "cprctl create demo --memory 256M --kernel ... (a Debian kernel + busybox guest)"
"$CPRCTL" create demo --memory 256M --kernel "$B/guest/vmlinuz" --initrd "$B/guest/initrd.img" \
	--append "console=ttyS0 quiet cprd.data_mb=16 cprd.hb_ms=250"

step "cprctl list"
"$CPRCTL" list

step "the guest's serial console (a log fd that cprd holds)"
LOG=$("$CPRCTL" status demo --json | sed -n 's/.*"console_log": "\(.*\)".*/\1/p')
i=0
until [ "$(grep -c 'CPRD-GUEST hb' "$LOG" 2>/dev/null || true)" -ge 8 ]; do
	i=$((i + 1))
	[ $i -le 600 ] || { echo "no heartbeat after 120 s" >&2; exit 1; }
	sleep 0.2
done
grep 'CPRD-GUEST' "$LOG" | tail -n 10

step "cprctl fds demo (guest RAM is cprd's sealed memfd)"
"$CPRCTL" fds demo

step "cprctl update demo (handover: a new QEMU takes the running guest over)"
"$CPRCTL" update demo

step "cprctl update demo --strategy cpr-transfer (QEMU's own mode, through cprd)"
"$CPRCTL" update demo --strategy cpr-transfer

step "the guest noticed nothing: its heartbeat goes on, one boot, data intact"
last=$(grep -c 'CPRD-GUEST hb' "$LOG")
i=0
until [ "$(grep -c 'CPRD-GUEST hb' "$LOG")" -ge $((last + 4)) ]; do
	i=$((i + 1))
	[ $i -le 300 ] || { echo "no heartbeat after the updates" >&2; exit 1; }
	sleep 0.2
done
grep 'CPRD-GUEST' "$LOG" | tail -n 6
echo "boots seen: $(grep -c 'CPRD-GUEST boot' "$LOG")"

step "cprctl history demo"
"$CPRCTL" history demo

step "cprctl status demo"
"$CPRCTL" status demo

step "cprctl destroy demo"
"$CPRCTL" destroy demo
"$CPRCTL" list

step "cprctl history demo (kept after destroy, with its console log, in $STATE.kept/demo)"
"$CPRCTL" history demo
echo
echo "demo finished: the guest ran under cprd, moved to two new QEMUs without"
echo "noticing, and everything held for it was released; its logs and history are kept."
