"""What the contrib/ tests need to read Prometheus rules and PromQL without new dependencies.

The rule files are YAML, and the test extras have no YAML parser: :func:`rule_exprs` reads
only the shape these files use (``record:``/``alert:`` then ``expr:``, inline or a ``>-``
block). The tests hold it honest by comparing its count with the number of rules
``promtool check rules`` reports, so a rule it misread cannot pass unnoticed.

:func:`metric_names` finds the metric names a PromQL expression selects, so that each can be
checked against what the daemon's endpoint really serves. It is a tokenizer, not a parser:
promtool parses the same expressions (a syntax error fails there), this only has to tell a
metric name from a label, a function, a keyword or a duration.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

#: Where promtool comes from: Debian's package (``make system-deps`` installs it).
PROMTOOL_PACKAGE: Final = "prometheus"

#: PromQL words that look like names but select nothing.
_KEYWORDS: Final = frozenset(
    {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2", "start", "end"}
)
_STRING: Final = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES: Final = re.compile(r"\{[^}]*\}")
_BRACKETS: Final = re.compile(r"\[[^\]]*\]")
_GROUPING: Final = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE
)
_MODIFIERS: Final = re.compile(r"\b(?:offset\s+-?[0-9a-z]+|@\s*[0-9.]+)", re.IGNORECASE)
_IDENT: Final = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """Metric names the expression selects (``foo`` in ``rate(foo{a="b"}[5m])``).

    Strings, label matchers, ranges, grouping clauses and modifiers are removed first; of
    what is left, an identifier followed by ``(`` is a function or aggregation, a keyword is
    a keyword, and one glued to a digit is a number's exponent or a duration's unit.
    """
    text = _STRING.sub('""', expr)
    text = _BRACES.sub(" ", text)
    text = _BRACKETS.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _MODIFIERS.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        before = text[match.start() - 1] if match.start() else " "
        after = text[match.end() :].lstrip()[:1]
        word = match.group()
        if after == "(" or word.lower() in _KEYWORDS or before.isdigit() or before == ".":
            continue
        names.add(word)
    return names


@dataclass(frozen=True)
class Rule:
    """One rule of a rule file: its name (record or alert), kind and PromQL."""

    name: str
    kind: str  # "record" or "alert"
    expr: str


_KEY: Final = re.compile(r"^(?P<indent>\s*)(?:-\s+)?(?P<key>record|alert|expr):\s*(?P<value>.*)$")


def _scalar(value: str) -> str:
    """An inline YAML scalar's text: the quotes these files may use, undone."""
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == "'":
        return value[1:-1].replace("''", "'")
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return value


def rule_exprs(path: Path) -> list[Rule]:
    """Every rule in a Prometheus rule file, in order (see the module's note on YAML)."""
    lines = path.read_text().splitlines()
    rules: list[Rule] = []
    name = kind = ""
    i = 0
    while i < len(lines):
        match = _KEY.match(lines[i])
        i += 1
        if match is None:
            continue
        key, value = match.group("key"), match.group("value")
        if key in ("record", "alert"):
            kind, name = key, _scalar(value)
            continue
        if value.strip() in (">", ">-", "|", "|-"):
            indent = len(match.group("indent"))
            block = []
            while i < len(lines) and (
                not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
            ):
                block.append(lines[i].strip())
                i += 1
            expr = " ".join(part for part in block if part)
        else:
            expr = _scalar(value)
        assert name, f"{path}: an expr before any record: or alert: (line {i})"
        rules.append(Rule(name, kind, expr))
        name = kind = ""
    return rules


def promtool() -> str:
    """promtool's path; a missing one FAILS the test (it is part of ``make test``)."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            f"promtool not found: install Debian's {PROMTOOL_PACKAGE!r} package "
            f"(apt-get install {PROMTOOL_PACKAGE}; `make system-deps` does it)"
        )
    return path


def run_promtool(*args: str, cwd: Path | None = None) -> str:
    """``promtool ARGS``: its combined output; a non-zero exit fails the test with it."""
    proc = subprocess.run(
        [promtool(), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool {' '.join(args)} exited {proc.returncode}:\n{output}"
    return output


def rules_found(check_output: str) -> int:
    """The count in ``promtool check rules``' "SUCCESS: N rules found" line(s), summed."""
    counts = [int(n) for n in re.findall(r"SUCCESS: (\d+) rules found", check_output)]
    assert counts, f"no 'SUCCESS: N rules found' in:\n{check_output}"
    return sum(counts)
