"""Fuzz harnesses for balloonctl (issue 7).

``fuzz.harness`` holds the pure, atheris-free harness functions (``TARGETS``); the
``fuzz_*.py`` files beside it are thin atheris entry points, and ``fuzz/replay.py`` replays a
corpus without atheris. The package imports balloonctl, never the reverse (DESIGN.md).
"""
