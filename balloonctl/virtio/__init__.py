"""The device side of virtio-balloon: spec constants, features, guest memory, split queues,
request decoding and the balloon device. Imports nothing from the rest of balloonctl but
``errors`` and ``units``."""
