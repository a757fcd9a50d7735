"""The guest side, modelled in-process: a page allocator, the driver side of split queues,
and the seed's virtio_balloon driver. Imports ``virtio`` (never the reverse)."""
