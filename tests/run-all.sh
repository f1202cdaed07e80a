#!/bin/sh
# make check: the Check unit suites, then the integration tests against real
# QEMU and the real guest. Ends with the integration runner's summary line.
B=${1:-build}
status=0
sh tests/run-unit.sh "$B"/tests/test_* || status=1
python3 tests/integration/run.py --build "$B" || status=1
exit $status
