#!/bin/bash -eu
# Builds balloonctl's atheris fuzz targets for ClusterFuzzLite/OSS-Fuzz (runs in the image of
# .clusterfuzzlite/Dockerfile, in $SRC/balloonctl, with $OUT the output directory).
#
# Each target becomes $OUT/fuzz_<target> (compile_python_fuzzer: a PyInstaller bundle and a
# wrapper libFuzzer can run), with its seed corpus as $OUT/fuzz_<target>_seed_corpus.zip and
# its dictionary as $OUT/fuzz_<target>.dict, the names ClusterFuzz looks for beside a target.
#
# The targets are named here, not globbed: tests/fuzz/test_clusterfuzzlite.py checks this
# list against fuzz/fuzz_*.py, fixtures/corpus/ and fixtures/dict/, so a new target cannot be
# left out of continuous fuzzing without the test suite saying so.
TARGETS="
  vring_ops
  vring_image
  balloon_requests
  driver_device_roundtrip
  qmp_replies
  libvirt_stats
  config
"

# The package itself is installed by the Dockerfile; it has no C extension, so nothing here
# needs the sanitizer flags the build environment sets.
for target in $TARGETS; do
  # --paths: the entry points import `fuzz.harness` from the checkout's root, which
  # PyInstaller's analysis must see to bundle it.
  compile_python_fuzzer "fuzz/fuzz_${target}.py" --paths "$SRC/balloonctl"
  (cd "fixtures/corpus/${target}" && zip -q -r "$OUT/fuzz_${target}_seed_corpus.zip" .)
  cp "fixtures/dict/${target}.dict" "$OUT/fuzz_${target}.dict"
done
