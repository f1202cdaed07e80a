#!/bin/sh
# Run each Check suite; a suite that fails fails the run, after all have run.
failed=0
for t in "$@"; do
	echo "== $(basename "$t")"
	"$t" || failed=1
done
exit $failed
