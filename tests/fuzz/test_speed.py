"""What issue 17's speed-up of the harnesses must not cost: exact decoding, a total reset of
the memory reused between inputs, the oracle's strength, and instrumentation of the code under
test only. No timing is asserted here (``python -m fuzz bench`` measures)."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from balloonctl.virtio import memory as memory_module
from balloonctl.virtio import spec
from fuzz import harness, scope
from fuzz.harness import TARGETS, ByteReader, OracleViolation

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "fixtures" / "corpus"
#: The targets whose guest memory lives for the whole process.
REUSING = ("vring_ops", "balloon_requests", "driver_device_roundtrip")


class _Reference:
    """ByteReader's decoding as it was written first: slices and int.from_bytes only."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def uint(self, n: int) -> int:
        chunk = self.data[self.pos : self.pos + max(0, n)]
        self.pos += len(chunk)
        return int.from_bytes(chunk, "little")

    def below(self, n: int) -> int:
        return 0 if n <= 1 else self.uint((n.bit_length() + 7) // 8) % n


def test_byte_reader_decodes_as_the_reference() -> None:
    """The fast paths read exactly what the slicing reader read: every committed corpus file
    must keep decoding to the same input, however the reader is written."""
    rng = random.Random(17)
    for _ in range(300):
        data = rng.randbytes(rng.randrange(0, 40))
        fast, ref = ByteReader(data), _Reference(data)
        for _ in range(30):
            kind = rng.randrange(6)
            if kind < 4:
                width = (1, 2, 4, 8)[kind]
                got = (fast.u8, fast.u16, fast.u32, fast.u64)[kind]()
                assert got == ref.uint(width)
            elif kind == 4:
                n = rng.choice((0, 1, 2, 3, 255, 256, 257, 0xFFFF, 0x10000, 1 << 40))
                assert fast.below(n) == ref.below(n), n
            else:
                n = rng.randrange(-2, 9)
                assert fast.take(n) == ref.data[ref.pos : ref.pos + max(0, n)]
                ref.pos += len(fast.take(0)) + len(ref.data[ref.pos : ref.pos + max(0, n)])
            assert fast.remaining == len(data) - ref.pos


@pytest.mark.parametrize("target", REUSING)
def test_reset_leaves_no_byte_behind(target: str) -> None:
    """After every corpus input, the reset gives back memory that is zero throughout, as a
    fresh one is: nothing an input wrote can reach the next (the dirty spans cover every
    write, and a discard only ever leaves zeroes)."""
    for path in sorted((CORPUS / target).iterdir()):
        TARGETS[target](path.read_bytes())
        memories = harness.reset_memories()
        assert memories
        for mem in memories:
            assert isinstance(mem, harness._ReusedMemory)
            assert mem.is_zero(), f"{path.name} left bytes behind in {mem.regions}"


def test_reset_after_an_escape_is_total() -> None:
    """A finding escapes mid-input with the device phase on: the next input starts clean."""
    mem = harness._memory(harness._SpyMemory, harness._RING_LAYOUT)
    mem.write(0x10, b"\xff" * 32)
    mem.poke(0xC000, b"\xff")
    mem.device_phase, mem.allowed = True, (1, 2)
    again = harness._memory(harness._SpyMemory, harness._RING_LAYOUT)
    assert again is mem and mem.is_zero()
    assert (mem.device_phase, mem.allowed) == (False, (0, 0))


def test_oracle_bounds_are_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """A parser whose bounds check says yes to everything (GuestMemory.contains broken) is
    caught by vring_ops: the reference walk checks bounds with the harness's own ``holds``,
    not memory.py's, so the two cannot agree on the same bug."""
    monkeypatch.setattr(memory_module.GuestMemory, "contains", lambda self, addr, n: True)
    caught = []
    for path in sorted((CORPUS / "vring_ops").glob("hostile-BufferOutOfBounds-*")):
        with pytest.raises(Exception) as info:  # any escape is the finding
            TARGETS["vring_ops"](path.read_bytes())
        caught.append(info.value)
    assert caught and all(isinstance(exc, OracleViolation) for exc in caught), caught


def test_a_removed_parser_check_is_caught(tmp_path: Path) -> None:
    """The mutation check: a copy of balloonctl whose queue.py no longer refuses zero-length
    buffers (2.7.4: a descriptor's len must be > 0) makes the vring_ops corpus fail with the
    reference walk's verdict, through fuzz/replay.py as ``python -m fuzz reproduce`` runs it."""
    package = Path(memory_module.__file__).resolve().parents[1]
    copy = tmp_path / "balloonctl"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    queue = copy / "virtio" / "queue.py"
    text = queue.read_text()
    check = "if length == 0 or not mem.contains(addr, length):"
    assert text.count(check) == 1, "queue.py's buffer check moved: update the mutation"
    queue.write_text(text.replace(check, "if not mem.contains(addr, length):"))
    # replay.py imports the package beside its own fuzz/: copy the harnesses next to it.
    (tmp_path / "fuzz").mkdir()
    for source in (ROOT / "fuzz").glob("*.py"):
        shutil.copy(source, tmp_path / "fuzz" / source.name)
    proc = subprocess.run(
        [
            sys.executable,
            str(tmp_path / "fuzz" / "replay.py"),
            "vring_ops",
            str(CORPUS / "vring_ops"),
        ],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1, proc
    assert proc.stdout.startswith("FINDING vring_ops "), proc.stdout
    assert "OracleViolation" in proc.stdout and "ZeroLengthBuffer" in proc.stdout, proc.stdout


def test_every_target_has_an_instrumentation_scope() -> None:
    assert set(scope.INSTRUMENTED) == set(TARGETS)
    modules = set(scope.package_modules())
    for target, names in scope.INSTRUMENTED.items():
        assert names, target
        assert set(names) <= modules, (target, set(names) - modules)
        assert not set(names) & set(scope.excluded(target))
        assert set(names) | set(scope.excluded(target)) == modules


_WHICH = """
import sys, types
import atheris
from fuzz.scope import excluded
with atheris.instrument_imports(include=["balloonctl"], exclude=excluded(sys.argv[1])):
    from fuzz import harness

def functions(mod):
    for value in vars(mod).values():
        if getattr(value, "__module__", None) != mod.__name__:
            continue
        if isinstance(value, types.FunctionType):
            yield value
        elif isinstance(value, type):
            yield from (f for f in vars(value).values() if isinstance(f, types.FunctionType))

print(" ".join(sorted(
    name for name, mod in sys.modules.items()
    if name.startswith("balloonctl") and mod is not None
    and any("_trace_branch" in f.__code__.co_names for f in functions(mod))
)))
"""


@pytest.mark.parametrize("target", ["vring_ops", "driver_device_roundtrip"])
def test_entry_point_instruments_the_code_under_test_only(target: str) -> None:
    """The entry points' import instruments exactly fuzz/scope.py's modules of balloonctl
    (atheris' include= alone would take the whole package)."""
    pytest.importorskip("atheris")
    proc = subprocess.run(
        [sys.executable, "-c", _WHICH, target],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert set(proc.stdout.split()) == set(scope.INSTRUMENTED[target])


def test_chain_run_writes_what_the_loop_wrote() -> None:
    """vring_ops' op 10 writes its run as one array: byte for byte what the loop of
    DESC_STRUCT.pack_into over the table wrote, wrap-around included."""
    rng = random.Random(10)
    for n in (1, 2, 8, 256):
        for _ in range(20):
            mem = harness._memory(harness._SpyMemory, harness._RING_LAYOUT)
            start, count = rng.randrange(n), 1 + rng.randrange(n)
            desc = (rng.getrandbits(64), rng.getrandbits(32), rng.getrandbits(8))
            expect = bytearray(spec.desc_table_size(n))
            for k in range(count):
                i = (start + k) % n
                more = spec.VIRTQ_DESC_F_NEXT if k < count - 1 else 0
                spec.DESC_STRUCT.pack_into(
                    expect, 16 * i, desc[0], desc[1], desc[2] | more, (i + 1) % n
                )
            harness._chain_run(mem, 0x100, n, start, count, desc)
            assert mem.peek(0x100, len(expect)) == bytes(expect), (n, start, count)
