"""Sizes, addresses and page arithmetic, parsed and printed one way everywhere.

Sizes follow QEMU and libvirt: ``K``, ``M``, ``G`` and ``T`` are binary (1024-based) with or
without a trailing ``iB``/``B``, so ``1536M``, ``1536MiB`` and ``1.5G`` are the same size. A
fraction is allowed and rounded down to whole bytes, as QEMU's ``qemu_strtosz`` does.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from balloonctl.errors import UsageError

#: The balloon's page: "Balloon device works in 4K page units" (Linux, QEMU; spec 5.5.6).
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

U64_MAX = (1 << 64) - 1

_SUFFIX_SHIFT = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}
#: Digits a size may have: 2**64 has 20, so 64 leaves room for a fraction.
_SIZE_DIGITS_MAX = 64
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Return ``text`` (``4096``, ``512MiB``, ``1.5G``) as a number of bytes."""
    match = _SIZE_RE.match(text) if text.isascii() else None
    if match is None:
        raise UsageError(f"not a size: {text!r} (examples: 1536M, 1.5G, 512MiB, 4096)")
    number, suffix, tail = match.groups()
    if len(number) > _SIZE_DIGITS_MAX:
        # Fraction() goes through int(), which refuses more than 4300 digits with a
        # ValueError (found by fuzz target config); no size needs more than a few dozen.
        raise UsageError(f"not a size: {text[:40]!r}... (more than {_SIZE_DIGITS_MAX} digits)")
    if tail is not None and tail.upper() == "IB" and not suffix:
        raise UsageError(f"not a size: {text!r} ('iB' needs K, M, G or T before it)")
    # Exact rational arithmetic: Decimal's 28-digit context would round a long fraction up.
    size = math.floor(Fraction(number) * (1 << _SUFFIX_SHIFT[suffix.upper()]))
    if size > U64_MAX:
        raise UsageError(f"size {text!r} does not fit in 64 bits")
    return size


def parse_int(text: str, *, what: str = "number", limit: int = U64_MAX) -> int:
    """Return a non-negative integer written in decimal or ``0x`` hex (GPAs, indices)."""
    cleaned = text.strip().replace("_", "")
    if not cleaned.isascii():  # int() would read other scripts' digits
        raise UsageError(f"{what} {text!r} is not a decimal or 0x-hex number")
    try:
        value = int(cleaned, 16) if cleaned.lower().startswith("0x") else int(cleaned, 10)
    except ValueError:
        raise UsageError(f"{what} {text!r} is not a decimal or 0x-hex number") from None
    if value < 0:
        raise UsageError(f"{what} {text!r} is negative")
    if value > limit:
        raise UsageError(f"{what} {text!r} is larger than {limit}")
    return value


def format_size(size: int) -> str:
    """``1610612736`` -> ``1.5 GiB``: the largest binary unit, up to two decimals."""
    for suffix, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            text = f"{size / (1 << shift):.2f}".rstrip("0").rstrip(".")
            return f"{text} {suffix}"
    return f"{size} B"


def bytes_to_pages(size: int) -> int:
    """Whole 4 KiB balloon pages in ``size`` bytes (a partial page does not count)."""
    return size >> PAGE_SHIFT


def pages_to_bytes(pages: int) -> int:
    """Bytes in ``pages`` 4 KiB balloon pages."""
    return pages << PAGE_SHIFT


def is_page_aligned(value: int) -> bool:
    """Whether an address or length is a whole number of 4 KiB pages."""
    return value & (PAGE_SIZE - 1) == 0
