#!/bin/sh
# Lint the unit files with systemd-analyze verify: the service from its
# template with this build's binaries in ExecStart=/ExecReload= (verify
# checks that they are executable), and the socket. Any message fails, a
# warning such as an unknown option too.
# Usage: sh scripts/units-verify.sh BUILDDIR
set -eu

B=$(cd "${1:-build}" && pwd)
here=$(cd "$(dirname "$0")/.." && pwd)
command -v systemd-analyze >/dev/null 2>&1 || {
	echo "units-verify: systemd-analyze missing (package systemd)" >&2
	exit 1
}
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
sed -e "s|@SBINDIR@|$B|g" -e "s|@BINDIR@|$B|g" -e "s|@DOCDIR@|$here|g" \
	"$here/units/cprd.service.in" >"$T/cprd.service"
cp "$here/units/cprd.socket" "$T/cprd.socket"
cd "$T"
out=$(SYSTEMD_LOG_COLOR=0 systemd-analyze verify --man=no ./cprd.service ./cprd.socket 2>&1) || {
	printf '%s\n' "$out" >&2
	echo "units-verify: systemd-analyze verify failed" >&2
	exit 1
}
if [ -n "$out" ]; then
	printf '%s\n' "$out" >&2
	echo "units-verify: systemd-analyze verify warned" >&2
	exit 1
fi
echo "units-verify: ok (cprd.service, cprd.socket)"
