"""balloonctl: manage virtio-balloon devices, and the device side of the balloon protocol."""

from __future__ import annotations

import logging

__version__ = "0.1.0"

# A library logs; the application decides where it goes (as qemu.qmp does).
logging.getLogger(__name__).addHandler(logging.NullHandler())
