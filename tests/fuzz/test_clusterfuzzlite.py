"""The ClusterFuzzLite/OSS-Fuzz build agrees with the fuzz targets of the checkout.

Docker cannot run where the test suite runs, so .clusterfuzzlite/ is never built here. What
can drift is checked instead: build.sh names its targets explicitly, and each of them must
have an entry point, a seed corpus and a dictionary, and every entry point must be named.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CFLITE = REPO / ".clusterfuzzlite"


def build_targets() -> list[str]:
    """The TARGETS list of build.sh, in its order."""
    match = re.search(r'^TARGETS="([^"]*)"', (CFLITE / "build.sh").read_text(), re.M)
    assert match, 'build.sh has no TARGETS="..." list'
    return match[1].split()


def entry_points() -> set[str]:
    return {
        path.name.removeprefix("fuzz_").removesuffix(".py")
        for path in (REPO / "fuzz").glob("fuzz_*.py")
    }


def test_build_sh_names_every_entry_point() -> None:
    targets = build_targets()
    assert len(targets) == len(set(targets)), targets
    assert entry_points(), "no fuzz/fuzz_*.py"
    assert set(targets) == entry_points()


def test_every_target_has_seeds_and_a_dictionary() -> None:
    for target in build_targets():
        corpus = REPO / "fixtures" / "corpus" / target
        assert corpus.is_dir() and any(p.is_file() for p in corpus.iterdir()), corpus
        assert (REPO / "fixtures" / "dict" / f"{target}.dict").is_file(), target


def test_entry_points_are_executable() -> None:
    """libFuzzer's -fork and -merge (python -m fuzz run --jobs N, minimize) run them by path."""
    for target in entry_points():
        entry = REPO / "fuzz" / f"fuzz_{target}.py"
        assert os.access(entry, os.X_OK), entry
        assert entry.read_text().startswith("#!"), entry


def test_build_sh_uses_the_python_conventions() -> None:
    """One compile_python_fuzzer per target, and the seed corpus and dictionary under the
    names ClusterFuzz looks for beside a target: <fuzzer>_seed_corpus.zip, <fuzzer>.dict."""
    script = (CFLITE / "build.sh").read_text()
    assert script.startswith("#!/bin/bash -eu\n")
    assert 'compile_python_fuzzer "fuzz/fuzz_${target}.py"' in script
    assert '"$OUT/fuzz_${target}_seed_corpus.zip"' in script
    assert '"fixtures/corpus/${target}"' in script
    assert 'cp "fixtures/dict/${target}.dict" "$OUT/fuzz_${target}.dict"' in script
    assert os.access(CFLITE / "build.sh", os.X_OK)


def test_dockerfile_and_project_yaml() -> None:
    dockerfile = (CFLITE / "Dockerfile").read_text()
    assert re.search(r"^FROM gcr\.io/oss-fuzz-base/base-builder-python\s*$", dockerfile, re.M)
    assert "COPY . $SRC/balloonctl" in dockerfile
    assert "COPY .clusterfuzzlite/build.sh $SRC/" in dockerfile
    assert re.search(r"^language: python\s*$", (CFLITE / "project.yaml").read_text(), re.M)


def test_make_test_runs_the_smoke_campaign_after_the_unit_tests() -> None:
    makefile = (REPO / "Makefile").read_text()
    match = re.search(r"^test:(.*)$", makefile, re.M)
    assert match
    steps = match[1].split()
    assert steps.index("fuzz-smoke") > steps.index("unit"), steps
