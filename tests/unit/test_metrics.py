"""The metrics the task code records, and the dashboard that reads them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from tasks import metrics
from tasks.settings import Settings
from worker.metrics import QueueCollector, prepare, queue_lists

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "helm" / "cacheship" / "dashboards" / "cacheship.json"
DOCS = REPO / "docs" / "metrics.md"

# PromQL words that are not metric names: functions and aggregations are followed by "(",
# so only the operators and modifiers need naming here.
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
KEYWORDS |= {"group_left", "group_right", "inf", "nan"}


def metric_names_in(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (Grafana's $variables allowed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings: label values
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    # Label lists of by/without/on/ignoring/group_*.
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in KEYWORDS:
            continue
        names.add(word)
    return names


def exposed_names() -> set[str]:
    """Every sample name a worker's /metrics can hold, read from the registries themselves."""
    names = set()
    for family in metrics.REGISTRY.collect():
        names |= {s.name for s in family.samples}
    for family in QueueCollector("redis://unused", "cacheship").describe():
        assert family.type == "gauge"
        names.add(family.name)
    return names


def family_names() -> set[str]:
    families = list(metrics.REGISTRY.collect())
    families += list(QueueCollector("redis://unused", "cacheship").describe())
    return {f.name for f in families}


def dashboard_queries() -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target (rows' nested panels too) and query variable."""
    board = json.loads(DASHBOARD.read_text())

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(board["panels"]):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            query = query["query"] if isinstance(query, dict) else query
            inner = re.fullmatch(r"label_values\((.*?)(,\s*\w+)?\)", query)
            assert inner, f"variable {variable['name']}: unexpected query {query}"
            yield f"variable {variable['name']}", inner.group(1)


# The dashboard -----------------------------------------------------------------------------


def test_dashboard_reads_only_metrics_the_workers_expose() -> None:
    exposed = exposed_names()
    queries = list(dashboard_queries())
    assert queries
    for where, expr in queries:
        used = metric_names_in(expr)
        assert used, f"{where}: no metric found in {expr}"
        assert used <= exposed, f"{where}: unknown {sorted(used - exposed)} in {expr}"


def test_dashboard_shows_every_metric() -> None:
    used = set().union(*(metric_names_in(e) for _, e in dashboard_queries()))
    shown = {f for f in family_names() if any(u == f or u.startswith(f + "_") for u in used)}
    assert shown == family_names()


def test_dashboard_panels_are_well_formed() -> None:
    board = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    names = {v["name"] for v in board["templating"]["list"]}
    assert "datasource" in names
    for panel in board["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
            variables = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval"}
            assert variables <= names, panel["title"]


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ('sum by (le) (rate(a_bucket{job=~"$job",x="y"}[5m]))', {"a_bucket"}),
        ("a_total / on (instance) group_left (pod) b", {"a_total", "b"}),
        ("histogram_quantile(0.95, x_bucket) > bool 0.5", {"x_bucket"}),
        ("max(q) unless count without (queue) (r offset 1h)", {"q", "r"}),
        ('rate(not_a_metric_total{a="{b}"}[$__rate_interval])', {"not_a_metric_total"}),
    ],
)
def test_promql_names_are_found(expr: str, expected: set[str]) -> None:
    assert metric_names_in(expr) == expected


def test_an_unknown_metric_is_caught() -> None:
    used = metric_names_in('sum(rate(cacheship_layers_uploaded_total{job=~"$job"}[5m]))')
    assert used and not used <= exposed_names()


def test_every_metric_is_documented() -> None:
    docs = DOCS.read_text()
    for name in family_names():
        assert f"`{name}" in docs, name


# What the task code records ----------------------------------------------------------------


def sample(name: str, **labels: str) -> float:
    found = metrics.REGISTRY.get_sample_value(name, labels)
    assert found is not None, name
    return found


def test_every_series_exists_before_anything_happened() -> None:
    for outcome in metrics.OUTCOMES:
        sample("cacheship_exports_total", outcome=outcome)
        sample("cacheship_export_duration_seconds_count", outcome=outcome)
    for action in metrics.ACTIONS:
        sample("cacheship_layers_total", action=action)
        sample("cacheship_layer_duration_seconds_count", action=action)


def test_a_layer_splits_its_size_into_sent_and_not_sent() -> None:
    uploaded = sample("cacheship_layer_uploaded_bytes_total")
    skipped = sample("cacheship_layer_skipped_bytes_total")
    touched = sample("cacheship_layers_total", action="touched")
    timed = sample("cacheship_layer_duration_seconds_sum", action="touched")
    metrics.layer_finished("uploaded", 700, 1000, 0.5)  # 300 bytes resumed from a past try
    metrics.layer_finished("touched", 0, 5000, 2.0)
    assert sample("cacheship_layer_uploaded_bytes_total") - uploaded == 700
    assert sample("cacheship_layer_skipped_bytes_total") - skipped == 5300
    assert sample("cacheship_layers_total", action="touched") - touched == 1
    assert sample("cacheship_layer_duration_seconds_sum", action="touched") - timed == 2.0


def test_an_export_counts_by_outcome_and_times_when_it_can() -> None:
    failures = sample("cacheship_exports_total", outcome="failure")
    timed = sample("cacheship_export_duration_seconds_count", outcome="failure")
    metrics.export_finished("failure")
    metrics.export_finished("failure", 12.0)
    assert sample("cacheship_exports_total", outcome="failure") - failures == 2
    assert sample("cacheship_export_duration_seconds_count", outcome="failure") - timed == 1


def test_unknown_labels_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="outcome: 'done'"):
        metrics.export_finished("done")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="action: 'copied'"):
        metrics.layer_finished("copied", 1, 1, 1.0)


def test_a_layer_leaves_the_in_flight_count_even_when_it_fails() -> None:
    before = sample("cacheship_layers_in_flight")
    with pytest.raises(RuntimeError), metrics.layer_in_flight():
        assert sample("cacheship_layers_in_flight") == before + 1
        raise RuntimeError("copy failed")
    assert sample("cacheship_layers_in_flight") == before


def test_retries_count_by_short_task_name() -> None:
    before = sample("cacheship_task_retries_total", task="copy_layer")
    metrics.task_retried("cacheship.copy_layer")
    assert sample("cacheship_task_retries_total", task="copy_layer") - before == 1


# The worker side ----------------------------------------------------------------------------


def test_metrics_are_off_without_a_port() -> None:
    assert prepare(Settings(metrics_port=None)) is None


def test_a_port_out_of_range_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="metrics_port"):
        Settings(metrics_port=70000)


def test_queue_depth_reads_every_priority_list() -> None:
    names = queue_lists("cacheship")
    assert names[0] == "cacheship"
    assert len(names) == len(set(names)) > 1
    assert all(n.startswith("cacheship") for n in names)


def test_an_unreachable_redis_is_reported_not_raised() -> None:
    collector = QueueCollector("redis://127.0.0.1:1/0", "cacheship")
    registry = CollectorRegistry()
    registry.register(collector)
    assert registry.get_sample_value("cacheship_broker_up") == 0
    assert registry.get_sample_value("cacheship_queue_messages", {"queue": "cacheship"}) is None
