#!/usr/bin/env python3
"""Run the integration tests and close with one summary line that CI reads:
'integration: N passed, N failed, N skipped'. Skips print their reason."""

import argparse
import os
import sys
import time
import unittest

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)


class Result(unittest.TextTestResult):
    def startTest(self, test):
        self._t0 = time.monotonic()
        super().startTest(test)

    def _took(self):
        return f" ({time.monotonic() - self._t0:.1f}s)"

    def addSuccess(self, test):
        super().addSuccess(test)
        self.stream.write(f"PASS {test.id()}{self._took()}\n")

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self.stream.write(f"FAIL {test.id()}{self._took()}\n")

    def addError(self, test, err):
        super().addError(test, err)
        self.stream.write(f"ERROR {test.id()}{self._took()}\n")

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            self.stream.write(f"FAIL {subtest.id()}{self._took()}\n")

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self.stream.write(f"SKIP {test.id()}: {reason}\n")

    def printErrors(self):
        self.printErrorList("ERROR", self.errors)
        self.printErrorList("FAIL", self.failures)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.path.join(here, "..", "..", "build"))
    ap.add_argument("-k", dest="pattern", action="append", help="only tests matching")
    ap.add_argument("modules", nargs="*")
    args = ap.parse_args()
    os.environ["CPRD_BUILD"] = os.path.abspath(args.build)

    loader = unittest.TestLoader()
    if args.pattern:
        loader.testNamePatterns = [f"*{p}*" for p in args.pattern]
    if args.modules:
        suite = loader.loadTestsFromNames([m.removesuffix(".py") for m in args.modules])
    else:
        suite = loader.discover(here, pattern="test_*.py", top_level_dir=here)
    runner = unittest.TextTestRunner(stream=sys.stdout, verbosity=0, resultclass=Result)
    res = runner.run(suite)
    # A test whose subtests fail is one failed test, however many failed; a
    # test is skipped when it was skipped as a whole, not one of its subtests.
    failed = len({getattr(t, "test_case", t).id() for t, _ in res.failures + res.errors} |
                 {t.id() for t in res.unexpectedSuccesses})
    skipped = len([t for t, _ in res.skipped if not hasattr(t, "test_case")])
    passed = res.testsRun - failed - skipped
    print(f"integration: {passed} passed, {failed} failed, {skipped} skipped")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
