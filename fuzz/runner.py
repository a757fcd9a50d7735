"""What ``python -m fuzz`` does: run, minimize, reproduce and measure atheris campaigns.

``fuzz/__main__.py`` is the command line of it. Both live in the checkout's ``fuzz/``, beside
the harnesses they run, not in the installed package: a wheel ships no harnesses, corpora or
dictionaries, so a runner inside it could only ever fail (docs/architecture.md, "fuzz/:
fuzzing, in the checkout only").

The runner does not import the harnesses either: it runs the entry points and
``fuzz/replay.py`` as subprocesses. libFuzzer wants that: it owns the process it runs in (it
ends it on the first crash), and ``-fork`` and ``-merge`` re-execute the entry point by its
path. Of balloonctl it imports only its errors and the package's location (coverage
measures that copy, and the subprocesses must import it too), as docs/architecture.md's
dependency rule allows: ``fuzz/`` imports ``balloonctl``, never the reverse.

What a ``fuzz/`` provides (by default this module's own directory; ``--fuzz-dir`` points at
another, whose parent is then the root)::

    fuzz/fuzz_<target>.py          executable atheris entry point, libFuzzer arguments
    fuzz/replay.py                 TARGET FILE_OR_DIR...: no atheris; on the first failure
                                   ``FINDING <target> <file>: <Type>: <message>``, exit 1,
                                   else ``ok <target>: N inputs``, exit 0
    fixtures/corpus/<target>/      the committed seed corpus (regression inputs included)
    fixtures/dict/<target>.dict    the libFuzzer dictionary

A campaign's state stays out of the checkout, in ``--workdir`` (default
``$XDG_CACHE_HOME/balloonctl/fuzz``): ``corpus/<target>/`` (the working corpus: seeded from
the committed one, growing from run to run), ``artifacts/<target>-<kind>-<sha1>`` (the
findings; the target prefix lets ``reproduce`` tell the target from the file name) and
``logs/<target>.log`` (libFuzzer's output). ``minimize`` brings what a campaign learnt back
into the committed corpus.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import balloonctl
from balloonctl.errors import FuzzerFailed, UsageError

Report = dict[str, Any]

EXIT_OK = 0
EXIT_FINDING = 3

#: The balloonctl package the harnesses exercise: coverage measures it, and the subprocesses
#: are pointed at this same copy (see _env).
PACKAGE_DIR = Path(balloonctl.__file__).resolve().parent
#: The harnesses' directory by default: the runner lives among them.
FUZZ_DIR = Path(__file__).resolve().parent

# libFuzzer names what it writes after -artifact_prefix by kind; every one of them is a
# finding (slow-unit: a single input that took longer than -report_slow_units, 10 s: a
# hostile guest must never make the device hang, and a slow input is the start of one).
FINDING_KINDS = ("crash", "timeout", "oom", "leak", "slow-unit")

# Beyond -max_total_time: libFuzzer only looks at the clock between inputs, and -fork waits
# for the jobs it has running. Past this, the run is killed and fails (exit 1).
_GRACE_S = 60.0
# libFuzzer's own bookkeeping grows with executions under atheris (measured: 9-minute runs
# reached 1.1-1.7 GB peak RSS while the same harnesses, replaying 235k mutated inputs in
# plain Python, stayed flat at 60 MB), so its default 2048 MB limit would end an hour's
# in-process campaign with a false "oom" finding. A real runaway input still hits this.
_RSS_LIMIT_MB = 6144
_MERGE_LIMIT_S = 1800.0
_REPLAY_LIMIT_S = 1800.0


@dataclass(frozen=True)
class FuzzTree:
    """A ``fuzz/`` directory and the ``fixtures/`` beside it."""

    fuzz_dir: Path

    @property
    def root(self) -> Path:
        return self.fuzz_dir.parent

    @property
    def replay(self) -> Path:
        return self.fuzz_dir / "replay.py"

    def targets(self) -> list[str]:
        """Every target with an entry point, by name: the entry points are the truth."""
        return sorted(
            path.name.removeprefix("fuzz_").removesuffix(".py")
            for path in self.fuzz_dir.glob("fuzz_*.py")
            if path.is_file()
        )

    def entry(self, target: str) -> Path:
        return self.fuzz_dir / f"fuzz_{target}.py"

    def seeds(self, target: str) -> Path:
        return self.root / "fixtures" / "corpus" / target

    def dictionary(self, target: str) -> Path | None:
        path = self.root / "fixtures" / "dict" / f"{target}.dict"
        return path if path.is_file() else None


def locate(fuzz_dir: str | None) -> FuzzTree:
    """The ``fuzz/`` to use: ``--fuzz-dir``, else the runner's own directory.

    The runner is part of the checkout's ``fuzz/``, so its own directory has the targets
    unless it was copied away from them; either way, a directory without entry points is a
    usage error naming it, not a traceback or an empty run.
    """
    if fuzz_dir is None:
        path = FUZZ_DIR
    else:
        path = Path(fuzz_dir).resolve()  # absolute: the subprocesses run elsewhere
        if not path.is_dir():
            raise UsageError(f"--fuzz-dir {fuzz_dir} is not a directory")
    tree = FuzzTree(path)
    if not tree.targets():
        raise UsageError(
            f"no fuzz targets (fuzz_*.py) in {path}: the runner fuzzes the entry points of "
            "the fuzz/ it lives in, or of --fuzz-dir DIR"
        )
    return tree


def select(tree: FuzzTree, name: str) -> list[str]:
    """``all`` or one known target."""
    known = tree.targets()
    if name == "all":
        return known
    if name not in known:
        raise UsageError(f"unknown fuzz target {name!r}; one of: {', '.join(known)}, all")
    return [name]


def infer_target(path: Path, known: Sequence[str]) -> str:
    """The target a file belongs to: ``.../corpus/<target>/...`` or ``<target>-<kind>-...``."""
    parts = path.resolve().parts
    for i, part in enumerate(parts[:-1]):
        if part == "corpus" and parts[i + 1] in known:
            return parts[i + 1]
    name = path.name
    for target in sorted(known, key=len, reverse=True):  # vring_ops before a prefix of it
        rest = name.removeprefix(f"{target}-")
        if rest != name and rest.startswith(tuple(f"{kind}-" for kind in FINDING_KINDS)):
            return target
    raise UsageError(
        f"cannot tell the fuzz target of {path} (neither in corpus/<target>/ nor named "
        f"<target>-crash-...): pass --target, one of: {', '.join(known)}"
    )


def state_dir() -> Path:
    """Where campaigns keep their working corpora, artifacts and logs by default."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "balloonctl" / "fuzz"


def _require(module: str, hint: str) -> None:
    # find_spec looks without importing: reproduce and coverage run without atheris.
    if importlib.util.find_spec(module) is None:
        raise UsageError(f"{module} is not installed in {sys.executable}: {hint}")


def _env() -> dict[str, str]:
    """The environment of every subprocess."""
    env = dict(os.environ)
    # libFuzzer's -fork and -merge re-run the entry point by its path, so its shebang
    # (`/usr/bin/env python3`) must find this interpreter, whether its venv is active or not.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
    # The package may come from the checkout without an install (the root on sys.path): the
    # harnesses must import this same copy, not another one installed elsewhere.
    if (PACKAGE_DIR.parent / "pyproject.toml").is_file():
        env["PYTHONPATH"] = os.pathsep.join(
            part for part in (str(PACKAGE_DIR.parent), env.get("PYTHONPATH")) if part
        )
    return env


def _count(directory: Path) -> int:
    if not directory.is_dir():
        return 0
    return sum(1 for path in directory.rglob("*") if path.is_file())


def _seed(seeds: Path, corpus: Path) -> int:
    """Copy the committed seeds the working corpus lacks; the checkout itself is never
    written to, however long the campaign."""
    copied = 0
    if not seeds.is_dir():
        return copied
    for path in sorted(seeds.rglob("*")):
        if not path.is_file():
            continue
        dest = corpus / path.relative_to(seeds).as_posix().replace("/", "_")
        if not dest.exists():
            shutil.copyfile(path, dest)
            copied += 1
    return copied


def _artifacts(directory: Path, target: str) -> dict[str, int]:
    """The finding files of ``target`` in ``directory``, with their modification times."""
    kinds = tuple(f"{target}-{kind}-" for kind in FINDING_KINDS)
    if not directory.is_dir():
        return {}
    return {
        path.name: path.stat().st_mtime_ns
        for path in directory.iterdir()
        if path.is_file() and path.name.startswith(kinds)
    }


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End a fuzzer that is still running, with the jobs -fork started (its process group).

    Only while it runs: once reaped, its id (and so its group's) may belong to another
    process.
    """
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def _run_logged(
    cmd: Sequence[str], *, log: Path, cwd: Path, limit: float, echo: bool, what: str
) -> int:
    """Run ``cmd`` with its output in ``log``; its exit status.

    libFuzzer writes a line per coverage step: a log, not the terminal, unless ``-v``, where
    it is copied to stderr as it comes. Past ``limit`` seconds the process group is ended
    and the run fails: a campaign must not outlive its budget (a CI job least of all).
    """
    with log.open("wb") as out:
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=_env(),
            start_new_session=True,  # its own process group: the -fork jobs end with it
        )
    deadline = time.monotonic() + limit
    try:
        with log.open("rb") as follow:
            while True:
                try:
                    status = proc.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    status = None
                if echo:
                    _copy(follow, sys.stderr)
                if status is not None:
                    return status
                if time.monotonic() > deadline:
                    _stop(proc)
                    raise FuzzerFailed(
                        f"{what} still running after {limit:.0f} s; ended (log {log})"
                    )
    finally:
        _stop(proc)  # Ctrl-C, SIGTERM (__main__ raises SystemExit), any error: no orphan fuzzer


def _copy(source: IO[bytes], sink: IO[str]) -> None:
    chunk = source.read()
    if chunk:
        sink.write(chunk.decode(errors="replace"))
        sink.flush()


def _last_words(text: str) -> str:
    """The line that says why a tool stopped: its last one that is not libFuzzer chatter."""
    for raw in reversed(text.splitlines()):
        line = raw.strip()
        if line and not line.startswith(("WARNING:", "INFO:", "stat::", "#", "MERGE-")):
            return line[:300]
    return "no output"


# libFuzzer's progress lines: in-process `#123\tNEW    cov: 5 ft: 5 corp: 2/8b ...
# exec/s: 40`, with -fork `#838376: cov: 5 ft: 5 corp: 2 exec/s 419188 ...`.
_PROGRESS = re.compile(r"^#(\d+):?\s+(?:\w+\s+)?cov: (\d+) ft: (\d+) corp: (\d+)(.*)$", re.M)
_EXEC_RATE = re.compile(r"exec/s:? (\d+)")
_STAT = re.compile(r"^stat::(\w+):\s+(\d+)", re.M)


@dataclass(frozen=True)
class LogStats:
    """What libFuzzer's output says about a run (None: it did not say)."""

    execs: int | None
    exec_per_s: int | None
    cov_start: int | None
    cov_end: int | None
    features_end: int | None


def parse_log(text: str) -> LogStats:
    """Read a run's numbers from libFuzzer's output.

    In-process runs end with ``-print_final_stats=1``'s ``stat::`` lines; a ``-fork`` parent
    prints none, so its last progress line (total executions, rate) is the summary. ``cov``
    is libFuzzer's coverage counter (for atheris: Python branch edges), first against last;
    a -fork parent first prints it after its first job, so there the gain looks smaller.
    """
    stats = {name: int(value) for name, value in _STAT.findall(text)}
    progress = _PROGRESS.findall(text)
    execs = stats.get("number_of_executed_units")
    rate = stats.get("average_exec_per_sec") or None
    if progress:
        last = progress[-1]
        if execs is None:
            execs = int(last[0])
        if rate is None and (match := _EXEC_RATE.search(last[4])) and int(match[1]):
            rate = int(match[1])
    return LogStats(
        execs=execs,
        exec_per_s=rate,
        cov_start=int(progress[0][1]) if progress else None,
        cov_end=int(progress[-1][1]) if progress else None,
        features_end=int(progress[-1][2]) if progress else None,
    )


@dataclass(frozen=True)
class Campaign:
    """One target's run: what it cost, what it found."""

    target: str
    seconds: int
    jobs: int
    mode: str  # "in-process" (jobs 1) or "fork"
    elapsed_s: float
    execs: int | None
    exec_per_s: float | None
    #: CPU seconds the fuzzer used (its own and its -fork jobs'), and executions per CPU
    #: second: what one core does, whatever else the machine runs (exec/s is wall time).
    cpu_s: float
    exec_per_cpu_s: float | None
    corpus: str
    corpus_before: int
    corpus_after: int
    seeds_copied: int
    cov_start: int | None
    cov_end: int | None
    findings: list[str]
    log: str


@dataclass(frozen=True)
class RunOptions:
    """The ``fuzz run`` settings common to every target of one invocation."""

    seconds: int
    jobs: int
    artifacts: Path
    logs: Path
    input_timeout: int
    extra: Sequence[str]
    echo: bool


def run_campaign(tree: FuzzTree, target: str, corpus: Path, opts: RunOptions) -> Campaign:
    """Fuzz ``target`` for ``opts.seconds`` on ``opts.jobs`` processes.

    One job runs in-process (stats at the end, stops at the first finding); more use
    libFuzzer's ``-fork=N``, which with atheris 3 shares one corpus between the jobs and
    survives them. (``-jobs``/``-workers`` run independent fuzzers that only meet through
    the corpus directory and each stop at their own first crash.)
    """
    entry = tree.entry(target)
    if opts.jobs > 1 and not os.access(entry, os.X_OK):
        raise UsageError(f"{entry} is not executable (chmod +x): -fork re-runs it by its path")
    for directory in (corpus, opts.artifacts, opts.logs):
        directory.mkdir(parents=True, exist_ok=True)
    seeded = _seed(tree.seeds(target), corpus)
    before = _count(corpus)
    known = _artifacts(opts.artifacts, target)
    cmd = [
        sys.executable,
        str(entry),
        str(corpus),
        f"-max_total_time={opts.seconds}",
        f"-timeout={opts.input_timeout}",
        f"-rss_limit_mb={_RSS_LIMIT_MB}",
        "-print_final_stats=1",
        f"-artifact_prefix={opts.artifacts}{os.sep}{target}-",
    ]
    if (dictionary := tree.dictionary(target)) is not None:
        cmd.append(f"-dict={dictionary}")
    if opts.jobs > 1:
        cmd.append(f"-fork={opts.jobs}")
    cmd.extend(opts.extra)
    log = opts.logs / f"{target}.log"
    print(
        f"fuzz: fuzzing {target} for {opts.seconds} s on {opts.jobs} job(s) (log {log})",
        file=sys.stderr,
        flush=True,
    )
    started = time.monotonic()
    cpu_before = _children_cpu()
    status = _run_logged(
        cmd,
        log=log,
        cwd=opts.logs,  # -fork and -jobs write their job files into the working directory
        limit=opts.seconds + 2 * opts.input_timeout + _GRACE_S,
        echo=opts.echo,
        what=f"fuzz_{target}.py",
    )
    elapsed = time.monotonic() - started
    cpu = _children_cpu() - cpu_before
    text = log.read_text(errors="replace")
    found = sorted(
        str(opts.artifacts / name)
        for name, mtime in _artifacts(opts.artifacts, target).items()
        if known.get(name) != mtime
    )
    if status != 0 and not found:
        raise FuzzerFailed(
            f"fuzz_{target}.py exited with status {status} and left no finding: "
            f"{_last_words(text)} (log {log})"
        )
    stats = parse_log(text)
    rate: float | None = stats.exec_per_s
    if rate is None and stats.execs and elapsed > 0:
        rate = round(stats.execs / elapsed, 1)
    return Campaign(
        target=target,
        seconds=opts.seconds,
        jobs=opts.jobs,
        mode="fork" if opts.jobs > 1 else "in-process",
        elapsed_s=round(elapsed, 2),
        execs=stats.execs,
        exec_per_s=rate,
        cpu_s=round(cpu, 2),
        exec_per_cpu_s=round(stats.execs / cpu, 1) if stats.execs and cpu > 0 else None,
        corpus=str(corpus),
        corpus_before=before,
        corpus_after=_count(corpus),
        seeds_copied=seeded,
        cov_start=stats.cov_start,
        cov_end=stats.cov_end,
        findings=found,
        log=str(log),
    )


def _children_cpu() -> float:
    """User + system CPU seconds of every child process reaped so far (a campaign runs one
    at a time, so the difference around it is that campaign's)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _corpus_for(option: str | None, target: str, several: bool, default: Path) -> Path:
    """``--corpus DIR`` is the corpus of a single target, or holds ``DIR/<target>`` for all."""
    if option is None:
        return default
    base = Path(option).resolve()
    return base / target if several else base


def cmd_run(args: argparse.Namespace) -> tuple[Report, int]:
    tree = locate(args.fuzz_dir)
    targets = select(tree, args.target)
    _require("atheris", "pip install 'balloonctl[fuzz]' (atheris 3 needs Python 3.11)")
    workdir = Path(args.workdir).resolve() if args.workdir else state_dir()
    jobs = args.jobs or os.cpu_count() or 1
    opts = RunOptions(
        seconds=max(1, args.time // len(targets)),  # `all` splits the budget evenly
        jobs=jobs,
        artifacts=Path(args.artifacts).resolve() if args.artifacts else workdir / "artifacts",
        logs=workdir / "logs",
        input_timeout=args.input_timeout,
        extra=list(args.libfuzzer_args),
        echo=bool(args.verbose),
    )
    campaigns = [
        run_campaign(
            tree,
            target,
            _corpus_for(args.corpus, target, len(targets) > 1, workdir / "corpus" / target),
            opts,
        )
        for target in targets
    ]
    findings = [path for campaign in campaigns for path in campaign.findings]
    for path in findings:
        print(f"fuzz: finding: {path}", file=sys.stderr)
    report: Report = {
        "targets": [asdict(campaign) for campaign in campaigns],
        "artifacts": str(opts.artifacts),
        "findings": findings,
    }
    return report, EXIT_FINDING if findings else EXIT_OK


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def render_run(report: Report) -> str:
    lines = [
        f"{'target':<24} {'time':>6} {'jobs':>4} {'execs':>12} {'exec/s':>9} "
        f"{'corpus':>7} {'new':>5} {'cov':>12} {'findings':>8}"
    ]
    for row in report["targets"]:
        cov = _number(row["cov_end"])
        if row["cov_start"] is not None and row["cov_end"] is not None:
            cov += f" (+{row['cov_end'] - row['cov_start']})"
        lines.append(
            f"{row['target']:<24} {row['seconds']:>5}s {row['jobs']:>4} "
            f"{_number(row['execs']):>12} {_number(row['exec_per_s']):>9} "
            f"{row['corpus_after']:>7} {row['corpus_after'] - row['corpus_before']:>+5} "
            f"{cov:>12} {len(row['findings']):>8}"
        )
    if report["findings"]:
        lines.append("findings (see each with `python -m fuzz reproduce FILE`):")
        lines.extend(f"  {path}" for path in report["findings"])
    else:
        lines.append("no findings")
    return "\n".join(lines) + "\n"


#: The rates issue 17 asks of the device-side targets, in exec/s on one core from the
#: committed corpus; the other targets have none (they were already fast).
GOALS: dict[str, int] = {
    "vring_image": 10_000,
    "vring_ops": 10_000,
    "balloon_requests": 10_000,
    "driver_device_roundtrip": 1_000,
}


def cmd_bench(args: argparse.Namespace) -> tuple[Report, int]:
    """Every target for ``--time`` seconds each on one core, from the committed corpus.

    Each campaign starts from a working corpus seeded from fixtures/corpus only (a scratch
    directory, or ``--workdir`` emptied first), so a rate is comparable with the last one
    measured, never inflated or slowed by what an earlier campaign left. ``met`` compares
    libFuzzer's exec/s with :data:`GOALS`; exec per CPU second is printed beside it because
    on a shared machine wall time also counts everyone else's work. A finding exits 3, as
    ``run`` does; a missed goal does not fail (the rate depends on the machine).
    """
    tree = locate(args.fuzz_dir)
    targets = tree.targets()
    _require("atheris", "pip install 'balloonctl[fuzz]' (atheris 3 needs Python 3.11)")
    with contextlib.ExitStack() as stack:
        if args.workdir:
            workdir = Path(args.workdir).resolve()
            shutil.rmtree(workdir / "corpus", ignore_errors=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fuzz-bench-")))
        opts = RunOptions(
            seconds=args.time,
            jobs=1,
            # Findings outlive a scratch workdir: they go where `run` puts them.
            artifacts=(workdir if args.workdir else state_dir()) / "artifacts",
            logs=workdir / "logs",
            input_timeout=args.input_timeout,
            extra=[],
            echo=bool(args.verbose),
        )
        load_before = os.getloadavg()[0]
        rows: list[dict[str, Any]] = []
        for target in targets:
            campaign = run_campaign(tree, target, workdir / "corpus" / target, opts)
            goal = GOALS.get(target)
            rate = campaign.exec_per_s
            rows.append(
                {
                    "target": target,
                    "exec_per_s": rate,
                    "exec_per_cpu_s": campaign.exec_per_cpu_s,
                    "execs": campaign.execs,
                    "seconds": campaign.elapsed_s,
                    "goal": goal,
                    "met": None if goal is None else (rate is not None and rate >= goal),
                    "findings": campaign.findings,
                }
            )
        findings = [path for row in rows for path in row["findings"]]
        for path in findings:
            print(f"fuzz: finding: {path}", file=sys.stderr)
        report: Report = {
            "seconds_per_target": args.time,
            "jobs": 1,
            "loadavg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "workdir": str(workdir) if args.workdir else None,
            "targets": rows,
            "findings": findings,
        }
    return report, EXIT_FINDING if findings else EXIT_OK


def render_bench(report: Report) -> str:
    lines = [
        f"{'target':<24} {'exec/s':>9} {'goal':>8} {'met':>4} {'exec/cpu-s':>11} "
        f"{'execs':>11} {'findings':>8}"
    ]
    for row in report["targets"]:
        met = {None: "-", True: "yes", False: "NO"}[row["met"]]
        goal = "-" if row["goal"] is None else f"{row['goal']:,}"
        lines.append(
            f"{row['target']:<24} {_number(row['exec_per_s']):>9} {goal:>8} {met:>4} "
            f"{_number(row['exec_per_cpu_s']):>11} {_number(row['execs']):>11} "
            f"{len(row['findings']):>8}"
        )
    before, after = report["loadavg"]
    lines.append(
        f"{report['seconds_per_target']} s per target on one core, from the committed corpus; "
        f"load average {before} -> {after} (exec/s counts wall time, exec/cpu-s this "
        "fuzzer's CPU time)"
    )
    if report["findings"]:
        lines.append("findings (see each with `python -m fuzz reproduce FILE`):")
        lines.extend(f"  {path}" for path in report["findings"])
    return "\n".join(lines) + "\n"


def cmd_minimize(args: argparse.Namespace) -> tuple[Report, int]:
    """Merge a campaign's working corpus into the committed one.

    ``-merge=1 CORPUS WORKING`` adds only the inputs that reach coverage the corpus does not
    and removes nothing: a plain minimization (merging into an empty directory) would drop
    the pinned regression inputs whose coverage others repeat, and those stay by the
    project's regression discipline. Inputs that crash during the merge are left out.
    """
    tree = locate(args.fuzz_dir)
    targets = select(tree, args.target)
    _require("atheris", "pip install 'balloonctl[fuzz]' (atheris 3 needs Python 3.11)")
    workdir = Path(args.workdir).resolve() if args.workdir else state_dir()
    several = len(targets) > 1
    rows = []
    for target in targets:
        dest = _corpus_for(args.corpus, target, several, tree.seeds(target))
        source = _corpus_for(args.source, target, several, workdir / "corpus" / target)
        if _count(source) == 0:
            raise UsageError(
                f"nothing to merge into the {target} corpus: {source} is empty or missing "
                f"(run `python -m fuzz run {target}` first, or pass --from DIR)"
            )
        entry = tree.entry(target)
        if not os.access(entry, os.X_OK):
            raise UsageError(f"{entry} is not executable (chmod +x): -merge re-runs it by path")
        dest.mkdir(parents=True, exist_ok=True)
        before = _count(dest)
        logs = workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{target}.merge.log"
        with tempfile.TemporaryDirectory(prefix="balloonctl-merge-") as scratch:
            status = _run_logged(
                [
                    sys.executable,
                    str(entry),
                    "-merge=1",
                    f"-timeout={args.input_timeout}",
                    f"-artifact_prefix={scratch}{os.sep}",
                    str(dest),
                    str(source),
                ],
                log=log,
                cwd=Path(scratch),
                limit=_MERGE_LIMIT_S,
                echo=bool(args.verbose),
                what=f"the merge of {target}",
            )
        if status != 0:
            raise FuzzerFailed(
                f"merging {target} failed (status {status}): "
                f"{_last_words(log.read_text(errors='replace'))} (log {log})"
            )
        after = _count(dest)
        rows.append(
            {
                "target": target,
                "corpus": str(dest),
                "from": str(source),
                "before": before,
                "after": after,
                "added": after - before,
                "log": str(log),
            }
        )
    return {"targets": rows}, EXIT_OK


def render_minimize(report: Report) -> str:
    lines = [f"{'target':<24} {'before':>7} {'after':>7}  corpus"]
    lines.extend(
        f"{row['target']:<24} {row['before']:>7} {row['after']:>7}  {row['corpus']}"
        for row in report["targets"]
    )
    return "\n".join(lines) + "\n"


_FINDING = re.compile(
    r"^FINDING (?P<target>\S+) (?P<file>.+?): (?P<type>[A-Za-z_][\w.]*): (?P<message>.*)$"
)
_OK = re.compile(r"^ok (?P<target>\S+): (?P<inputs>\d+) inputs?\b")


@dataclass(frozen=True)
class Replayed:
    """replay.py's verdict on some inputs of one target."""

    target: str
    finding: bool
    line: str
    type: str | None = None
    message: str | None = None
    inputs: int | None = None


def verdict(target: str, status: int, stdout: str, stderr: str) -> Replayed:
    """Read replay.py's contract: one ``FINDING`` line and exit 1, or ``ok`` and exit 0.

    Anything else (a traceback, another status) means replay.py itself failed.
    """
    for line in stdout.splitlines():
        if status == 1 and (match := _FINDING.match(line)):
            return Replayed(target, True, line, match["type"], match["message"])
        if status == 0 and (match := _OK.match(line)):
            return Replayed(target, False, line, inputs=int(match["inputs"]))
    raise FuzzerFailed(
        f"replay.py {target} exited with status {status} without its verdict: "
        f"{_last_words(stderr + stdout)}"
    )


def cmd_reproduce(args: argparse.Namespace) -> tuple[Report, int]:
    tree = locate(args.fuzz_dir)
    path = Path(args.file)
    if not path.exists():
        raise UsageError(f"no such file: {args.file}")
    if args.target == "all":
        raise UsageError("reproduce replays one target's input: --target names one, not all")
    target = select(tree, args.target)[0] if args.target else infer_target(path, tree.targets())
    if not tree.replay.is_file():
        raise UsageError(f"no {tree.replay}: reproduce replays the input with it")
    cmd = [sys.executable, str(tree.replay), target, str(path)]
    try:
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            env=_env(),
            timeout=args.timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        # An input that never finishes is the "hang" finding libFuzzer calls a timeout.
        message = f"replay did not finish within {args.timeout:g} s"
        result = Replayed(
            target, True, f"FINDING {target} {path}: Timeout: {message}", "Timeout", message
        )
    else:
        result = verdict(target, proc.returncode, proc.stdout, proc.stderr)
    report: Report = {"file": str(path), **asdict(result)}
    return report, EXIT_FINDING if result.finding else EXIT_OK


def render_reproduce(report: Report) -> str:
    return f"{report['line']}\n"


#: fuzz/differential.py's exit status when the oracle cannot be built on this machine.
_DIFFERENTIAL_NOT_RUN = 4
#: Beyond --time: a cold build of the oracle (about 10 s on 2 cores; its own limit is 600 s).
_DIFFERENTIAL_GRACE_S = 660.0


def cmd_differential(args: argparse.Namespace) -> tuple[Report, int]:
    """Run ``fuzz/differential.py fuzz`` (a subprocess: it builds and drives the Rust oracle
    for a whole run) on the committed corpus and the vring_image campaign's working corpus."""
    tree = locate(args.fuzz_dir)
    script = tree.fuzz_dir / "differential.py"
    if not script.is_file():
        raise UsageError(f"no {script}: the differential oracle lives there")
    workdir = Path(args.workdir).resolve() if args.workdir else state_dir()
    seed = args.seed if args.seed is not None else time.time_ns() & 0xFFFFFFFF
    cmd = [sys.executable, str(script), "fuzz", "--time", str(args.time), "--seed", str(seed)]
    cmd += ["--corpus", str(tree.root / "fixtures" / "corpus")]
    working = workdir / "corpus" / "vring_image"
    if working.is_dir():
        cmd += ["--corpus", str(working)]
    cmd += ["--artifacts", str(workdir / "artifacts")]
    try:
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
            errors="replace",
            env=_env(),
            timeout=args.time + _DIFFERENTIAL_GRACE_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise FuzzerFailed(f"differential.py did not finish within {args.time} s") from None
    lines = proc.stdout.strip().splitlines()
    try:
        report: Report = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        report = {}
    if proc.returncode == _DIFFERENTIAL_NOT_RUN and report.get("status") == "not-run":
        print(f"fuzz: differential NOT RUN: {report['reason']}", file=sys.stderr)
        return report, 1
    if proc.returncode not in (EXIT_OK, EXIT_FINDING) or report.get("status") != "ran":
        raise FuzzerFailed(
            f"differential.py exited with status {proc.returncode} without its report: "
            f"{_last_words(proc.stdout)}"
        )
    for entry in report["unexplained"]:
        print(f"fuzz: finding: {entry.get('artifact', entry['ring'])}", file=sys.stderr)
    return report, EXIT_FINDING if report["unexplained"] else EXIT_OK


def render_differential(report: Report) -> str:
    if report.get("status") == "not-run":
        return f"differential against virtio-queue: NOT RUN: {report['reason']}\n"
    lines = [
        f"differential against virtio-queue: {report['compared']:,} rings "
        f"({report['replayed']:,} from corpora, {report['generated']:,} generated, seed "
        f"{report['seed']}) in {report['seconds']:.1f} s; {report['agreed']:,} agree exactly",
    ]
    lines += [f"  {kind:<36} {count:>9,}" for kind, count in report["kinds"].items()]
    if report["unexplained"]:
        lines.append(f"unexplained disagreements: {len(report['unexplained'])}")
        for entry in report["unexplained"][:10]:
            lines.append(f"  {entry.get('artifact', entry['ring'])}: {entry['why'][0]}")
    else:
        lines.append("no unexplained disagreement (docs/differential-virtio-queue.md)")
    return "\n".join(lines) + "\n"


def _coverage(args: Sequence[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coverage", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        cwd=cwd,  # no project .coveragerc or pyproject settings leak in
        env=_env(),
        timeout=_REPLAY_LIMIT_S,
        check=False,
    )


def _area(relative: Path) -> str:
    """``virtio/`` for a subpackage's files, ``config.py`` for a top-level module."""
    return f"{relative.parts[0]}/" if len(relative.parts) > 1 else relative.name


def _percent(covered: int, statements: int) -> float:
    return round(100.0 * covered / statements, 1) if statements else 0.0


def cmd_coverage(args: argparse.Namespace) -> tuple[Report, int]:
    """Line coverage of the package from replaying corpora under coverage.py.

    Measured over the whole package, not only ``virtio/``: qmp_replies reaches
    ``backends/``, config reaches ``config.py``, driver_device_roundtrip ``guest/``. The
    headline is ``virtio/`` (the part a hostile guest talks to), with every file of it
    counted, those no input reached too.
    """
    tree = locate(args.fuzz_dir)
    targets = select(tree, args.target)
    _require("coverage", "pip install 'balloonctl[test]'")
    if not tree.replay.is_file():
        raise UsageError(f"no {tree.replay}: coverage replays the corpora with it")
    several = len(targets) > 1
    corpora = {t: _corpus_for(args.corpus, t, several, tree.seeds(t)) for t in targets}
    for target, corpus in corpora.items():
        if not corpus.exists():
            raise UsageError(f"no corpus for {target}: {corpus}")
    findings: list[str] = []
    inputs: dict[str, int | None] = {}
    with tempfile.TemporaryDirectory(prefix="balloonctl-coverage-") as scratch:
        where = Path(scratch)
        data = f"--data-file={where / '.coverage'}"
        for target, corpus in corpora.items():
            try:
                proc = _coverage(
                    [
                        "run",
                        "--append",
                        data,
                        f"--source={PACKAGE_DIR}",
                        str(tree.replay),
                        target,
                        str(corpus),
                    ],
                    where,
                )
            except subprocess.TimeoutExpired:
                raise FuzzerFailed(
                    f"replaying the {target} corpus took over {_REPLAY_LIMIT_S:.0f} s"
                ) from None
            result = verdict(target, proc.returncode, proc.stdout, proc.stderr)
            inputs[target] = result.inputs
            if result.finding:
                findings.append(result.line)
        out = where / "coverage.json"
        done = _coverage(["json", data, "-o", str(out)], where)
        if done.returncode != 0:
            raise FuzzerFailed(f"coverage json failed: {_last_words(done.stderr + done.stdout)}")
        if args.html:
            html = _coverage(["html", data, "-d", str(Path(args.html).resolve())], where)
            if html.returncode != 0:
                raise FuzzerFailed(f"coverage html failed: {_last_words(html.stderr)}")
        measured = json.loads(out.read_text())
    files: dict[str, dict[str, Any]] = {}
    areas: dict[str, dict[str, Any]] = {}
    for name, entry in measured.get("files", {}).items():
        try:
            relative = Path(name).resolve().relative_to(PACKAGE_DIR)
        except ValueError:  # --source keeps others out; a .pth-shadowed copy would not be ours
            continue
        summary = entry["summary"]
        statements, covered = int(summary["num_statements"]), int(summary["covered_lines"])
        files[relative.as_posix()] = {
            "statements": statements,
            "covered": covered,
            "percent": _percent(covered, statements),
        }
        area = areas.setdefault(_area(relative), {"statements": 0, "covered": 0})
        area["statements"] += statements
        area["covered"] += covered
    for area in areas.values():
        area["percent"] = _percent(area["covered"], area["statements"])
    virtio = areas.get("virtio/", {"statements": 0, "covered": 0, "percent": 0.0})
    report: Report = {
        "targets": targets,
        "corpus": {t: str(c) for t, c in corpora.items()},
        "inputs": inputs,
        "virtio": virtio,
        "virtio_percent": virtio["percent"],
        "areas": dict(sorted(areas.items())),
        "files": dict(sorted(files.items())),
        "findings": findings,
        "html": str(Path(args.html).resolve()) if args.html else None,
    }
    return report, EXIT_FINDING if findings else EXIT_OK


def render_coverage(report: Report) -> str:
    total = sum(n for n in report["inputs"].values() if n)
    virtio = report["virtio"]
    lines = [
        f"line coverage of balloonctl/virtio/ from {len(report['targets'])} corpus(es), "
        f"{total} inputs: {virtio['percent']:.1f}% ({virtio['covered']}/{virtio['statements']} "
        "lines)",
        f"{'area':<20} {'lines':>7} {'covered':>8} {'%':>6}",
    ]
    lines.extend(
        f"{name:<20} {row['statements']:>7} {row['covered']:>8} {row['percent']:>6.1f}"
        for name, row in report["areas"].items()
        if row["covered"]
    )
    lines.extend(report["findings"])
    if report["html"]:
        lines.append(f"HTML report: {report['html']}/index.html")
    return "\n".join(lines) + "\n"
