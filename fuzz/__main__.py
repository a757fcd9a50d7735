"""``python -m fuzz``: the command line of the atheris fuzz campaigns, run from a checkout.

Argparse, the report printer and the exit-code contract; ``fuzz.runner`` does the work. It
lives in the checkout's ``fuzz/``, not in the installed package, because it only ever works
beside the harnesses, corpora and dictionaries a checkout has (docs/architecture.md, "fuzz/:
fuzzing, in the checkout only"). Exit codes are balloonctl's: 0 done; 1 a tool failed; 2
usage; 3 a run or a replay found something. Errors are one line on stderr; ``-v`` adds the
detail.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from typing import Final, NoReturn

from balloonctl.errors import BalloonError, UsageError
from fuzz import runner

PROG = "python -m fuzz"
EXIT_FAILED = 1
EXIT_USAGE = 2

Command = Callable[[argparse.Namespace], tuple[runner.Report, int]]
Render = Callable[[runner.Report], str]

#: Each action's work and its table; the names are the ACTION argument.
ACTIONS: Final[dict[str, tuple[Command, Render]]] = {
    "run": (runner.cmd_run, runner.render_run),
    "minimize": (runner.cmd_minimize, runner.render_minimize),
    "reproduce": (runner.cmd_reproduce, runner.render_reproduce),
    "differential": (runner.cmd_differential, runner.render_differential),
    "coverage": (runner.cmd_coverage, runner.render_coverage),
    "bench": (runner.cmd_bench, runner.render_bench),
}

# One input may take this long before libFuzzer calls it a hang (its own default, 1200 s,
# would let a single hang eat a whole smoke campaign).
DEFAULT_INPUT_TIMEOUT = 10


class _Parser(argparse.ArgumentParser):
    """argparse with balloonctl's usage-error contract: one line on stderr, exit 2, so that
    a script (the Makefile's smoke campaign, CI) reads one reason, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _jobs(text: str) -> int:
    """A job count from 1 to a few per core: libFuzzer's -fork=N starts N processes at once,
    so 10**8 of them is a fork bomb, while many more than the cores only makes each slower."""
    value = _positive(text)
    limit = max(4 * (os.cpu_count() or 1), 8)
    if value > limit:
        raise argparse.ArgumentTypeError(f"at most {limit} (4 per core): {text!r}")
    return value


def _positive(text: str) -> int:
    """A whole number above zero: a zero or negative time or job count is a mistake."""
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree: one ACTION per campaign tool, its report a table or JSON."""
    parser = _Parser(
        prog=PROG,
        description="Run, minimize, reproduce and measure the fuzz targets of this checkout's "
        "fuzz/. Exit 3 when a run or a replay finds something.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log detail to stderr")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object on stdout (before ACTION)"
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    actions.required = True

    common = _Parser(add_help=False)
    common.add_argument(
        "--fuzz-dir",
        metavar="DIR",
        help="the fuzz/ with fuzz_<target>.py and replay.py; fixtures/ is beside it "
        "(default: this fuzz/)",
    )
    workdir = _Parser(add_help=False)
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
        type=_jobs,
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
    bench = actions.add_parser(
        "bench",
        parents=[common],
        help="every target's rate (exec/s) on one core, against its goal",
        description="Fuzz every target for --time seconds, one at a time on one core, each "
        "from the committed corpus (fixtures/corpus/TARGET) copied into a scratch working "
        "corpus, and print exec/s, the goal (issue 17) and whether it is met, and exec per CPU "
        "second. Exit 3 on any finding; a missed goal is reported, not an error.",
    )
    bench.add_argument(
        "--time", type=_positive, default=60, metavar="S", help="seconds per target (default 60)"
    )
    bench.add_argument(
        "--workdir",
        metavar="DIR",
        help="keep the runs' corpus/, artifacts/ and logs/ here; its corpus/ is emptied first "
        "(default: a scratch directory, removed afterwards)",
    )
    bench.add_argument(
        "--input-timeout",
        type=_positive,
        default=DEFAULT_INPUT_TIMEOUT,
        metavar="S",
        help=f"seconds one input may take before it is a hang (default {DEFAULT_INPUT_TIMEOUT})",
    )
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
    return parser


def emit(args: argparse.Namespace, report: runner.Report, table: Render) -> None:
    """A report as one JSON object (--json, for scripts and CI) or as the action's table."""
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        sys.stdout.write(table(report))


def _terminated(signum: int, _frame: object) -> NoReturn:
    """SIGTERM unwinds the action instead of killing the process on the spot.

    Python's default for SIGTERM ends the process without running a single ``finally``, and
    the runner's ``finally`` is what ends the fuzzer's process group: a CI timeout would leave
    libFuzzer jobs running. The exit status is still the shell's 128 + 15.
    """
    raise SystemExit(128 + signum)


def _exit_code(exc: BalloonError) -> int:
    """Usage errors exit 2, a tool that failed (FuzzerFailed) 1; findings never raise."""
    return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    """Run one action; return its exit code (never raise for a user's mistake)."""
    args = build_parser().parse_args(argv)
    command, table = ACTIONS[args.action]
    # Only where SIGTERM still has its default action (an ignored one stays ignored), and
    # only the main thread may set handlers; the default comes back afterwards.
    catch = (
        signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        and threading.current_thread() is threading.main_thread()
    )
    if catch:
        signal.signal(signal.SIGTERM, _terminated)
    try:
        report, code = command(args)
        emit(args, report, table)
    except BalloonError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"fuzz: error: {exc}", file=sys.stderr)
        return _exit_code(exc)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_FAILED
    finally:
        if catch:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return code


if __name__ == "__main__":
    sys.exit(main())
