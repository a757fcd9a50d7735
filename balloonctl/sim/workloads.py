"""What a simulated guest does with its memory over time: ``--workload NAME``.

A workload is a pure function of the time since boot (seconds) and the guest's RAM (bytes)
to the memory its programs want: ``anon`` (process memory the guest cannot give up while
it is in use) and ``cache`` (page cache, which the guest reclaims when the balloon or a
program needs it). The simulated guest chases these numbers every half second; when anon
memory cannot be had from free pages or cache, its OOM path runs (deflate-on-OOM if the
balloon negotiated it, else an OOM kill is counted and the program makes do).

=========  =================================================================================
idle       10% anon, 5% cache, constant: a guest that can give most of its memory away.
steady     40% anon with a slow +-3% wobble (period 60 s), 10% cache: a loaded server.
spiky      20% anon, rising to 70% for 5 s out of every 30 s (a batch job), 10% cache.
leak       anon starts at 15% and grows by 1% of RAM a second until 95%: a leaking program
           that ends in the OOM path, then stays there.
cache      15% anon; cache grows from 5% by 2% a second to 60% (a file scan): memory that
           looks used but is available, what a MemFree-based policy gets wrong.
=========  =================================================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class Demand:
    """Bytes a guest's programs want now."""

    anon: int
    cache: int


def _idle(t: float, ram: int) -> Demand:
    return Demand(ram * 10 // 100, ram * 5 // 100)


def _steady(t: float, ram: int) -> Demand:
    wobble = 0.03 * math.sin(2 * math.pi * t / 60.0)
    return Demand(int(ram * (0.40 + wobble)), ram * 10 // 100)


def _spiky(t: float, ram: int) -> Demand:
    anon = 0.70 if (t % 30.0) >= 25.0 else 0.20
    return Demand(int(ram * anon), ram * 10 // 100)


def _leak(t: float, ram: int) -> Demand:
    return Demand(int(ram * min(0.95, 0.15 + 0.01 * t)), ram * 5 // 100)


def _cache(t: float, ram: int) -> Demand:
    return Demand(ram * 15 // 100, int(ram * min(0.60, 0.05 + 0.02 * t)))


WORKLOADS: Final[dict[str, Callable[[float, int], Demand]]] = {
    "idle": _idle,
    "steady": _steady,
    "spiky": _spiky,
    "leak": _leak,
    "cache": _cache,
}


def demand(name: str, t: float, ram: int) -> Demand:
    """The named workload's demand at ``t`` seconds after boot (KeyError if unknown)."""
    return WORKLOADS[name](max(0.0, t), ram)
