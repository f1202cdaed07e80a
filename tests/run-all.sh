#!/bin/sh
# make check, after the builds: format-check, the unit files' lint
# (systemd-analyze verify), the Check unit suites, the man pages rendering
# without warnings, a short
# fuzz run, the integration tests against the normal build (B) and, at the
# same time, against the ASan build (B/asan, on the guest in B/guest). Every
# part runs even when one before it failed; the exit status is non-zero if
# any failed.
# Ends with a table of the parts and their times, then one line that CI
# reads, for the two integration runs together:
#   integration: N passed, N failed, N skipped
B=${1:-build}
MAKE=${MAKE:-make}
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
start=$(date +%s)

# part NAME COMMAND...: run it, note its time and whether it passed.
part() {
	name=$1
	shift
	echo "== $name"
	t0=$(date +%s)
	if "$@"; then r=ok; else r=FAILED; fi
	echo "$name|$r|$(($(date +%s) - t0))" >>"$T/parts"
}

# counts FILE: "P F S" from run.py, or one failure if it wrote none.
counts() {
	if [ -s "$1" ]; then cat "$1"; else echo "0 1 0"; fi
}

part format-check $MAKE --no-print-directory format-check
part units-verify $MAKE --no-print-directory units-verify B="$B"
part unit sh tests/run-unit.sh "$B"/tests/test_*
part man $MAKE --no-print-directory man-check B="$B"
part fuzz $MAKE --no-print-directory fuzz B="$B" FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
# State directories on a tmpfs in the one run, on a disk file system in the
# other: cprd must work on both (/run/cprd is a tmpfs on an ordinary host).
# Under ASan, every module but those that test what surrounds cprd rather
# than its own code paths: Ansible's role, cprd under a real systemd in a
# container, cprctl's output, the build's file graph, and updates between
# two QEMU versions (the same strategies test_update runs). Every
# operation, strategy, fault and hostile input still runs under ASan.
ASAN_EXCLUDE=${ASAN_EXCLUDE-test_ansible test_container test_cli test_layout test_versions}
set --
for m in $ASAN_EXCLUDE; do set -- "$@" --exclude "$m"; done
#
# The two runs go side by side: most of a test is waiting for a guest, so
# two runs take little longer than the longer one alone. They share nothing
# (each has its own state directories, run mark, network namespaces and
# sanitizer reports). The ASan run's output is shown once it is over.
part "asan integration" python3 tests/integration/run.py --build "$B/asan" --guest "$B/guest" \
	--label asan --counts "$T/asan" --state-base /var/tmp "$@" >"$T/asan.out" 2>&1 &
asan=$!
part integration python3 tests/integration/run.py --build "$B" --counts "$T/normal" --state-tmpfs
wait "$asan"
cat "$T/asan.out"

echo "== check: parts and their times"
while IFS='|' read -r name r secs; do
	case $name in
	integration) n=$(counts "$T/normal") ;;
	"asan integration") n=$(counts "$T/asan") ;;
	*) n= ;;
	esac
	if [ -n "$n" ]; then
		set -- $n
		n="$1 passed, $2 failed, $3 skipped"
	fi
	printf '  %-17s %-6s %5ss%s\n' "$name" "$r" "$secs" "${n:+  $n}"
done <"$T/parts"
printf '  %-17s %-6s %5ss\n' total "" "$(($(date +%s) - start))"
failed_parts=$(awk -F'|' '$2 == "FAILED" { printf "%s%s", sep, $1; sep = ", " }' "$T/parts")
[ -z "$failed_parts" ] || echo "check: FAILED: $failed_parts"
set -- $(counts "$T/normal") $(counts "$T/asan")
echo "integration: $(($1 + $4)) passed, $(($2 + $5)) failed, $(($3 + $6)) skipped"
[ -z "$failed_parts" ]
