"""Sizes, integers and page arithmetic: parse_size, parse_int, format_size, page helpers."""

from __future__ import annotations

import pytest

from balloonctl.errors import UsageError
from balloonctl.units import (
    PAGE_SIZE,
    U64_MAX,
    bytes_to_pages,
    format_size,
    is_page_aligned,
    pages_to_bytes,
    parse_int,
    parse_size,
)


# --- parse_size ---------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["1536M", "1536MiB", "1536MB", "1.5G", "1.5GiB", "1.5g"])
def test_parse_size_spellings_of_one_and_a_half_gib(text: str) -> None:
    assert parse_size(text) == 1610612736


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("0", 0),
        ("1K", 1024),
        ("1k", 1024),
        ("1KiB", 1024),
        ("1kib", 1024),
        ("0.5K", 512),
        (".5K", 512),
        ("2.K", 2048),
        ("1T", 1 << 40),
        ("1B", 1),
        ("  8M  ", 8 << 20),
        ("8 M", 8 << 20),
        ("1.5", 1),  # a fraction of a byte rounds down, as qemu_strtosz does
        ("0.0001K", 0),
        ("1.0009765625K", 1025),  # 1024 + 1: exact decimal arithmetic, no float error
        ("16383.999999T", 16383999999 * (1 << 40) // 1000000),
    ],
)
def test_parse_size_values(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_parse_size_largest_and_just_too_large() -> None:
    assert parse_size(str(U64_MAX)) == U64_MAX
    with pytest.raises(UsageError, match="64 bits"):
        parse_size(str(U64_MAX + 1))
    with pytest.raises(UsageError, match="64 bits"):
        parse_size("16777216T")  # exactly 2**64


@pytest.mark.parametrize(
    "text",
    ["", " ", "abc", "-1G", "-1", "1X", "iB", "1iB", "B", "K", "1.5.5G", "1 G B", "0x10", "1e3"],
)
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="size"):
        parse_size(text)


def test_parse_size_ib_needs_a_unit_prefix() -> None:
    with pytest.raises(UsageError, match="needs K, M, G or T"):
        parse_size("4096iB")


# --- parse_int ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("42", 42),
        (" 42 ", 42),
        ("0x10", 16),
        ("0X1f", 31),
        ("0xFFFF_FFFF", 0xFFFFFFFF),
        ("1_000", 1000),
        ("0xffffffffffffffff", U64_MAX),
        ("007", 7),
    ],
)
def test_parse_int_values(text: str, value: int) -> None:
    assert parse_int(text) == value


@pytest.mark.parametrize("text", ["-1", "-0x10"])
def test_parse_int_rejects_negative(text: str) -> None:
    with pytest.raises(UsageError, match="gpa"):
        parse_int(text, what="gpa")


def test_parse_int_negative_is_named_as_negative() -> None:
    with pytest.raises(UsageError, match="negative"):
        parse_int("-5")


@pytest.mark.parametrize("text", ["", "abc", "0x", "0xg", "1.5", "ten", "10h"])
def test_parse_int_rejects_non_numbers(text: str) -> None:
    with pytest.raises(UsageError, match="not a decimal or 0x-hex number"):
        parse_int(text, what="index")


def test_parse_int_limit() -> None:
    assert parse_int("65535", limit=0xFFFF) == 0xFFFF
    assert parse_int("0xffff", limit=0xFFFF) == 0xFFFF
    with pytest.raises(UsageError, match="larger than 65535"):
        parse_int("65536", what="last-avail", limit=0xFFFF)
    with pytest.raises(UsageError, match="larger than"):
        parse_int(str(U64_MAX + 1))


# --- format_size --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1 KiB"),
        (1536, "1.5 KiB"),
        (4096, "4 KiB"),
        (1 << 20, "1 MiB"),
        (1610612736, "1.5 GiB"),
        (7 << 30, "7 GiB"),
        ((1 << 30) + (1 << 30) // 3, "1.33 GiB"),
        (1 << 40, "1 TiB"),
        (1 << 50, "1024 TiB"),
    ],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


@pytest.mark.parametrize("size", [0, 1, 512, 1024, 1536, 1 << 20, 1610612736, 3 << 40])
def test_format_size_parses_back(size: int) -> None:
    # Exact whenever two decimals hold the value: "1.5 GiB" -> "1.5GiB".
    assert parse_size(format_size(size).replace(" ", "")) == size


# --- page helpers -------------------------------------------------------------------------
def test_page_size_is_the_balloon_page() -> None:
    assert PAGE_SIZE == 4096


@pytest.mark.parametrize(
    ("size", "pages"),
    [(0, 0), (1, 0), (4095, 0), (4096, 1), (8191, 1), (8192, 2), (1 << 30, 262144)],
)
def test_bytes_to_pages_counts_whole_pages(size: int, pages: int) -> None:
    assert bytes_to_pages(size) == pages


@pytest.mark.parametrize("pages", [0, 1, 3, 262144, 1 << 40])
def test_pages_to_bytes_round_trips(pages: int) -> None:
    assert pages_to_bytes(pages) == pages * 4096
    assert bytes_to_pages(pages_to_bytes(pages)) == pages


@pytest.mark.parametrize(
    ("value", "aligned"),
    [(0, True), (4096, True), (1 << 40, True), (1, False), (2048, False), (4097, False)],
)
def test_is_page_aligned(value: int, aligned: bool) -> None:
    assert is_page_aligned(value) is aligned


def test_parse_size_rounds_down_even_with_many_digits() -> None:
    # Regression (helper review): Decimal's 28-digit context rounded this up to 1024.
    # 0.99999999999999999999999999999 KiB is 1023.99... bytes: rounded down, 1023.
    assert parse_size("0.99999999999999999999999999999K") == 1023


def test_non_ascii_digits_are_not_numbers() -> None:
    with pytest.raises(UsageError):
        parse_int("\u0663\u0662")
    with pytest.raises(UsageError):
        parse_size("\u0661G")
