"""The ``balloonctl`` command line: argument parsing and exit codes (``main``), the VM
commands (``vm_commands``), the vring commands (``vring_commands``) and ``demo``.

The top of the import graph: nothing in the package imports ``balloonctl.cli``
(docs/architecture.md).
"""
