#!/bin/sh
# make demo: start cprd in a private runtime directory, run a real Linux guest
# under it, show its heartbeat and `cprctl list`, then clean everything up.
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
	rm -rf "$STATE"
}
trap cleanup EXIT INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "starting cprd (state in $STATE)"
"$B/cprd" --state-dir "$STATE"
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

step "cprctl status demo"
"$CPRCTL" status demo

step "cprctl destroy demo"
"$CPRCTL" destroy demo
"$CPRCTL" list
echo
echo "demo finished: the guest ran under cprd and everything was released."
