"""Numbers from the virtio 1.2 specification (and the Linux/QEMU headers where they go further).

Section numbers are those of "Virtual I/O Device (VIRTIO) Version 1.2". Every protocol check
in this package cites the section it enforces; the numbers it checks against live here.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Final

# --- 2.7 Split Virtqueues -------------------------------------------------------------
#: 2.7: "Queue Size value is always a power of 2. The maximum Queue Size value is 32768."
MAX_QUEUE_SIZE: Final = 32768
#: 2.7.1 (table in 2.7): alignment of each part of the split virtqueue, in bytes.
DESC_ALIGN: Final = 16
AVAIL_ALIGN: Final = 2
USED_ALIGN: Final = 4
#: 2.7.5.2: "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes in total".
MAX_CHAIN_BYTES: Final = 1 << 32

# 2.7.5 The Virtqueue Descriptor Table: struct virtq_desc { le64 addr; le32 len; le16 flags;
# le16 next; }
DESC_SIZE: Final = 16
DESC_STRUCT: Final = struct.Struct("<QIHH")

VIRTQ_DESC_F_NEXT: Final = 1  # 2.7.5: the buffer continues via the next field
VIRTQ_DESC_F_WRITE: Final = 2  # 2.7.5: device-writable (otherwise device-readable)
VIRTQ_DESC_F_INDIRECT: Final = 4  # 2.7.5.3: the buffer is a table of descriptors

# 2.7.6 The Virtqueue Available Ring: le16 flags; le16 idx; le16 ring[N]; le16 used_event.
VIRTQ_AVAIL_F_NO_INTERRUPT: Final = 1
AVAIL_FLAGS_OFF: Final = 0
AVAIL_IDX_OFF: Final = 2
AVAIL_RING_OFF: Final = 4

# 2.7.8 The Virtqueue Used Ring: le16 flags; le16 idx; struct virtq_used_elem { le32 id;
# le32 len; } ring[N]; le16 avail_event.
VIRTQ_USED_F_NO_NOTIFY: Final = 1
USED_FLAGS_OFF: Final = 0
USED_IDX_OFF: Final = 2
USED_RING_OFF: Final = 4
USED_ELEM_SIZE: Final = 8


def desc_table_size(queue_size: int) -> int:
    """Bytes of a descriptor table: 16 * N (2.7.5)."""
    return DESC_SIZE * queue_size


def avail_ring_size(queue_size: int) -> int:
    """Bytes of an available ring, used_event included: 6 + 2 * N (2.7.6)."""
    return 6 + 2 * queue_size


def used_ring_size(queue_size: int) -> int:
    """Bytes of a used ring, avail_event included: 6 + 8 * N (2.7.8)."""
    return 6 + USED_ELEM_SIZE * queue_size


def used_event_offset(queue_size: int) -> int:
    """Offset of used_event within the available ring (2.7.6, after ring[N])."""
    return AVAIL_RING_OFF + 2 * queue_size


def avail_event_offset(queue_size: int) -> int:
    """Offset of avail_event within the used ring (2.7.8, after ring[N])."""
    return USED_RING_OFF + USED_ELEM_SIZE * queue_size


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """2.7.7.2 / 2.7.10: with EVENT_IDX, notify iff event_idx lies in [old_idx, new_idx).

    The same u16 arithmetic as Linux's ``vring_need_event``: the other side asked to be told
    once the index passes ``event_idx``, and the index moved from ``old_idx`` to ``new_idx``.
    """
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old_idx) & 0xFFFF


# --- 2.1 Device Status Field ------------------------------------------------------------
class DeviceStatus(IntEnum):
    """The device status bits (2.1)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    NEEDS_RESET = 64
    FAILED = 128


# --- 6 Reserved Feature Bits (transport) -------------------------------------------------
VIRTIO_F_NOTIFY_ON_EMPTY: Final = 24  # legacy (6.3)
VIRTIO_F_ANY_LAYOUT: Final = 27  # legacy (6.3)
VIRTIO_F_INDIRECT_DESC: Final = 28
VIRTIO_F_EVENT_IDX: Final = 29
VIRTIO_F_VERSION_1: Final = 32
VIRTIO_F_ACCESS_PLATFORM: Final = 33
VIRTIO_F_RING_PACKED: Final = 34
VIRTIO_F_IN_ORDER: Final = 35
VIRTIO_F_ORDER_PLATFORM: Final = 36
VIRTIO_F_SR_IOV: Final = 37
VIRTIO_F_NOTIFICATION_DATA: Final = 38
VIRTIO_F_NOTIF_CONFIG_DATA: Final = 39
VIRTIO_F_RING_RESET: Final = 40

# --- 5.5 Traditional Memory Balloon Device -----------------------------------------------
#: 5.5.1: the balloon's device ID.
VIRTIO_ID_BALLOON: Final = 5
# 5.5.3 Feature bits (virtio 1.2 numbering).
VIRTIO_BALLOON_F_MUST_TELL_HOST: Final = 0
VIRTIO_BALLOON_F_STATS_VQ: Final = 1
VIRTIO_BALLOON_F_DEFLATE_ON_OOM: Final = 2
VIRTIO_BALLOON_F_FREE_PAGE_HINT: Final = 3
VIRTIO_BALLOON_F_PAGE_POISON: Final = 4
VIRTIO_BALLOON_F_PAGE_REPORTING: Final = 5
#: The seed patch's bit 3 ("Use sg instead of PFN lists"). Never merged: in virtio 1.2 and
#: Linux bit 3 is FREE_PAGE_HINT. Only a device of the ``seed-sg`` profile means this.
SEED_VIRTIO_BALLOON_F_SG: Final = 3

#: 5.5.6: PFNs are in 4 KiB units whatever the guest's page size.
VIRTIO_BALLOON_PFN_SHIFT: Final = 12
#: Linux's VIRTIO_BALLOON_ARRAY_PFNS_MAX: the most PFNs the driver puts in one buffer, and
#: the most Firecracker accepts (MAX_PAGES_IN_DESC); see balloon.py for how we use it.
PFNS_PER_BUFFER_MAX: Final = 256
#: The seed's fix in later versions: a descriptor's len is le32 and must stay page-aligned,
#: so an SG chunk is at most round_down(UINT32_MAX, 4096) bytes.
SG_CHUNK_MAX: Final = 0xFFFFFFFF & ~0xFFF


class BalloonQueue(IntEnum):
    """5.5.2 Virtqueues, by role. The index a queue gets depends on the features acked."""

    INFLATE = 0
    DEFLATE = 1
    STATS = 2
    FREE_PAGE = 3
    REPORTING = 4


# 5.5.4 Device configuration layout: all fields little-endian, even for legacy devices.
CONFIG_NUM_PAGES_OFF: Final = 0  # le32, device-written: the target balloon size in pages
CONFIG_ACTUAL_OFF: Final = 4  # le32, driver-written: pages the driver has given
CONFIG_FREE_PAGE_HINT_CMD_ID_OFF: Final = 8  # le32, device-written (FREE_PAGE_HINT)
CONFIG_POISON_VAL_OFF: Final = 12  # le32, driver-written (PAGE_POISON)
CONFIG_SIZE: Final = 16


# 5.5.6.3 Memory Statistics: struct virtio_balloon_stat { le16 tag; le64 val; } packed.
STAT_STRUCT: Final = struct.Struct("<HQ")
STAT_SIZE: Final = STAT_STRUCT.size  # 10


class StatTag(IntEnum):
    """5.5.6.4 Memory Statistics Tags (0-9); 10-15 are Linux's, not the virtio 1.2 spec's.

    Tags 10-15 came with Linux 6.12 (include/uapi/linux/virtio_balloon.h,
    VIRTIO_BALLOON_S_OOM_KILL ... VIRTIO_BALLOON_S_DIRECT_RECLAIM, VIRTIO_BALLOON_S_NR 16;
    zhenwei pi's three "virtio_balloon: introduce ..." commits, merged for 6.12). What each
    one counts is in :data:`EXTENDED_STAT_TAGS`.
    """

    SWAP_IN = 0
    SWAP_OUT = 1
    MAJFLT = 2
    MINFLT = 3
    MEMFREE = 4
    MEMTOT = 5
    AVAIL = 6
    CACHES = 7
    HTLB_PGALLOC = 8
    HTLB_PGFAIL = 9
    OOM_KILLS = 10
    ALLOC_STALLS = 11
    ASYNC_SCANS = 12
    DIRECT_SCANS = 13
    ASYNC_RECLAIMS = 14
    DIRECT_RECLAIMS = 15


#: The names QEMU gives the stats in ``guest-stats`` (without its ``stat-`` prefix), which
#: are the names balloonctl prints (hw/virtio/virtio-balloon.c balloon_stat_names; tags
#: 10-15 named there since QEMU 9.2). Memory amounts are in bytes (5.5.6.4: "in bytes").
STAT_NAMES: Final[dict[int, str]] = {
    StatTag.SWAP_IN: "swap-in",
    StatTag.SWAP_OUT: "swap-out",
    StatTag.MAJFLT: "major-faults",
    StatTag.MINFLT: "minor-faults",
    StatTag.MEMFREE: "free-memory",
    StatTag.MEMTOT: "total-memory",
    StatTag.AVAIL: "available-memory",
    StatTag.CACHES: "disk-caches",
    StatTag.HTLB_PGALLOC: "htlb-pgalloc",
    StatTag.HTLB_PGFAIL: "htlb-pgfail",
    StatTag.OOM_KILLS: "oom-kills",
    StatTag.ALLOC_STALLS: "alloc-stalls",
    StatTag.ASYNC_SCANS: "async-scans",
    StatTag.DIRECT_SCANS: "direct-scans",
    StatTag.ASYNC_RECLAIMS: "async-reclaims",
    StatTag.DIRECT_RECLAIMS: "direct-reclaims",
}

#: The tags of the virtio 1.1/1.2 spec (5.5.6.4), all a QEMU before 9.2 knows: its
#: VIRTIO_BALLOON_S_NR is 10, and balloon_stats_poll_cb keeps a tag only ``if (tag <
#: VIRTIO_BALLOON_S_NR)``, so a Linux 6.12 guest's tags 10-15 are dropped there unseen.
CLASSIC_STAT_TAGS: Final = tuple(StatTag(tag) for tag in range(10))

#: Linux 6.12's six guest statistics, in tag order. Meaning and unit, from
#: drivers/virtio/virtio_balloon.c update_balloon_vm_stats() (Linux 6.12), which reads the
#: guest's global vm event counters (all_vm_events, /proc/vmstat's names in brackets):
#:
#: * 10 ``oom-kills``: events[OOM_KILL] [oom_kill], the OOM killer's kills, one per victim
#:   (mm/oom_kill.c __oom_kill_process; memory-cgroup OOMs included). A count. An OOM that
#:   a notifier satisfied (virtio_balloon's deflate-on-OOM) kills nobody and is not counted.
#: * 11 ``alloc-stalls``: the sum over every zone of events[ALLOCSTALL_*] [allocstall_*],
#:   the times an allocating task entered direct reclaim itself (mm/vmscan.c
#:   do_try_to_free_pages), whether or not it freed anything. A count.
#: * 12 ``async-scans``: pages_to_bytes(events[PGSCAN_KSWAPD]) [pgscan_kswapd], memory
#:   kswapd (background reclaim) scanned. Bytes.
#: * 13 ``direct-scans``: pages_to_bytes(events[PGSCAN_DIRECT]) [pgscan_direct], memory
#:   allocating tasks scanned in direct reclaim. Bytes.
#: * 14 ``async-reclaims``: pages_to_bytes(events[PGSTEAL_KSWAPD]) [pgsteal_kswapd], memory
#:   kswapd reclaimed. Bytes.
#: * 15 ``direct-reclaims``: pages_to_bytes(events[PGSTEAL_DIRECT]) [pgsteal_direct], memory
#:   direct reclaim reclaimed. Bytes.
#:
#: All six only grow (until the guest reboots). The PGSCAN/PGSTEAL events are not counted
#: for memory-cgroup reclaim in 6.12 (``if (!cgroup_reclaim(sc))`` in mm/vmscan.c); a later
#: patch ("mm: move pgscan, pgsteal, pgrefill to node stats", v4 posted February 2026) has
#: the driver read them with global_node_page_state() and counts cgroup reclaim too; the
#: tags and units stay.
#: QEMU before 9.2 does not show them; QEMU 9.2+ shows all sixteen names, -1 for what the
#: guest did not send (a kernel before 6.12).
EXTENDED_STAT_TAGS: Final = (
    StatTag.OOM_KILLS,
    StatTag.ALLOC_STALLS,
    StatTag.ASYNC_SCANS,
    StatTag.DIRECT_SCANS,
    StatTag.ASYNC_RECLAIMS,
    StatTag.DIRECT_RECLAIMS,
)
#: Their names (``oom-kills`` ... ``direct-reclaims``): the one list of them in balloonctl.
EXTENDED_STAT_NAMES: Final = tuple(STAT_NAMES[tag] for tag in EXTENDED_STAT_TAGS)

#: The statistics whose values are bytes; the others are counts. Linux converts pages with
#: pages_to_bytes() for SWAP_IN/SWAP_OUT (PSWPIN/PSWPOUT) and tags 12-15, and reports
#: MEMFREE/MEMTOT/AVAIL/CACHES from sysinfo and page counts in bytes; MAJFLT, MINFLT,
#: HTLB_PGALLOC, HTLB_PGFAIL, OOM_KILL and ALLOC_STALL are plain event counts
#: (update_balloon_vm_stats, update_balloon_stats).
BYTE_STATS: Final = frozenset(
    STAT_NAMES[tag]
    for tag in (
        StatTag.SWAP_IN,
        StatTag.SWAP_OUT,
        StatTag.MEMFREE,
        StatTag.MEMTOT,
        StatTag.AVAIL,
        StatTag.CACHES,
        StatTag.ASYNC_SCANS,
        StatTag.DIRECT_SCANS,
        StatTag.ASYNC_RECLAIMS,
        StatTag.DIRECT_RECLAIMS,
    )
)
