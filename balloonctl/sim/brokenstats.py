"""Guests whose balloon statistics are broken, as some are in the field (``sim --broken-stats``).

What QMP's ``guest-stats`` shows of such a guest, made from what the simulated guest really
reported, so that the daemon's handling of them is shown rather than assumed:

* ``virtio-win``: Windows' virtio-win driver sends every statistic as 2**64-1, which QEMU
  keeps and shows as it shows a statistic never sent (-1), and its ``last-update`` never
  moves after the first report.
* ``frozen``: the first report's values and ``last-update``, forever (a guest whose stats
  work item stopped).
* ``negative``: ``stat-available-memory`` negative (no uint64 can be; a broken peer or a
  broken QEMU build).
* ``absurd``: ``stat-available-memory`` and ``stat-total-memory`` at 2**62 bytes, which a
  64-bit counter holds but no guest of this size has.

Before the guest's first report (``last-update`` 0) every kind shows what QEMU shows.
"""

from __future__ import annotations

from typing import Final

#: The kinds ``balloonctl sim --broken-stats`` takes.
BROKEN_STATS: Final = ("virtio-win", "frozen", "negative", "absurd")

#: What QEMU shows for a statistic it holds as u64 -1 (the sim's convention, qom.py).
_NOT_REPORTED: Final = -1


class BrokenStats:
    """One VM's broken statistics: :meth:`show` turns the real reading into the broken one."""

    def __init__(self, kind: str) -> None:
        if kind not in BROKEN_STATS:
            raise ValueError(f"unknown broken-stats kind {kind!r}")
        self.kind = kind
        #: The first real report (last-update, values), which frozen kinds keep showing.
        self._first: tuple[int, dict[str, int]] | None = None

    def show(self, last_update: int, stats: dict[str, int]) -> tuple[int, dict[str, int]]:
        """(last-update, stat values by QMP name) as this guest's QEMU would show them."""
        if last_update == 0:
            return last_update, stats
        if self._first is None:
            self._first = (last_update, dict(stats))
        first_update, first_stats = self._first
        if self.kind == "virtio-win":
            return first_update, dict.fromkeys(stats, _NOT_REPORTED)
        if self.kind == "frozen":
            return first_update, dict(first_stats)
        if self.kind == "negative":
            return last_update, {**stats, "stat-available-memory": -(64 << 20)}
        return last_update, {
            **stats,
            "stat-available-memory": 1 << 62,
            "stat-total-memory": 1 << 62,
        }
