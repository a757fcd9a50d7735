#!/usr/bin/env python3
"""atheris entry point for the ``libvirt_stats`` harness (the logic lives in fuzz/harness.py).

Only the balloonctl modules under test (fuzz/scope.py) are instrumented for coverage
feedback: not the harness's own byte decoder, not balloonctl's support code, so libFuzzer
steers by what the input reaches in the code under test, and pays for nothing else.
Run: ``./fuzz/fuzz_libvirt_stats.py CORPUS_DIR -max_total_time=60``.
"""

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fuzz.scope import excluded

_UNDER_TEST_ONLY = excluded("libvirt_stats")

with atheris.instrument_imports(include=["balloonctl"], exclude=_UNDER_TEST_ONLY):
    from fuzz import harness

TestOneInput = harness.TARGETS["libvirt_stats"]

if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
