"""Ways to reach a VM: the Backend protocol and its QMP and libvirt implementations."""
