"""Fuzz harnesses for balloonctl (issue 7).

``fuzz.harness`` holds the pure, atheris-free harness functions (``TARGETS``); the
``fuzz_*.py`` files beside it are thin atheris entry points, and ``fuzz/replay.py`` replays a
corpus without atheris. ``fuzz.runner`` runs campaigns of them (``python -m fuzz``, from the
checkout's root). The package imports balloonctl, never the reverse (docs/architecture.md):
none of this is installed with balloonctl, which could not run it without the checkout.
"""
