"""The committed fuzz corpus of every target replays through its harness without atheris.

One test per target, not per file: a few hundred files would drown the test report, and
the failure message names the file. A failure here is a finding (or a regression of one).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fuzz.harness import TARGETS

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "fixtures" / "corpus"
NAMES = (
    "vring_ops",
    "vring_image",
    "balloon_requests",
    "driver_device_roundtrip",
    "qmp_replies",
    "libvirt_stats",
    "config",
)


def test_targets_are_exactly_the_seven() -> None:
    assert set(TARGETS) == set(NAMES)


@pytest.mark.parametrize("target", NAMES)
def test_entry_point_exists_and_is_executable(target: str) -> None:
    path = ROOT / "fuzz" / f"fuzz_{target}.py"
    assert path.is_file()
    assert os.access(path, os.X_OK)
    assert path.read_text().startswith("#!/usr/bin/env python3\n")


@pytest.mark.parametrize("target", NAMES)
def test_corpus_replays(target: str) -> None:
    folder = CORPUS / target
    files = sorted(p for p in folder.iterdir() if p.is_file())
    assert files, f"no corpus for {target}"
    harness = TARGETS[target]
    for path in files:
        assert path.stat().st_size < 64 * 1024, f"{path.name} is over 64 KiB"
        try:
            harness(path.read_bytes())
        except Exception as exc:
            pytest.fail(f"FINDING {target} {path.name}: {type(exc).__name__}: {exc}")


@pytest.mark.parametrize("target", NAMES)
def test_every_target_has_a_dictionary(target: str) -> None:
    assert (ROOT / "fixtures" / "dict" / f"{target}.dict").is_file()
