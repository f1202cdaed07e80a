#!/bin/sh
# Make sure CC can build and link with FLAGS (clang with its sanitizer and
# libFuzzer runtimes, for `make asan` and `make fuzz`), and that json-c is
# there for pkg-config; install clang, libclang-rt-dev, libjson-c-dev and
# pkg-config when not.
# Usage: sh scripts/need-clang.sh DIR CC FLAGS...   (DIR: for the probe files)
set -eu
DIR=$1
CC=$2
shift 2
PKGS="clang libclang-rt-dev libjson-c-dev pkg-config"

mkdir -p "$DIR"
case " $* " in
*fuzzer*) echo 'int LLVMFuzzerTestOneInput(const char *d, unsigned long n) { return 0; }' ;;
*) echo 'int main(void) { return 0; }' ;;
esac >"$DIR/probe.c"
probe() {
	"$CC" "$@" -o "$DIR/probe" "$DIR/probe.c" >/dev/null 2>&1 &&
		pkg-config --exists json-c 2>/dev/null
}
probe "$@" && exit 0
if [ "$(id -u)" -ne 0 ]; then
	echo "need-clang: $CC cannot link with $* (or json-c is missing); run as root to install $PKGS" >&2
	exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $PKGS
if ! probe "$@"; then
	echo "need-clang: $CC still cannot link with $* after installing $PKGS:" >&2
	"$CC" "$@" -o "$DIR/probe" "$DIR/probe.c" >&2
	exit 1
fi
