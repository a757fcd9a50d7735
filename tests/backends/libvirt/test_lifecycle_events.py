"""The daemon finds a new libvirt domain from libvirt's lifecycle events, not the rescan.

Against the private libvirtd (fixtures/libvirtd.py) and a real guest domain: the periodic
rescan is set to an hour, so only the STARTED event can bring the domain in; its STOPPED
event takes it out again. The latency before and after events is measured by
``python -m tests.backends.libvirt.discovery`` (a script, not a timed test).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fixtures.libvirtd import Libvirtd
from tests.backends.libvirt.discovery import measure


def test_a_started_domain_is_managed_without_waiting_for_the_rescan(
    libvirtd: Libvirtd, tmp_path: Path
) -> None:
    latencies = asyncio.run(measure(libvirtd, tmp_path, events=True, rescan_s=3600.0))
    # Within a few ticks of the start, an hour before the rescan would have found it.
    assert latencies[0] < 30.0, latencies
