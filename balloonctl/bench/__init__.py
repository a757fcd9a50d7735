"""Benchmarks, reachable as ``balloonctl bench NAME``; numbers go in issue notes, not tests."""
