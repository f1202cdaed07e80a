# Sourced by scripts/install-deps.sh and tests/container/mkroot.sh.
# mirror_uri: print the Debian archive URI that the machine's apt sources
# already name (deb822 sources first, then one-line sources; the first
# non-security "debian" URI wins), so that no archive host is written in the
# repository.
mirror_uri() {
	for f in /etc/apt/sources.list.d/*.sources; do
		[ -f "$f" ] || continue
		awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' "$f"
	done | head -n 1 | grep . && return 0
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
		[ -f "$f" ] || continue
		awk '$1 == "deb" && $0 ~ /bookworm/ && $0 !~ /security/ {
			for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' "$f"
	done | head -n 1 | grep .
}
