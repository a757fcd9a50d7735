"""contrib/grafana/: the dashboard, checked without a Grafana (Debian packages none, and
PyPI has only API clients, no server): its JSON follows Grafana's dashboard model where a
mistake would break loading or leave a panel empty (a datasource variable every panel and
target uses, unique panel ids and refIds, panels on the 24-column grid without overlaps,
every ``$variable`` defined), every query parses as PromQL in the real promtool (each one
wrapped as a recording rule), and every metric it names is one the daemon really serves.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest

from tests.contrib.conftest import Scrape
from tests.contrib.promql import metric_names, rules_found, run_promtool

DASHBOARD: Final = (
    Path(__file__).resolve().parents[2] / "contrib" / "grafana" / "balloonctl-autoballoon.json"
)
DATASOURCE: Final = {"type": "prometheus", "uid": "${datasource}"}
#: Grafana's own variables, as it fills them in before a query reaches Prometheus.
BUILTIN_VARIABLES: Final = {
    "__rate_interval": "1m",
    "__interval": "30s",
    "__range": "6h",
}
_VARIABLE: Final = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    """The dashboard's JSON."""
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target."""
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            yield f"panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"]


def _variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {var["name"]: var for var in dashboard["templating"]["list"]}


def _variable_selectors(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every query variable: ``label_values(SELECTOR, label)`` is
    Grafana's, its selector is PromQL."""
    for var in _variables(dashboard).values():
        if var["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", var["definition"])
            assert match, var["definition"]
            assert var["query"]["query"] == var["definition"], var["name"]
            yield f"variable {var['name']}", match.group(1)


def _as_prometheus_sees_it(expr: str) -> str:
    """The query with Grafana's variables filled in: built-ins by a duration, the
    dashboard's own (used only inside label matchers' strings) by a regex matching all."""

    def fill(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return BUILTIN_VARIABLES.get(name, ".*")

    return _VARIABLE.sub(fill, expr)


def test_dashboard_model(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] and dashboard["title"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = _variables(dashboard)
    source = variables["datasource"]
    assert source["type"] == "datasource" and source["query"] == "prometheus"
    for name, var in variables.items():
        if var["type"] == "query":
            assert var["datasource"] == DATASOURCE, name
    ids = [panel["id"] for panel in _panels(dashboard)]
    assert len(ids) == len(set(ids)), ids


def test_every_panel_queries_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    queried = 0
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        targets = panel["targets"]
        assert targets, panel["title"]
        refs = [target["refId"] for target in targets]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in targets:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert target["expr"].strip(), panel["title"]
            queried += 1
    assert queried >= 15


def test_panels_tile_the_grid(dashboard: dict[str, Any]) -> None:
    """Grafana lays panels on 24 columns; two on the same cells would be drawn over each
    other (it moves one, which is not the layout meant)."""
    taken: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["w"] > 0 and pos["h"] > 0 and pos["x"] >= 0 and pos["x"] + pos["w"] <= 24
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"{panel['title']!r} over {taken[(x, y)]!r}"
                taken[(x, y)] = panel["title"]


def test_every_variable_used_is_defined(dashboard: dict[str, Any]) -> None:
    defined = set(_variables(dashboard)) | set(BUILTIN_VARIABLES)
    texts = [expr for _, expr in _queries(dashboard)]
    texts += [panel["title"] for panel in _panels(dashboard)]
    texts += [panel.get("repeat", "") and f"${panel['repeat']}" for panel in _panels(dashboard)]
    texts += [var["definition"] for var in _variables(dashboard).values() if "definition" in var]
    used = {m.group(1) or m.group(2) for text in texts for m in _VARIABLE.finditer(text)}
    assert used - defined == set()
    assert "vm" in used  # the per-VM panel repeats over it


def test_every_query_parses_in_promtool(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """promtool parses each query as a recording rule's expression: a typo in the PromQL
    (a missing parenthesis, a wrong function) fails here, as Grafana's panel would."""
    queries = [*_queries(dashboard), *_variable_selectors(dashboard)]
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, (where, expr) in enumerate(queries):
        filled = _as_prometheus_sees_it(expr)
        assert "$" not in filled, where
        lines += [f"      - record: dashboard:query_{i}", f"        expr: {json.dumps(filled)}"]
    rules = tmp_path / "dashboard.rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    assert rules_found(run_promtool("check", "rules", str(rules))) == len(queries)


def test_dashboard_metric_names_are_served_by_the_daemon(
    dashboard: dict[str, Any], scrape: Scrape
) -> None:
    used: set[str] = set()
    for where, expr in [*_queries(dashboard), *_variable_selectors(dashboard)]:
        names = metric_names(_as_prometheus_sees_it(expr))
        assert names, f"{where}: no metric in {expr!r}"
        assert names <= scrape.samples, f"{where}: {names - scrape.samples} not served"
        used |= names
    # What the issue asks the dashboard to show.
    for name in (
        "balloonctl_host_available_bytes",
        "balloonctl_vm_actual_bytes",
        "balloonctl_vm_target_bytes",
        "balloonctl_vm_floor_bytes",
        "balloonctl_host_mode",
        "balloonctl_vm_held",
        "balloonctl_tick_seconds_bucket",
        "balloonctl_vm_oom_kills_total",
        "balloonctl_vm_alloc_stalls_total",
    ):
        assert name in used, name
