"""``balloonctl`` as a process among others: SIGTERM unwinds a command (its ``finally``
blocks run, e.g. the guest memory a ``vring dump`` wrote is removed), and a closed standard
output is a one-line error before anything is done (docs/contracts.md, "Errors: one line,
never a traceback").
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path

from balloonctl.virtio import spec
from balloonctl.virtio.layout import RingLayout
from balloonctl.virtio.mock import stats_buffer
from tests.backends.hostile_peer import Hang, HostilePeer, Script
from tests.support.cli import balloonctl_argv, cli_env, one_line_error
from tests.support.vring_peer import BUFFERS, RING_BASE, FakeVm

#: Guard against a hang (a failure, not a measured time): far above any honest run.
HANG_GUARD_S = 120.0


# --------------------------------------------------------------------------------------------
# SIGTERM during vring dump left guest memory in the temporary directory
# --------------------------------------------------------------------------------------------


class _SlowPmemsave(FakeVm):
    """Writes the pmemsave file as QEMU does, then never answers (a slow or stuck QEMU)."""

    def do_pmemsave(self, args: Mapping[str, object]) -> Script:
        super().do_pmemsave(args)
        return [Hang()]


def test_sigterm_during_vring_dump_removes_the_pmemsave_file(run_dir: Path) -> None:
    """Python's default SIGTERM skipped every ``finally``: the private directory and its
    file of guest memory stayed behind in $TMPDIR (`timeout`, systemd, a script's kill)."""
    vm = _SlowPmemsave()
    stats = vm.queue(2, RingLayout.packed(128, RING_BASE), last_avail=1)
    vm.mem.write(BUFFERS, stats_buffer([(spec.StatTag.MEMTOT, 1 << 30)]))
    stats.add_chain([(BUFFERS, spec.STAT_SIZE, False)])
    tmp = run_dir / "tmp"
    tmp.mkdir()
    sock = run_dir / "qemu.sock"

    async def main() -> tuple[int, str, list[str]]:
        async with HostilePeer(sock, vm) as peer:
            proc = await asyncio.create_subprocess_exec(
                *balloonctl_argv("vring", "dump", str(sock), "--queue", "stats"),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=cli_env({"TMPDIR": str(tmp)}),
            )
            async with asyncio.timeout(HANG_GUARD_S):
                while not peer.count("pmemsave"):  # the file is written when it is logged
                    await asyncio.sleep(0.02)
            written = [str(p.relative_to(tmp)) for p in tmp.rglob("*")]
            proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(proc.communicate(), HANG_GUARD_S)
            assert proc.returncode is not None
            assert written, "the dump wrote no pmemsave file where TMPDIR says"
            return proc.returncode, err.decode(), [p.name for p in tmp.iterdir()]

    code, err, left = asyncio.run(main())
    assert code == 128 + signal.SIGTERM, err
    assert "Traceback" not in err, err
    assert left == []


# --------------------------------------------------------------------------------------------
# stdout closed (`balloonctl ... >&-`)
# --------------------------------------------------------------------------------------------


def test_closed_stdout_is_a_one_line_error_not_a_traceback(run_dir: Path) -> None:
    """With fd 1 closed, sys.stdout is None: the report's write was an AttributeError
    traceback, after the command had acted (here: a libvirt balloon target set)."""
    proc = subprocess.run(
        [*balloonctl_argv("-c", "test:///default", "--json", "set", "test", "1G")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
        timeout=HANG_GUARD_S,
        check=False,
        preexec_fn=lambda: os.close(1),
    )
    assert proc.returncode == 1
    assert "standard output is closed" in one_line_error(proc.stderr)
