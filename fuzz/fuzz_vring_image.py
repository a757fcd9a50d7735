#!/usr/bin/env python3
"""atheris entry point for the ``vring_image`` harness (the logic lives in fuzz/harness.py).

Only the balloonctl package is instrumented for coverage feedback: the harness's own byte
decoder is not, so libFuzzer steers by what the input reaches in balloonctl, not by how it
was decoded. Run: ``./fuzz/fuzz_vring_image.py CORPUS_DIR -max_total_time=60``.
"""

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

with atheris.instrument_imports(include=["balloonctl"]):
    from fuzz import harness

TestOneInput = harness.TARGETS["vring_image"]

if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
