#!/bin/sh
# The man pages render: each roff file (from scdoc) through groff with every
# warning on, and through man(1) itself, without a single warning. Usage:
#   check-man.sh PAGE...
set -u
status=0
for page in "$@"; do
	out=$(LC_ALL=C.UTF-8 groff -man -Tutf8 -ww -z "$page" 2>&1)
	if [ -n "$out" ]; then
		echo "check-man: $page: groff warns:" >&2
		echo "$out" >&2
		status=1
	fi
	out=$(LC_ALL=C.UTF-8 MANWIDTH=80 man --warnings -l "$page" 2>&1 >/dev/null)
	if [ -n "$out" ]; then
		echo "check-man: $page: man warns:" >&2
		echo "$out" >&2
		status=1
	fi
	if ! LC_ALL=C.UTF-8 MANWIDTH=80 man -l "$page" 2>/dev/null | grep -q "^NAME"; then
		echo "check-man: $page: renders without a NAME section" >&2
		status=1
	fi
	[ "$status" -eq 0 ] && echo "check-man: $page ok"
done
exit $status
