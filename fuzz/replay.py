#!/usr/bin/env python3
"""Replay fuzz inputs through a harness without atheris: ``replay.py TARGET FILE_OR_DIR...``.

On the first input that escapes the harness (an undocumented exception or an
OracleViolation) it prints one line, ``FINDING <target> <file>: <Type>: <message>``, and
exits 1; otherwise ``ok <target>: N inputs`` and exit 0. ``python -m fuzz reproduce`` and
the coverage run call it by path, so it must work from any current directory.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fuzz.harness import TARGETS


def _inputs(paths: list[str]) -> list[str]:
    """Files named, and the files directly in directories named, in sorted order."""
    out: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            out.extend(
                os.path.join(path, name)
                for name in sorted(os.listdir(path))
                if os.path.isfile(os.path.join(path, name))
            )
        else:
            out.append(path)
    return out


def main(argv: list[str]) -> int:
    """Command line; returns the exit code."""
    if len(argv) < 2 or argv[0] not in TARGETS:
        names = ", ".join(TARGETS)
        print(f"usage: replay.py TARGET FILE_OR_DIR... (targets: {names})", file=sys.stderr)
        return 2
    target, harness = argv[0], TARGETS[argv[0]]
    files = _inputs(argv[1:])
    for path in files:
        with open(path, "rb") as fh:
            data = fh.read()
        try:
            harness(data)
        except Exception as exc:  # every escape is a finding, whatever its type
            message = " ".join(str(exc).split())
            print(f"FINDING {target} {path}: {type(exc).__name__}: {message}")
            return 1
    print(f"ok {target}: {len(files)} inputs")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
