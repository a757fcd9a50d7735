"""Fixtures for every folder. They are written in tests/support/ (plain modules that test
modules import like any library) and registered here, the one place pytest_plugins may be."""

from __future__ import annotations

import pytest

# Their asserts are the tests' own checks (one_line_error, json_out, the raw QMP client's):
# rewritten like a test module's, so a failure shows the values compared.
pytest.register_assert_rewrite("tests.support")

pytest_plugins = ["tests.support.ring", "tests.support.sims", "tests.support.libvirt"]
