"""``balloonctl bench seed``: the seed's experiment replayed in-process.

The seed measured an idle 8 GiB guest inflating 7 GiB: 4126 ms with PFN arrays, 491 ms with
SG (8.4x), and broke the time into allocating pages, sending PFNs to the host, address
translation and madvise. Here the same guest is the driver model, the host is the device
model, both in one process over one real guest memory, made resident before the timed part
so that discards free real memory:

* ``pfn``: Linux's legacy protocol, 256 PFNs per request; the device discards page by page
  (QEMU 7.2's balloon_inflate_page).
* ``pfn-compact``: the same protocol; the device merges each request into ranges and
  discards per range (Firecracker).
* ``sg``: the seed, one descriptor per run of pages.

``floor_s`` is one bulk discard of the same pages on the same backing: the kernel's own,
unavoidable part, the limit no path can beat. What the in-process model does not pay is the
guest-to-host round trip of each request (a VM exit), which was most of the seed's 8.4x.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from balloonctl.errors import UsageError
from balloonctl.guest.testbed import Testbed, TestbedConfig
from balloonctl.units import PAGE_SHIFT, format_size
from balloonctl.virtio.balloon import DiscardStrategy
from balloonctl.virtio.memory import Backing, GuestMemory
from balloonctl.virtio.spec import BalloonQueue

#: The seed's own numbers (KVM, 2017): 4126 ms legacy, ~491 ms SG.
SEED_PFN_MS = 4126
SEED_SG_MS = 491
PATHS = {
    "pfn": ("virtio-1.2", DiscardStrategy.PER_PAGE),
    "pfn-compact": ("virtio-1.2", DiscardStrategy.PER_RANGE),
    "sg": ("seed-sg", DiscardStrategy.PER_RANGE),
}
STAGES = ("allocate", "send", "translate", "discard")


@dataclass(frozen=True)
class SeedBenchConfig:
    """What to measure."""

    memory: int = 8 << 30
    inflate: int = 7 << 30
    backing: Backing = Backing.ANON
    #: The guest's own memory (kernel, rings): never ballooned.
    kernel: int = 256 << 20
    paths: tuple[str, ...] = tuple(PATHS)
    queue_size: int = 128


def _check(config: SeedBenchConfig) -> None:
    if config.backing is Backing.BYTES:
        raise UsageError("bench seed needs real memory: --backing anon or memfd")
    if config.inflate + config.kernel > config.memory:
        raise UsageError(
            f"cannot inflate {format_size(config.inflate)} of {format_size(config.memory)} "
            f"with {format_size(config.kernel)} kept by the guest"
        )
    unknown = set(config.paths) - set(PATHS)
    if unknown:
        raise UsageError(f"unknown path(s) {sorted(unknown)}; known: {', '.join(PATHS)}")


def _run_path(name: str, config: SeedBenchConfig) -> dict[str, Any]:
    profile, discard = PATHS[name]
    with GuestMemory.simple(config.memory, config.backing) as mem:
        mem.make_resident()  # untimed: 7-13 s for 8 GiB on this machine kind
        resident_before = mem.resident_bytes()
        bed = Testbed(
            TestbedConfig(
                memory=config.memory,
                profile=profile,
                backing=config.backing,
                discard=discard,
                queue_size=config.queue_size,
                used=config.kernel,
            ),
            mem=mem,
        )
        pages = config.inflate >> PAGE_SHIFT
        inflate_q = bed.driver.queues[BalloonQueue.INFLATE].counters
        kicks0, descs0 = inflate_q.kicks, inflate_q.descriptors
        t0 = time.perf_counter()
        bed.set_target(pages)
        wall = time.perf_counter() - t0
        bed.check()
        resident_after = mem.resident_bytes()
        counters = bed.device.counters
        times = bed.driver.times
        stage_s = {
            "allocate": times.allocate_s,
            "send": max(0.0, times.tell_host_s - counters.translate_s - counters.discard_s),
            "translate": counters.translate_s,
            "discard": counters.discard_s,
        }
        total = sum(stage_s.values()) or 1.0
        result: dict[str, Any] = {
            "wall_s": round(wall, 4),
            "kicks": inflate_q.kicks - kicks0,
            "chains": inflate_q.chains,
            "descriptors": inflate_q.descriptors - descs0,
            "discard_calls": counters.discard_syscalls,
            "pfn_bytes": counters.pfn_bytes,
            "freed_bytes": resident_before - resident_after,
            "stages": {
                k: {"ms": round(v * 1000, 1), "percent": round(100 * v / total, 1)}
                for k, v in stage_s.items()
            },
        }
        t1 = time.perf_counter()
        bed.set_target(0)
        result["deflate_s"] = round(time.perf_counter() - t1, 4)
        bed.check()
        bed.close()
        return result


def _floor(config: SeedBenchConfig) -> float:
    """One bulk discard of the pages the guest would give (kernel memory first, the rest
    after it: the idle guest's layout), on the same backing, resident first."""
    with GuestMemory.simple(config.memory, config.backing) as mem:
        mem.make_resident()
        t0 = time.perf_counter()
        mem.discard(config.kernel, config.inflate)
        return time.perf_counter() - t0


def run(config: SeedBenchConfig) -> dict[str, Any]:
    """Every path, then the floor; the report ``--json`` prints."""
    _check(config)
    paths = {name: _run_path(name, config) for name in config.paths}
    floor = _floor(config)
    report: dict[str, Any] = {
        "memory_bytes": config.memory,
        "inflate_bytes": config.inflate,
        "backing": config.backing.value,
        "floor_s": round(floor, 4),
        "paths": paths,
        "seed": {
            "pfn_ms": SEED_PFN_MS,
            "sg_ms": SEED_SG_MS,
            "speedup": round(SEED_PFN_MS / SEED_SG_MS, 1),
        },
    }
    for result in paths.values():
        result["vs_floor"] = round(result["wall_s"] / floor, 2) if floor else None
    if "pfn" in paths and "sg" in paths and paths["sg"]["wall_s"]:
        report["speedup"] = round(paths["pfn"]["wall_s"] / paths["sg"]["wall_s"], 1)
    return report


def format_report(report: dict[str, Any]) -> str:
    """A table for people."""
    lines = [
        f"seed: inflate {format_size(report['inflate_bytes'])} of "
        f"{format_size(report['memory_bytes'])} ({report['backing']} RAM); "
        f"floor (one bulk discard) {report['floor_s'] * 1000:.0f} ms",
        f"{'path':<12}{'wall ms':>9}{'x floor':>8}{'kicks':>7}{'descs':>7}{'discards':>10}"
        + "".join(f"{s + ' ms':>13}" for s in STAGES)
        + f"{'deflate ms':>12}",
    ]
    for name, p in report["paths"].items():
        stages = "".join(
            f"{p['stages'][s]['ms']:>7.0f} ({p['stages'][s]['percent']:>2.0f}%)" for s in STAGES
        )
        lines.append(
            f"{name:<12}{p['wall_s'] * 1000:>9.0f}{p['vs_floor']:>8}{p['kicks']:>7}"
            f"{p['descriptors']:>7}{p['discard_calls']:>10}{stages}{p['deflate_s'] * 1000:>12.0f}"
        )
    if "speedup" in report:
        lines.append(
            f"pfn / sg: {report['speedup']}x here; the seed measured "
            f"{report['seed']['pfn_ms']} / {report['seed']['sg_ms']} ms = "
            f"{report['seed']['speedup']}x (with a VM exit per request, which this model has not)"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: str) -> None:
    """The stage breakdown of each path side by side (matplotlib: the ``plot`` extra)."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError as exc:
        raise UsageError("--plot needs matplotlib: pip install 'balloonctl[plot]'") from exc
    names = list(report["paths"])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bottom = [0.0] * len(names)
    for stage in STAGES:
        values = [report["paths"][n]["stages"][stage]["ms"] for n in names]
        ax.bar(names, values, bottom=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.axhline(report["floor_s"] * 1000, color="black", linestyle="--", label="floor")
    ax.set_ylabel("ms")
    ax.set_title(
        f"inflate {format_size(report['inflate_bytes'])} of "
        f"{format_size(report['memory_bytes'])} ({report['backing']})"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
