"""Every fuzzer finding, pinned: the input stays in fixtures/corpus/<target>/regression-*,
and a named test here says what was wrong and checks the fix directly."""

from __future__ import annotations

from pathlib import Path

import pytest

from balloonctl.backends.address import parse_address
from balloonctl.backends.libvirt import normalize_stats, stats_period_of
from balloonctl.daemon.config import load as load_config
from balloonctl.errors import ConfigError, PeerError, UsageError
from balloonctl.units import parse_size
from fuzz.harness import TARGETS

_XML = "<domain><devices><memballoon><stats period='{period}'/></memballoon></devices></domain>"
CORPUS = Path(__file__).resolve().parents[2] / "fixtures" / "corpus"


def _replay(target: str, name: str) -> None:
    TARGETS[target]((CORPUS / target / name).read_bytes())


def test_stats_period_unicode_digit() -> None:
    # str.isdigit() accepted "²"; int() then raised ValueError out of stats_period_of.
    _replay("libvirt_stats", "regression-period-unicode-digit")
    xml = _XML.format(period="\u00b2")
    with pytest.raises(PeerError):
        stats_period_of(xml)


def test_stats_period_long_digits() -> None:
    # 5000 ASCII digits: int() refuses more than 4300 with ValueError.
    _replay("libvirt_stats", "regression-period-long-digits")
    xml = _XML.format(period="9" * 5000)
    with pytest.raises(PeerError):
        stats_period_of(xml)


def test_normalize_stats_last_update_bool() -> None:
    # {"last_update": true} came out as GuestStats(last_update=True): bool is an int.
    _replay("libvirt_stats", "regression-last-update-bool")
    with pytest.raises(PeerError):
        normalize_stats({"last_update": True})


def test_parse_size_long_digits() -> None:
    # Fraction("9" * 5000) raised ValueError (int's 4300-digit limit) out of parse_size,
    # hence out of config.load and the CLI's SIZE arguments.
    _replay("config", "regression-size-long-digits")
    with pytest.raises(UsageError):
        parse_size("9" * 5000)
    assert parse_size("1.5G") == 3 << 29


def test_qmp_port_unicode_digit() -> None:
    # "tcp:host:²": str.isdigit() accepted it, int() raised ValueError out of parse_address.
    _replay("config", "regression-port-unicode-digit")
    with pytest.raises(UsageError):
        parse_address("tcp:host:\u00b2")
    with pytest.raises(UsageError):
        parse_address("tcp:host:" + "1" * 5000)
    assert parse_address("tcp:[::1]:4444").port == 4444


def test_config_toml_integer_long_digits(tmp_path: Path) -> None:
    # `qmp=999...` (4300+ digits) in a config file: tomllib raised a plain ValueError (int's
    # digit limit), not TOMLDecodeError, out of config.load and so out of the CLI and daemon.
    _replay("config", "regression-toml-int-long-digits")
    path = tmp_path / "config.toml"
    path.write_text("[[vm]]\nqmp=" + "9" * 4390 + "\n")
    with pytest.raises(ConfigError, match="not valid TOML: a number too long to read"):
        load_config(str(path))
