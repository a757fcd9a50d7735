"""``balloonctl fuzz``: the command line of the atheris fuzz campaigns.

Only argparse here: ``balloonctl.cli.main`` builds this part of its parser on every run, so the
work (subprocesses, tempfile, coverage, libFuzzer log parsing) lives in
``balloonctl.fuzzrunner``, imported when a fuzz command actually runs. See that module for
why the harnesses run as subprocesses and where a campaign keeps its state.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any

Report = dict[str, Any]
Table = Callable[[Report], str]
Emit = Callable[[argparse.Namespace, Report, Table], int]

# One input may take this long before libFuzzer calls it a hang (its own default, 1200 s,
# would let a single hang eat a whole smoke campaign).
DEFAULT_INPUT_TIMEOUT = 10


def _positive(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _dispatch(action: str, emit: Emit, args: argparse.Namespace) -> int:
    """Run ``fuzzrunner.cmd_<action>`` and print its report with ``render_<action>``."""
    from balloonctl import fuzzrunner  # noqa: PLC0415 (only when a fuzz command runs)

    report, code = getattr(fuzzrunner, f"cmd_{action}")(args)
    emit(args, report, getattr(fuzzrunner, f"render_{action}"))
    return int(code)


def add_commands(commands: Any, emit: Emit) -> None:
    """The ``fuzz`` command group, under the CLI's ``commands`` (its subparsers action).

    ``emit`` is the CLI's report printer (a table, or one JSON object with --json); taken
    as an argument so this module does not import the CLI.
    """
    fuzz = commands.add_parser(
        "fuzz",
        help="atheris fuzz campaigns of the device side and the other untrusted-input parsers",
        description="Run, minimize, reproduce and measure the fuzz targets of a source "
        "checkout's fuzz/. Exit 3 when a run or a replay finds something.",
    )
    actions = fuzz.add_subparsers(dest="fuzz_command", metavar="ACTION", parser_class=type(fuzz))
    actions.required = True

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--fuzz-dir",
        metavar="DIR",
        help="the fuzz/ with fuzz_<target>.py and replay.py; fixtures/ is beside it "
        "(default: the checkout this balloonctl runs from)",
    )
    workdir = argparse.ArgumentParser(add_help=False)
    workdir.add_argument(
        "--workdir",
        metavar="DIR",
        help="campaign state: corpus/<target>/, artifacts/, logs/ "
        "(default $XDG_CACHE_HOME/balloonctl/fuzz)",
    )
    workdir.add_argument(
        "--input-timeout",
        type=_positive,
        default=DEFAULT_INPUT_TIMEOUT,
        metavar="S",
        help=f"seconds one input may take before it is a hang (default {DEFAULT_INPUT_TIMEOUT})",
    )

    run = actions.add_parser(
        "run",
        parents=[common, workdir],
        help="fuzz a target (or all) for a while; exit 3 on any finding",
        description="Fuzz TARGET (`all`: each in turn, the time split evenly) with libFuzzer: "
        "its dictionary, a working corpus seeded from fixtures/corpus/TARGET (the checkout "
        "is not written to) and findings written as ARTIFACTS/<target>-crash-<sha1>.",
    )
    run.add_argument("target", metavar="TARGET", help="a fuzz target, or all")
    run.add_argument(
        "--libfuzzer",
        dest="libfuzzer_args",
        action="append",
        default=[],
        metavar="-FLAG=VALUE",
        help="one more libFuzzer flag, written --libfuzzer=-max_len=65536 (repeatable)",
    )
    run.add_argument(
        "--time", type=_positive, default=60, metavar="S", help="seconds in all (default 60)"
    )
    run.add_argument(
        "--jobs",
        type=_positive,
        metavar="N",
        help="fuzzing processes, libFuzzer's -fork=N; 1 runs in-process (default: all cores)",
    )
    run.add_argument(
        "--corpus",
        metavar="DIR",
        help="working corpus (with all: DIR/<target>) (default WORKDIR/corpus/<target>)",
    )
    run.add_argument(
        "--artifacts", metavar="DIR", help="where findings go (default WORKDIR/artifacts)"
    )
    run.set_defaults(func=functools.partial(_dispatch, "run", emit))

    minimize = actions.add_parser(
        "minimize",
        parents=[common, workdir],
        help="merge a campaign's new coverage into the committed corpus",
        description="libFuzzer's -merge=1: add to fixtures/corpus/TARGET (or --corpus) the "
        "inputs of the working corpus (or --from) that reach new coverage. Nothing is "
        "removed: the corpus keeps its regression inputs.",
    )
    minimize.add_argument("target", metavar="TARGET", help="a fuzz target, or all")
    minimize.add_argument(
        "--corpus",
        metavar="DIR",
        help="corpus to merge into (with all: DIR/<target>) (default fixtures/corpus/TARGET)",
    )
    minimize.add_argument(
        "--from",
        dest="source",
        metavar="DIR",
        help="corpus to take from (with all: DIR/<target>) (default WORKDIR/corpus/TARGET)",
    )
    minimize.set_defaults(func=functools.partial(_dispatch, "minimize", emit))

    reproduce = actions.add_parser(
        "reproduce",
        parents=[common],
        help="replay one input without atheris: its failure in one line, exit 3",
        description="Replay FILE with fuzz/replay.py. The target comes from the path "
        "(.../corpus/<target>/...) or the artifact's name (<target>-crash-...) unless "
        "--target says. Exit 3 and one `FINDING <target> <file>: <Type>: <message>` line "
        "when it fails; 0 when it passes.",
    )
    reproduce.add_argument("file", metavar="FILE", help="an artifact or a corpus file")
    reproduce.add_argument("--target", metavar="T", help="the fuzz target FILE belongs to")
    reproduce.add_argument(
        "--timeout",
        type=_positive,
        default=60,
        metavar="S",
        help="a replay running longer is a finding (a hang) (default 60)",
    )
    reproduce.set_defaults(func=functools.partial(_dispatch, "reproduce", emit))

    differential = actions.add_parser(
        "differential",
        parents=[common],
        help="vring parse against rust-vmm's virtio-queue: corpora, then random rings",
        description="Pop every ring of the committed corpus and of the vring_image campaign "
        "corpus (WORKDIR/corpus/vring_image) with balloonctl's parser and with rust-vmm's "
        "virtio-queue crate (fuzz/virtio_queue_oracle, built with Debian's packaged crate), "
        "then random and mutated rings until --time is up. Exit 3 on a disagreement that "
        "docs/differential-virtio-queue.md does not explain (written to ARTIFACTS); exit 1, "
        "saying NOT RUN, where the crate cannot be built (it is packaged for Debian 13).",
    )
    differential.add_argument(
        "--time", type=_positive, default=30, metavar="S", help="seconds in all (default 30)"
    )
    differential.add_argument(
        "--seed", type=int, metavar="N", help="seed of the random rings (default: the clock)"
    )
    differential.add_argument(
        "--workdir",
        metavar="DIR",
        help="campaign state: corpus/vring_image/ is replayed, findings go to artifacts/ "
        "(default $XDG_CACHE_HOME/balloonctl/fuzz)",
    )
    differential.set_defaults(func=functools.partial(_dispatch, "differential", emit))

    coverage = actions.add_parser(
        "coverage",
        parents=[common],
        help="line coverage of balloonctl/virtio/ reached by a corpus (coverage.py)",
        description="Replay the corpus of TARGET (or all) under coverage.py and print the "
        "line coverage of balloonctl/virtio/, and of every part of the package the inputs "
        "reached. Exit 3 if an input fails.",
    )
    coverage.add_argument("target", metavar="TARGET", help="a fuzz target, or all")
    coverage.add_argument(
        "--corpus",
        metavar="DIR",
        help="corpus to replay (with all: DIR/<target>) (default fixtures/corpus/TARGET)",
    )
    coverage.add_argument("--html", metavar="DIR", help="also write coverage.py's HTML report")
    coverage.set_defaults(func=functools.partial(_dispatch, "coverage", emit))
