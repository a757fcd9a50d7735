"""Fixtures shared by the backend tests."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest


@pytest.fixture
def sock() -> Iterator[str]:
    """A QMP socket path in a fresh directory under /tmp.

    AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer.
    """
    directory = tempfile.mkdtemp(prefix="qmp-", dir="/tmp")
    yield os.path.join(directory, "qmp.sock")
    shutil.rmtree(directory, ignore_errors=True)
