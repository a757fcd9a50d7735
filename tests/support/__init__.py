"""What the tests share, written once: the CLI as a process, a raw QMP client, the simulated
VMs and their fixtures, the private libvirtd's fixtures, the daemon's fake host and configs.

Plain modules, imported by test modules like any library. A conftest.py is never imported:
the fixtures here reach every folder through ``pytest_plugins`` in tests/conftest.py.
"""
