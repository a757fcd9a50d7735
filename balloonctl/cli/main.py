"""The ``balloonctl`` command line: argparse in, one exit code out.

Exit codes (docs/contracts.md): 0 done; 1 the operation failed; 2 usage or configuration error;
3 a finding (a malformed ring). Errors are one line on stderr; ``-v`` adds the detail.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import json
import logging
import os
import signal
import stat
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, Final, NoReturn

from balloonctl import __version__
from balloonctl.errors import BalloonError, GuestMemoryError, UsageError, VirtioError
from balloonctl.units import format_size, parse_int, parse_size

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_FINDING = 3

log = logging.getLogger("balloonctl")


class _Parser(argparse.ArgumentParser):
    """argparse with the error contract (docs/contracts.md): one line on stderr, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _argument(parse: Callable[[str], int]) -> Callable[[str], int]:
    """An argparse ``type=``: argparse only turns ArgumentTypeError into a usage error."""

    def convert(text: str) -> int:
        try:
            return parse(text)
        except UsageError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


_gpa = _argument(lambda text: parse_int(text, what="address"))
_index = _argument(lambda text: parse_int(text, what="index", limit=0xFFFF))
_count = _argument(lambda text: parse_int(text, what="number"))


def _parse_size(text: str) -> int:
    return parse_size(text)


_size = _argument(_parse_size)


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree."""
    parser = _Parser(
        prog="balloonctl",
        description="Manage virtio-balloon devices; inspect and benchmark the balloon protocol.",
    )
    parser.add_argument("--version", action="version", version=f"balloonctl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log detail to stderr")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object on stdout (before COMMAND)"
    )
    parser.add_argument(
        "-c",
        "--connect",
        metavar="URI",
        action="append",
        help="libvirt URI for VMs named by domain name or UUID (default: $LIBVIRT_DEFAULT_URI, "
        "else qemu:///system; e.g. qemu:///session, qemu+ssh://HOST/system); repeated, "
        "list/status/stats ask every URI at once, with a HOST column",
    )
    parser.add_argument(
        "--hosts",
        metavar="FILE",
        help="inventory of hosts for list/status/stats (TOML: [[host]] name, and uri or "
        "qmp_dir); asked at once, with -c URIs if any",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="configuration file (default: $BALLOONCTL_CONFIG, ~/.config/balloonctl/"
        "config.toml, /etc/balloonctl/config.toml)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    _vm_commands(commands)

    vring = commands.add_parser("vring", help="inspect split virtqueues")
    vring_cmds = vring.add_subparsers(dest="vring_command", metavar="ACTION", parser_class=_Parser)
    vring_cmds.required = True
    parse = vring_cmds.add_parser(
        "parse",
        help="parse the available chains of a queue in a raw guest-memory image (JSON)",
        description=(
            "Pop every available chain from --last-avail to avail.idx, as the device would, "
            "and print them as JSON. Exit 3 at the first ring-level error, with its type."
        ),
    )
    parse.add_argument("image", help="raw guest memory; byte 0 is guest-physical --base")
    parse.add_argument("--queue-size", required=True, type=_count, metavar="N")
    parse.add_argument("--desc", required=True, type=_gpa, metavar="GPA")
    parse.add_argument("--avail", required=True, type=_gpa, metavar="GPA")
    parse.add_argument("--used", required=True, type=_gpa, metavar="GPA")
    parse.add_argument("--base", default=0, type=_gpa, metavar="GPA")
    parse.add_argument("--last-avail", default=0, type=_index, metavar="IDX")
    parse.add_argument(
        "--decode",
        default="pfn",
        choices=["pfn", "sg", "stats", "report", "none"],
        help="how to read each chain's buffers (default: pfn)",
    )
    parse.set_defaults(func=_cmd_vring_parse)
    dump = vring_cmds.add_parser(
        "dump",
        help="parse a live VM's balloon queue: what the guest made available (JSON)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Read one balloon queue of a running VM (x-query-virtio-queue-status, then the\n"
            "rings and the buffers they name from guest memory) and print, as vring parse\n"
            "does, the chains the guest made available that the device has not returned:\n"
            "avail entries from the device's used-idx to avail.idx; the first\n"
            "queue.in_flight of them are popped by the device and not yet returned.\n"
            "\n"
            'Output: vring parse\'s {"chains", "error"} plus "vm", "queue" {name, index,\n'
            "size, desc, avail, used, used_idx, last_avail_idx, avail_idx, in_flight,\n"
            'decode}, "ram" [[base, size], ...] (the bounds checked) and "read_bytes".\n'
            "Decodes: inflate/deflate as PFN arrays, or SG chunks where the seed profile's\n"
            'sg is acked ("pages"); stats as "stats" {NAME: VALUE} (spec 5.5.6.3, NAME as\n'
            "`balloonctl stats` names them, unknown tags as tag-N); reporting as the\n"
            'reported free pages, "pages" [[first_pfn, count], ...] (spec 5.5.6.7).\n'
            "\n"
            "Reads are bounded whatever the guest wrote: nothing outside guest RAM is read\n"
            "(such a ring or buffer is the parser's RingOutOfBounds/BufferOutOfBounds), SG\n"
            "chunks and reports are not read at all, and the whole dump reads at most\n"
            "--read-limit bytes. Exit 0; 3 on a ring-level error (its type in error.type);\n"
            "1 when the VM cannot be reached or read; 2 for usage. JSON with or without --json."
        ),
    )
    dump.add_argument("vm", metavar="VM", help=_VM_HELP)
    dump.add_argument(
        "--queue",
        required=True,
        choices=["inflate", "deflate", "stats", "reporting"],
        help="which queue (reporting needs page-reporting acked)",
    )
    dump.add_argument(
        "--read-limit",
        default="64M",
        type=_size,
        metavar="SIZE",
        help="most guest memory to read (default 64M)",
    )
    dump.set_defaults(func=_cmd_vring_dump)

    sim = commands.add_parser(
        "sim",
        help="serve simulated VMs on QMP sockets (no hypervisor needed)",
        description=(
            "Serve a simulated VM behind a real QMP unix socket: the guest driver model and "
            "the device side, in real time, answering the balloon subset of QMP as QEMU 10.0 "
            "or 7.2 does (--qemu-version). Runs until SIGTERM or QMP quit."
        ),
    )
    where = sim.add_mutually_exclusive_group(required=True)
    where.add_argument("--qmp", metavar="PATH", help="the VM's QMP unix socket")
    where.add_argument("--qmp-dir", metavar="DIR", help="serve --count VMs as DIR/vmN.sock")
    sim.add_argument("--count", type=_count, default=1, help="VMs to serve with --qmp-dir")
    sim.add_argument("--memory", default="2G", type=_size, help="guest RAM (default 2G)")
    sim.add_argument(
        "--profile",
        default="seed-sg",
        choices=["seed-sg", "virtio-1.2"],
        help="seed-sg offers VIRTIO_BALLOON_F_SG (bit 3); virtio-1.2 is what QEMU offers "
        "with deflate-on-oom=on,free-page-reporting=on (default seed-sg)",
    )
    sim.add_argument(
        "--workload",
        default="idle",
        choices=["idle", "steady", "spiky", "leak", "cache"],
        help="what the guest's programs do with memory (default idle; see README)",
    )
    sim.add_argument(
        "--workloads",
        type=_workloads,
        default=(),
        metavar="A,B,...",
        help="with --qmp-dir: workloads cycled over the VMs (vm0 runs A, vm1 B, ...); "
        "overrides --workload",
    )
    sim.add_argument(
        "--rate", default="1G", type=_size, help="inflate/deflate speed per second (default 1G)"
    )
    sim.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        metavar="F",
        help="run the workload F times faster than real time (default 1)",
    )
    sim.add_argument(
        "--no-hotplug",
        dest="hotplug",
        action="store_false",
        help="put the balloon on pcie.0, which cannot hotplug (negotiate then refuses)",
    )
    sim.add_argument(
        "--broken-stats",
        choices=["virtio-win", "frozen", "negative", "absurd"],
        default=None,
        help="report statistics as a broken guest does: virtio-win (every value 2**64-1, "
        "last-update frozen), frozen (the first report forever), negative or absurd "
        "available-memory",
    )
    _qemu_version_option(sim)
    sim.set_defaults(func=_cmd_sim)

    demo = commands.add_parser(
        "demo",
        help="a scripted tour on simulated VMs, then the auto-balloon daemon (about a minute)",
    )
    demo.add_argument(
        "--duration",
        type=_seconds,
        default=15.0,
        metavar="S",
        help="seconds of live stats in the tour (default 15)",
    )
    demo.add_argument(
        "--daemon-ticks",
        type=_count,
        default=24,
        metavar="N",
        help="ticks (1 s each) of the auto-balloon daemon part, after it connects; 0 skips "
        "it (default 24)",
    )
    _qemu_version_option(demo)
    demo.set_defaults(func=_cmd_demo)

    daemon = commands.add_parser(
        "daemon",
        help="the auto-balloon daemon: move memory between VMs by policy",
        description="Every [daemon] interval: read the host's memory and each VM's stats, "
        "decide targets (balloonctl.daemon.policy), set them. VMs come from the config's [[vm]] "
        "and [libvirt] tables. SIGHUP reloads the config, SIGTERM stops. Under systemd "
        "use contrib/systemd/balloonctl-autoballoon.service (Type=notify).",
    )
    # The global --config works here too, after the command name as the unit writes it.
    daemon.add_argument(
        "--config", dest="config", default=argparse.SUPPRESS, metavar="FILE", help="config file"
    )
    daemon.add_argument("--once", action="store_true", help="one tick, print it, exit")
    daemon.add_argument(
        "--dry-run", action="store_true", help="decide but change nothing (no targets, no state)"
    )
    daemon.add_argument(
        "--state-dir",
        metavar="DIR",
        help="per-VM state (default [daemon] state_dir, $STATE_DIRECTORY, "
        "~/.local/state/balloonctl)",
    )
    daemon.set_defaults(func=_cmd_daemon)

    bench = commands.add_parser("bench", help="benchmarks")
    bench_cmds = bench.add_subparsers(dest="bench_command", metavar="NAME", parser_class=_Parser)
    bench_cmds.required = True
    decode = bench_cmds.add_parser(
        "decode",
        help="device-side decoding of a 7 GiB inflate: PFN arrays vs SG chains",
    )
    decode.add_argument("--memory", default="8G", help="guest RAM (default 8G)")
    decode.add_argument("--inflate", default="7G", help="pages to inflate (default 7G)")
    decode.add_argument("--run-pages", default=64, type=_count, help="mean free-run length")
    decode.add_argument("--repeat", default=3, type=_count, help="timed repetitions (best kept)")
    decode.add_argument(
        "--no-python",
        dest="python",
        action="store_false",
        help="skip the plain-Python baseline decoder (slow: seconds)",
    )
    decode.set_defaults(func=_cmd_bench_decode)
    seed = bench_cmds.add_parser(
        "seed",
        help="the seed's experiment: inflate 7 GiB of an 8 GiB guest, pfn vs pfn-compact vs sg",
    )
    seed.add_argument("--memory", default="8G", help="guest RAM (default 8G)")
    seed.add_argument("--inflate", default="7G", help="balloon size to reach (default 7G)")
    seed.add_argument(
        "--backing", default="anon", choices=["anon", "memfd"], help="guest RAM (default anon)"
    )
    seed.add_argument("--plot", metavar="PNG", help="draw the stage breakdown (matplotlib)")
    seed.set_defaults(func=_cmd_bench_seed)
    vring_parse = bench_cmds.add_parser(
        "vring-parse",
        help="vring parse on the worst legal 64 MiB rings: wall time and peak RSS vs 2 s / 512 MB",
    )
    vring_parse.add_argument(
        "--image",
        action="append",
        dest="images",
        metavar="KIND",
        help="only this worst case (repeatable; default all)",
    )
    vring_parse.add_argument("--repeat", default=3, type=_count, help="runs per image (default 3)")
    vring_parse.add_argument("--queue-size", default=32768, type=_count, help="(default 32768)")
    vring_parse.add_argument("--memory", default="64M", type=_size, help="image size (default 64M)")
    vring_parse.add_argument(
        "--timeout", default=30, type=_count, help="seconds before a run is killed (default 30)"
    )
    vring_parse.set_defaults(func=_cmd_bench_vring_parse)

    real = bench_cmds.add_parser(
        "real",
        help="set --wait on a real VM as a whole process, against a minimal raw QMP client",
        description="Inflate --size of a running VM with `balloonctl set --wait` and with a "
        "minimal stdlib QMP client, alternating, as whole processes; report the median "
        "times and their ratio (goal 1.10). With --observer (a second QMP monitor of the "
        "same VM) also the detection latency. `make bench-real` boots the test guest for it.",
    )
    real.add_argument("--qmp", required=True, metavar="PATH", help="the VM's QMP unix socket")
    real.add_argument("--observer", metavar="PATH", help="a second QMP monitor of the same VM")
    real.add_argument("--size", default="1G", type=_size, help="how much to inflate (default 1G)")
    real.add_argument("--rounds", type=_count, default=5, help="runs per tool (default 5)")
    real.add_argument(
        "--raw-poll",
        type=float,
        default=0.02,
        metavar="S",
        help="the raw client's pause between polls (default 0.02, balloonctl's own)",
    )
    real.set_defaults(func=_cmd_bench_real)

    bench_daemon = bench_cmds.add_parser(
        "daemon",
        help="the auto-balloon daemon's tick latency and CPU with N simulated VMs",
        description="Start one `balloonctl sim` process serving --vms VMs (mixed workloads), "
        "run the daemon in this process against them for --ticks ticks (after a warm-up "
        "that connects), the fake host under pressure for the first half and calm for the "
        "second; report tick latency, the daemon's CPU per tick as a % of one core, VMs "
        "answering and targets sent. Goal: 1000 VMs, tick < 1 s, daemon < 20% of one core.",
    )
    bench_daemon.add_argument("--vms", type=_count, default=100, help="VMs (default 100)")
    bench_daemon.add_argument(
        "--ticks", type=_count, default=30, help="measured ticks after the warm-up (default 30)"
    )
    bench_daemon.add_argument(
        "--interval", type=float, default=1.0, metavar="S", help="seconds per tick (default 1)"
    )
    bench_daemon.add_argument(
        "--memory", default="256M", type=_size, help="each simulated VM's RAM (default 256M)"
    )
    bench_daemon.add_argument(
        "--host",
        choices=["follow", "static"],
        default="follow",
        help="follow: the fake host gains what the guests give (moves stop when it is "
        "balanced); static: it does not, so every guest moves on every tick (worst case)",
    )
    _qemu_version_option(bench_daemon)
    bench_daemon.set_defaults(func=_cmd_bench_daemon)
    return parser


_VM_HELP = "QMP socket (unix:/path, a socket path, tcp:HOST:PORT) or libvirt domain (-c URI)"


def _vm_commands(commands: Any) -> None:
    """list, status, set, stats, features, negotiate."""
    listing = commands.add_parser("list", help="the configured VMs and what they answer now")
    listing.add_argument("--qmp-dir", metavar="DIR", help="also every DIR/*.sock")
    listing.set_defaults(func=_cmd_list)

    status = commands.add_parser("status", help="guest memory, balloon, features, stats age")
    status.add_argument("vm", metavar="VM", help=_VM_HELP)
    status.set_defaults(func=_cmd_status)

    setp = commands.add_parser(
        "set",
        help="set the guest's memory (the balloon takes the rest)",
        description="Ask the guest to hold SIZE of memory (QMP balloon). --wait returns when "
        "it does (exit 1 at --timeout, with what it reached).",
    )
    setp.add_argument("vm", metavar="VM", help=_VM_HELP)
    setp.add_argument("size", metavar="SIZE", type=_size, help="e.g. 1536M, 1.5G, 2GiB")
    setp.add_argument("--wait", action="store_true", help="wait until the guest gets there")
    setp.add_argument(
        "--timeout", type=_seconds, default=120.0, metavar="S", help="with --wait (default 120)"
    )
    setp.set_defaults(func=_cmd_set)

    stats = commands.add_parser("stats", help="the guest's memory statistics")
    stats.add_argument("vm", metavar="VM", help=_VM_HELP)
    stats.add_argument(
        "--period", type=_count, metavar="S", help="set the guest's stats polling interval"
    )
    stats.add_argument("--watch", action="store_true", help="print every new reading")
    stats.set_defaults(func=_cmd_stats)

    feats = commands.add_parser("features", help="offered and acked feature bits, SG included")
    feats.add_argument("vm", metavar="VM", help=_VM_HELP)
    feats.set_defaults(func=_cmd_features)

    nego = commands.add_parser(
        "negotiate",
        help="replug the balloon offering other features (the guest re-probes)",
        description="Hot-unplug the balloon and plug it back with the same id and bus and "
        "the features changed; the guest gets its ballooned memory back meanwhile.",
    )
    nego.add_argument("vm", metavar="VM", help=_VM_HELP)
    nego.add_argument("--enable", action="append", default=[], metavar="FEATURE")
    nego.add_argument("--disable", action="append", default=[], metavar="FEATURE")
    nego.add_argument("--yes", action="store_true", help="confirm the replug")
    nego.set_defaults(func=_cmd_negotiate)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"seconds must be positive: {text!r}")
    return value


def _address(args: argparse.Namespace) -> str:
    """The VM argument, with a configured [[vm]] name replaced by its socket."""
    address: str = _config(args).address(args.vm)
    return address


def _config(args: argparse.Namespace) -> Any:
    from balloonctl.daemon.config import load  # noqa: PLC0415

    return load(args.config)


#: The commands that take several hosts; every other one is about one VM.
_MULTI_HOST_COMMANDS: Final = ("list", "status", "stats")


def _many_hosts(args: argparse.Namespace) -> bool:
    """Several ``-c``, or ``--hosts``: the multi-host form (one ``-c`` is as it always was)."""
    return len(args.connect or ()) > 1 or args.hosts is not None


def _cmd_on_hosts(
    args: argparse.Namespace,
    work: Callable[[Any], Any],
    render: Callable[[dict[str, Any]], str],
    *,
    local: bool = False,
) -> int:
    """Run ``work`` on every host at once; print the merged report; exit 1 if a host failed.

    Each failed host is one line in the table (and its error in ``hosts`` of --json), and
    one summary line on stderr names them all, so a script sees the failure either way.
    """
    from balloonctl.cli import hosts, vm_commands  # noqa: PLC0415

    chosen = hosts.select_hosts(args.connect or [], args.hosts)
    if local:
        name = hosts.LOCAL_HOST
        chosen.append(hosts.Host(name if name not in {h.name for h in chosen} else f"({name})"))
    outcomes = hosts.run_on_hosts(chosen, work)
    for outcome in outcomes:
        for line in outcome.notice.splitlines():
            print(
                f"balloonctl: {outcome.host.name}: {line.removeprefix('balloonctl: ')}",
                file=sys.stderr,
            )
    _emit(args, vm_commands.merge_hosts(outcomes), render)
    failed = [outcome.host.name for outcome in outcomes if outcome.error is not None]
    if failed:
        print(
            f"balloonctl: error: {len(failed)} of {len(outcomes)} hosts did not answer: "
            + ", ".join(failed),
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


def _cmd_list(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415

    from balloonctl.cli import vm_commands  # noqa: PLC0415

    if _many_hosts(args):
        config = _config(args)
        return _cmd_on_hosts(
            args,
            lambda host: vm_commands.host_list(host, config, args.qmp_dir),
            vm_commands.render_hosts_list,
            local=bool(config.vms) or args.qmp_dir is not None,
        )
    report = asyncio.run(vm_commands.list_vms(_config(args), args.qmp_dir))
    return _emit(args, report, vm_commands.render_list)


def _cmd_status(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415

    from balloonctl.cli import vm_commands  # noqa: PLC0415

    if _many_hosts(args):
        vm_commands.check_multi_host_vm(args.vm)
        return _cmd_on_hosts(
            args,
            lambda host: vm_commands.host_status(host, args.vm),
            vm_commands.render_hosts_status,
        )
    return _emit(args, asyncio.run(vm_commands.status(_address(args))), vm_commands.render_status)


def _cmd_set(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415

    from balloonctl.cli import vm_commands  # noqa: PLC0415

    result = asyncio.run(
        vm_commands.set_target(
            args.vm, args.size, wait=args.wait, timeout=args.timeout, config=_config(args)
        )
    )
    report = result.report()
    if args.size > report["target_bytes"]:
        print(
            f"balloonctl: {format_size(args.size)} is more than the VM's RAM; "
            f"asked for {format_size(report['target_bytes'])}",
            file=sys.stderr,
        )

    def human(r: dict[str, Any]) -> str:
        state = "reached" if r["reached"] else ("asked" if not args.wait else "NOT reached")
        return (
            f"{r['vm']}: target {format_size(r['target_bytes'])}, actual "
            f"{format_size(r['actual_bytes'])} ({state}"
            + (f" after {r['elapsed_s']:.2f} s)" if args.wait else ")")
            + "\n"
        )

    _emit(args, report, human)
    if args.wait and not result.reached:
        why = result.error or f"timed out after {args.timeout:g} s"
        print(
            f"balloonctl: error: {why}; reached {format_size(result.actual)} of "
            f"{format_size(result.target)}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


def _cmd_stats(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415

    from balloonctl.cli import vm_commands  # noqa: PLC0415

    if _many_hosts(args):
        if args.watch:
            raise UsageError("stats --watch follows one VM on one host (one -c URI at most)")
        vm_commands.check_multi_host_vm(args.vm)
        return _cmd_on_hosts(
            args,
            lambda host: vm_commands.host_stats(host, args.vm, args.period),
            vm_commands.render_hosts_stats,
        )
    if not args.watch:
        report = asyncio.run(vm_commands.stats(_address(args), args.period))
        return _emit(args, report, vm_commands.render_stats)

    async def watch() -> None:
        live = sys.stdout.isatty() and not args.json
        async for report in vm_commands.watch_stats(_address(args), args.period):
            if args.json:
                sys.stdout.write(json.dumps(report) + "\n")
            elif live:
                sys.stdout.write("\x1b[H\x1b[J" + vm_commands.render_stats(report))
            else:
                sys.stdout.write(vm_commands.render_stats(report) + "\n")
            sys.stdout.flush()

    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a watch ends
        asyncio.run(watch())
    return EXIT_OK


def _cmd_features(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415

    from balloonctl.cli import vm_commands  # noqa: PLC0415

    report, names = asyncio.run(vm_commands.features(_address(args)))
    return _emit(args, report, lambda r: vm_commands.render_features(r, names))


def _cmd_negotiate(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415

    from balloonctl.cli import vm_commands  # noqa: PLC0415

    if not args.yes:
        raise UsageError(
            "negotiate unplugs and replugs the balloon (the guest gets its ballooned memory "
            "back meanwhile); add --yes to go ahead"
        )
    report = asyncio.run(vm_commands.negotiate(_address(args), args.enable, args.disable))
    return _emit(args, report, lambda r: vm_commands.render_features(r, list(r["offered"])))


def _cmd_vring_parse(args: argparse.Namespace) -> int:
    """Parse one queue of a ring image; exit 3 on a ring-level finding."""
    from balloonctl.virtio.inspect import Decode, RingParams, write_ring_json  # noqa: PLC0415
    from balloonctl.virtio.memory import GuestMemory, Region  # noqa: PLC0415

    try:
        # Only regular files: a FIFO would block in open(), a device reports size 0.
        if not stat.S_ISREG(os.stat(args.image).st_mode):
            raise UsageError(f"image {args.image} is not a regular file")
        region = Region.from_file(args.base, args.image)
    except OSError as exc:
        raise UsageError(f"cannot read image {args.image}: {exc.strerror}") from exc
    except GuestMemoryError as exc:
        raise UsageError(str(exc)) from exc
    params = RingParams(args.queue_size, args.desc, args.avail, args.used, args.last_avail)
    # The result is millions of small acyclic lists at worst (32768 chains of 256 ranges):
    # the cyclic collector would rescan them over and over (3.5 of 10 s measured). Off for
    # the parse, and back on after it: main() also runs inside other programs (the tests).
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with GuestMemory([region]) as mem:
            # Streamed a batch of chains at a time: a legal ring prints 80 MB of JSON.
            # vring parse is a machine-readable diagnostic: JSON with or without --json.
            finding = write_ring_json(mem, params, Decode(args.decode), sys.stdout.write)
    finally:
        if was_enabled:
            gc.enable()
    sys.stdout.write("\n")
    return EXIT_FINDING if finding else EXIT_OK


def _cmd_vring_dump(args: argparse.Namespace) -> int:
    """Parse one balloon queue of a live VM; exit 3 on a ring-level finding."""
    import asyncio  # noqa: PLC0415

    from balloonctl.cli import vm_commands, vring_commands  # noqa: PLC0415

    if args.read_limit <= 0:
        raise UsageError("--read-limit must be positive")

    async def run() -> tuple[str, bool]:
        async with vm_commands.open_vm(_address(args)) as backend:
            return await vring_commands.dump(backend, args.queue, read_limit=args.read_limit)

    text, finding = asyncio.run(run())
    # Like vring parse, a machine-readable diagnostic: JSON with or without --json.
    sys.stdout.write(text + "\n")
    return EXIT_FINDING if finding else EXIT_OK


def _workloads(text: str) -> tuple[str, ...]:
    """``--workloads idle,steady,...``: known workload names, at least one."""
    from balloonctl.sim.workloads import WORKLOADS  # noqa: PLC0415

    names = tuple(name.strip() for name in text.split(","))
    for name in names:
        if name not in WORKLOADS:
            raise argparse.ArgumentTypeError(
                f"unknown workload {name!r} (known: {', '.join(WORKLOADS)})"
            )
    return names


def _qemu_version_option(parser: argparse.ArgumentParser) -> None:
    """``--qemu-version``: which QEMU the simulated VMs answer as. Checked when used, so
    that building the parser for other commands does not import the simulator."""
    parser.add_argument(
        "--qemu-version",
        type=_qemu_version,
        default=None,
        metavar="{7.2,10.0}",
        help="answer QMP as QEMU 10.0 (Debian 13; the default) or 7.2 (Debian 12) does",
    )


def _qemu_version(text: str) -> str:
    from balloonctl.sim.qemu_versions import QEMU_VERSIONS  # noqa: PLC0415

    if text not in QEMU_VERSIONS:
        raise argparse.ArgumentTypeError(
            f"unknown QEMU version {text!r} (the sim answers as {', '.join(QEMU_VERSIONS)})"
        )
    return text


def _resolved_qemu_version(args: argparse.Namespace) -> str:
    from balloonctl.sim.qemu_versions import DEFAULT_QEMU_VERSION  # noqa: PLC0415

    return str(args.qemu_version or DEFAULT_QEMU_VERSION)


def _cmd_sim(args: argparse.Namespace) -> int:
    """Serve simulated VMs until SIGTERM or quit."""
    import asyncio  # noqa: PLC0415

    from balloonctl.sim.guest import GuestSpec  # noqa: PLC0415
    from balloonctl.sim.machine import VmSpec  # noqa: PLC0415
    from balloonctl.sim.runner import layout, serve  # noqa: PLC0415

    if args.memory < 64 << 20:
        raise UsageError("--memory must be at least 64M")
    if args.memory % 4096:
        raise UsageError("--memory must be a whole number of 4 KiB pages")
    if args.rate <= 0:
        raise UsageError("--rate must be positive")
    if not 0 < args.time_scale <= 1000:
        raise UsageError("--time-scale must be in (0, 1000]")
    if args.qmp_dir is not None and not os.path.isdir(args.qmp_dir):
        raise UsageError(f"--qmp-dir {args.qmp_dir} is not a directory")
    base = VmSpec(
        profile=args.profile,
        guest=GuestSpec(memory=args.memory, workload=args.workload, time_scale=args.time_scale),
        rate=args.rate,
        hotplug=args.hotplug,
        qemu_version=_resolved_qemu_version(args),
        broken_stats=args.broken_stats,
    )
    vms = layout(base, args.qmp, args.count, args.qmp_dir, args.workloads)
    try:
        return asyncio.run(serve(vms))
    except MemoryError as exc:
        raise UsageError(f"cannot map {format_size(args.memory)} of guest RAM") from exc
    except OSError as exc:
        if exc.errno == errno.ENOMEM:
            raise UsageError(f"cannot map {format_size(args.memory)} of guest RAM") from exc
        raise UsageError(f"cannot serve QMP: {exc.strerror or exc}") from exc


def _cmd_demo(args: argparse.Namespace) -> int:
    from balloonctl.cli import demo  # noqa: PLC0415

    return demo.run(
        args.duration,
        daemon_ticks=args.daemon_ticks,
        qemu_version=_resolved_qemu_version(args),
    )


def _cmd_bench_decode(args: argparse.Namespace) -> int:
    """Time device-side decoding of a large inflate, PFN vs SG."""
    from balloonctl.bench.decode import DecodeBenchConfig, format_report, run  # noqa: PLC0415

    config = DecodeBenchConfig(
        memory=parse_size(args.memory),
        inflate=parse_size(args.inflate),
        run_pages=args.run_pages,
        repeat=max(1, args.repeat),
        python=args.python,
    )
    return _emit(args, run(config), format_report)


def _emit(
    args: argparse.Namespace, report: dict[str, Any], table: Callable[[dict[str, Any]], str]
) -> int:
    """A report as one JSON object (--json) or as the command's table."""
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        sys.stdout.write(table(report))
    return EXIT_OK


def _cmd_daemon(args: argparse.Namespace) -> int:
    """The auto-balloon daemon (or one tick of it)."""
    import asyncio  # noqa: PLC0415

    from balloonctl.cli.daemon_commands import decisions_json, render_decisions  # noqa: PLC0415
    from balloonctl.daemon.app import run_daemon  # noqa: PLC0415
    from balloonctl.daemon.loop import STOPPED  # noqa: PLC0415

    config = _config(args)
    if config.path is None:
        raise UsageError("the daemon needs a configuration file (--config FILE)")
    if config.manages_nothing:
        raise UsageError(f"{config.path}: nothing to manage (no [[vm]] and no [libvirt])")
    if not args.verbose:
        logging.getLogger("balloonctl.daemon").setLevel(logging.INFO)
    report = asyncio.run(
        run_daemon(config, once=args.once, dry_run=args.dry_run, state_dir=args.state_dir)
    )
    if args.once and report is not None:
        if report.error == STOPPED:
            return 128 + signal.SIGTERM
        if report.plan is None:
            return EXIT_FAILED  # the tick logged why, in one line
        _emit(args, decisions_json(report), render_decisions)
        if report.managed and not report.answered:
            print("balloonctl: error: no VM answered", file=sys.stderr)
            return EXIT_FAILED
    return EXIT_OK


def _cmd_bench_real(args: argparse.Namespace) -> int:
    """balloonctl set --wait against a raw QMP client on a real VM."""
    from balloonctl.bench.real import RealBenchConfig, format_report, run  # noqa: PLC0415

    config = RealBenchConfig(
        qmp=args.qmp,
        observer=args.observer,
        size=args.size,
        rounds=args.rounds,
        raw_poll=args.raw_poll,
    )
    return _emit(args, run(config), format_report)


def _cmd_bench_daemon(args: argparse.Namespace) -> int:
    """The daemon against N simulated VMs: tick latency and CPU."""
    from balloonctl.bench.daemon import DaemonBenchConfig, format_report, run  # noqa: PLC0415

    config = DaemonBenchConfig(
        vms=args.vms,
        ticks=args.ticks,
        interval=args.interval,
        memory=args.memory,
        host=args.host,
        qemu_version=_resolved_qemu_version(args),
    )
    return _emit(args, run(config), format_report)


def _cmd_bench_seed(args: argparse.Namespace) -> int:
    """Replay the seed's experiment on the driver and device models."""
    from balloonctl.bench.seed import SeedBenchConfig, format_report, plot, run  # noqa: PLC0415
    from balloonctl.virtio.memory import Backing  # noqa: PLC0415

    config = SeedBenchConfig(
        memory=parse_size(args.memory),
        inflate=parse_size(args.inflate),
        backing=Backing(args.backing),
        kernel=min(256 << 20, parse_size(args.memory) // 8),
    )
    report = run(config)
    if args.plot:
        plot(report, args.plot)
    return _emit(args, report, format_report)


def _cmd_bench_vring_parse(args: argparse.Namespace) -> int:
    """Time ``vring parse`` on the worst legal rings, each in a child process."""
    from balloonctl.bench import vring_parse  # noqa: PLC0415

    unknown = set(args.images or ()) - set(vring_parse.WORST_CASES)
    if unknown:
        raise UsageError(
            f"no worst case {', '.join(sorted(unknown))} "
            f"(known: {', '.join(vring_parse.WORST_CASES)})"
        )
    report = vring_parse.run(
        args.images, max(1, args.repeat), args.queue_size, args.memory, max(1, args.timeout)
    )
    return _emit(args, report, vring_parse.format_report)


def exit_code(exc: BalloonError) -> int:
    """The exit code for an error that reached the top."""
    if isinstance(exc, UsageError):
        return EXIT_USAGE
    if isinstance(exc, VirtioError):
        return EXIT_FINDING
    return EXIT_FAILED


def _terminated(signum: int, _frame: object) -> NoReturn:
    """SIGTERM unwinds the command instead of killing the process on the spot.

    Python's default for SIGTERM ends the process without running a single ``finally``:
    ``timeout``, systemd or a script stopping ``vring dump`` would leave its pmemsave file
    (guest memory) in the temporary directory, and ``bench real`` its child running.
    Raised here, SystemExit unwinds like Ctrl-C does (asyncio.run cancels the command's
    tasks, their cleanup runs) and the exit status is still the shell's 128 + 15.
    """
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code (never raise for a user's mistake)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if sys.stdout is None:
        # fd 1 closed (`balloonctl ... >&-`): Python leaves sys.stdout None and the first
        # write would be an AttributeError traceback, after the command had acted. Refuse
        # before acting, as a closed pipe ends a command (exit 1).
        print("balloonctl: error: standard output is closed", file=sys.stderr)
        return EXIT_FAILED
    # Only where SIGTERM still has its default action: an ignored one stays ignored, and
    # `sim` installs its own handler on its loop. Only the main thread may set handlers;
    # the default comes back afterwards (main() also runs inside other programs' tests).
    catch = (
        signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        and threading.current_thread() is threading.main_thread()
    )
    if catch:
        signal.signal(signal.SIGTERM, _terminated)
    try:
        return _run(args)
    finally:
        if catch:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run(args: argparse.Namespace) -> int:
    """The command of ``args``, with the error contract of docs/contracts.md."""
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="balloonctl: %(levelname)s: %(message)s",
    )
    connects: list[str] = args.connect or []
    if any(not uri.strip() for uri in connects):
        print("balloonctl: error: -c/--connect needs a URI", file=sys.stderr)
        return EXIT_USAGE
    if _many_hosts(args) and args.command not in _MULTI_HOST_COMMANDS:
        given = "--hosts" if args.hosts is not None else "several -c"
        print(
            f"balloonctl: error: {args.command} is about one VM on one host: {given} works "
            f"with {', '.join(_MULTI_HOST_COMMANDS)} only",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if len(connects) == 1:
        from balloonctl.cli.vm_commands import CONNECT_URI  # noqa: PLC0415 (only with -c: lean status)

        CONNECT_URI.set(connects[0])
    try:
        code: int = args.func(args)
    except BalloonError as exc:
        log.debug("detail", exc_info=True)
        print(f"balloonctl: error: {exc}", file=sys.stderr)
        return exit_code(exc)
    except MemoryError:
        print("balloonctl: error: out of memory", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_FAILED
    return code


if __name__ == "__main__":
    sys.exit(main())
