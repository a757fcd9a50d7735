"""The simulated VM: the guest driver model and the device behind a real QMP socket."""
