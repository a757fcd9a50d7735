"""Every error balloonctl raises on purpose, under one root.

Callers catch :class:`BalloonError` and get a one-line message; the CLI maps the branch to
an exit code (see ``balloonctl.cli.main``). Anything that is not a ``BalloonError`` escaping from
balloonctl is a bug, and the fuzz harnesses treat it as a finding.

The tree::

    BalloonError                    root; str(e) is a one-line message for a user
    +-- UsageError                  bad command-line input: a size, an address, a file (exit 2)
    |   +-- ConfigError             the configuration file, naming the file and the key (exit 2)
    +-- GuestMemoryError            host-side access outside guest memory; a bug if it escapes
    |                               the device code, which checks bounds first
    +-- NegotiationError            the device refuses FEATURES_OK (spec 2.2.1, 3.1.1)
    +-- PeerError                   QEMU or libvirt answered something balloonctl cannot use
    |   +-- BadStatistics           guest statistics no guest can have (negative, not a
    |                               number): the VM answers, its reading is unusable
    +-- VmUnreachable               no connection to the VM's QMP socket or libvirt (exit 1)
    |   +-- ConnectionLost          an established connection dropped mid-operation
    +-- CommandFailed               the VM refused a command: QMP/libvirt error, class + text
    +-- OperationTimeout            a wait ended before the VM got there (exit 1)
    +-- ReadLimitError              a live ring names more guest memory than one
    |                               ``vring dump`` may read (exit 1)
    +-- GuestModelError             the in-process guest cannot go on: its queue is full with
    |                               nothing to wait for, or the device never returned a buffer
    +-- InvariantError              the testbed's guest model and device disagree about a page
    +-- HostReadError               the daemon cannot use the host's /proc/meminfo (never
    |                               reaches the command line: that tick decides nothing)
    +-- FuzzerFailed                a fuzzing tool (an atheris entry point, replay.py,
    |                               coverage.py) stopped without a result (exit 1)
    +-- VirtioError                 a guest broke the ring protocol; the device stops the
        |                           queue (exit 3). Carries .head, .index, .indirect.
        +-- QueueSizeInvalid        size 0, not a power of two, > 32768
        +-- RingMisaligned          desc not 16-, avail not 2-, used not 4-aligned
        +-- RingOutOfBounds         a ring not wholly inside guest memory
        +-- AvailIndexJump          avail.idx ran more than a queue ahead of last_avail_idx
        +-- HeadOutOfRange          an avail ring entry >= queue size
        +-- NextOutOfRange          next >= queue size (or >= entries of an indirect table)
        +-- DescriptorLoop          a chain visits more descriptors than its table holds
        +-- BufferOutOfBounds       addr + len wraps 2**64 or leaves guest memory
        +-- ZeroLengthBuffer        len == 0
        +-- ChainTooLong            a chain's buffers add up to more than 2**32 bytes
        +-- IndirectTableInvalid    indirect len 0 / not a multiple of 16 / too many entries /
        |                           outside memory / not negotiated
        +-- NestedIndirect          INDIRECT inside an indirect table
        +-- IndirectWithNext        INDIRECT and NEXT on one descriptor
        +-- DescriptorOrder         a device-readable descriptor after a device-writable one
        +-- WrongDirection          a balloon buffer whose direction is not the spec's

Balloon-level problems (a PFN outside RAM, a duplicate page, ...) are *not* errors: the
device skips and counts them (``balloonctl.virtio.balloon.Rejection``), as QEMU and
Firecracker do, because one bad PFN must not stop the guest's balloon.
"""

from __future__ import annotations


class BalloonError(Exception):
    """Root of every error balloonctl raises on purpose."""


class UsageError(BalloonError):
    """The user's input (an option, a size, a file) cannot be used as given."""


class ConfigError(UsageError):
    """The configuration file cannot be used as written (exit 2).

    A UsageError because the file is the user's input like an option is: the same exit code,
    and the message names the file and the key so it can be fixed without a traceback.
    ``balloonctl.daemon.config`` raises it for the whole file, before anything is applied
    (a corrupt config is never half-applied; docs/contracts.md).
    """


class GuestMemoryError(BalloonError):
    """A host-side access fell outside guest memory.

    Device code checks bounds before it touches memory and raises a :class:`VirtioError`
    naming the guest's mistake; this one escaping means balloonctl itself is wrong.
    """


class NegotiationError(BalloonError):
    """The device refuses the driver's feature set at FEATURES_OK."""


class PeerError(BalloonError):
    """A peer (QEMU, libvirt) answered with something malformed: the operation failed,
    the user did nothing wrong (exit 1, not 2)."""


class BadStatistics(PeerError):
    """A reading of the guest's statistics holds a value no guest can have (negative, not
    an integer). A command line gets the PeerError it always got (exit 1); the daemon tells
    it apart from a broken connection, and holds the VM rather than marking it down: the
    VM answered, only its report is unusable."""


class VmUnreachable(BalloonError):
    """The VM cannot be reached: no socket, connection refused, handshake failed (exit 1).

    The daemon treats it as a VM that is gone for now, not as a bug.
    """


class ConnectionLost(VmUnreachable):
    """The connection dropped while a command was in flight; its outcome is unknown."""


class CommandFailed(BalloonError):
    """The VM answered a command with an error (QMP ``error``, a libvirt error).

    ``error_class`` is QMP's class (``GenericError``, ``DeviceNotActive``, ...) or the
    libvirt error's code name, so callers can tell "no balloon" from other refusals.
    """

    def __init__(self, message: str, *, error_class: str = "GenericError") -> None:
        super().__init__(message)
        self.error_class = error_class


class OperationTimeout(BalloonError):
    """A wait ran out before the VM reached what was asked (exit 1)."""


class ReadLimitError(BalloonError):
    """The chains in a live queue's window name more guest memory than one dump may read."""


class GuestModelError(BalloonError):
    """The in-process guest model cannot go on (no descriptors and nothing in flight, or
    the device never returned what it was given)."""


class InvariantError(BalloonError):
    """Guest and device disagree about the balloon: a bug in one of them.

    Raised by ``balloonctl.guest.testbed.Testbed.check`` between steps. Not a GuestModelError:
    that one says the model cannot go on, this one that the model or the device is wrong,
    and the fuzz harnesses must count it as a finding, never catch it as expected.
    """


class HostReadError(BalloonError):
    """The host's memory state cannot be read (the tick decides nothing).

    Not a PeerError: the host's /proc is no peer, and the daemon treats a bad reading
    differently from a bad VM: it logs it and skips the tick's decisions for every VM,
    rather than marking one VM down (docs/architecture.md, Error tree).
    """


class FuzzerFailed(BalloonError):
    """A fuzzing tool ``python -m fuzz`` runs stopped without a result: it could not start,
    exited with an error of its own, or outlived its deadline. Not a finding (exit 1)."""


class VirtioError(BalloonError):
    """The guest broke the split-virtqueue protocol; the queue cannot go on.

    ``head`` is the chain's head index (None before a chain is reached), ``index`` the
    descriptor's index in its table, and ``indirect`` whether that table is an indirect one.
    """

    def __init__(
        self,
        message: str,
        *,
        head: int | None = None,
        index: int | None = None,
        indirect: bool = False,
    ) -> None:
        super().__init__(message)
        self.head = head
        self.index = index
        self.indirect = indirect


class QueueSizeInvalid(VirtioError):
    """Queue size 0, not a power of two, or above 32768 (spec 2.7)."""


class RingMisaligned(VirtioError):
    """A ring part is not at its required alignment (spec 2.7.1)."""


class RingOutOfBounds(VirtioError):
    """A ring part is not wholly inside guest memory."""


class AvailIndexJump(VirtioError):
    """avail.idx is more than a queue size ahead of the device's last_avail_idx."""


class HeadOutOfRange(VirtioError):
    """An available ring entry names a descriptor beyond the table (spec 2.7.6)."""


class NextOutOfRange(VirtioError):
    """A descriptor's next field points beyond its table (spec 2.7.5)."""


class DescriptorLoop(VirtioError):
    """A chain visits more descriptors than its table holds (spec 2.7.5.2)."""


class BufferOutOfBounds(VirtioError):
    """A buffer wraps the address space or leaves guest memory."""


class ZeroLengthBuffer(VirtioError):
    """A descriptor of length 0 (QEMU refuses zero-sized buffers)."""


class ChainTooLong(VirtioError):
    """A chain's buffers add up to more than 2**32 bytes (spec 2.7.5.2)."""


class IndirectTableInvalid(VirtioError):
    """An indirect table that cannot be a table (spec 2.7.5.3.1)."""


class NestedIndirect(VirtioError):
    """INDIRECT set inside an indirect table (spec 2.7.5.3.1)."""


class IndirectWithNext(VirtioError):
    """INDIRECT and NEXT set on the same descriptor (spec 2.7.5.3.1)."""


class DescriptorOrder(VirtioError):
    """A device-readable descriptor after a device-writable one (spec 2.7.4.2)."""


class WrongDirection(VirtioError):
    """A balloon buffer whose direction is not the one the spec gives its queue (5.5.6)."""
