"""The chart renders, lints clean and produces valid objects, whatever the value set."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest

from tasks.settings import Settings
from tests.deploy.chart import (
    CHART,
    CUSTOM_SCHEMAS,
    KUBE_VERSIONS,
    VALUE_SETS,
    Rendered,
    labels,
    lint,
    render,
    validate,
)

VALUE_SET_NAMES = sorted(VALUE_SETS)
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@pytest.fixture(scope="module", params=VALUE_SET_NAMES)
def rendered(request: pytest.FixtureRequest) -> tuple[str, Rendered]:
    return request.param, render(VALUE_SETS[request.param])


@pytest.mark.parametrize("name", VALUE_SET_NAMES)
def test_helm_lint_is_clean(name: str) -> None:
    report = lint(VALUE_SETS[name])
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    # Severity 2 is a warning, 3 an error; 1 (info, e.g. "icon is recommended") is fine.
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == []


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_object_matches_its_api_schema(
    rendered: tuple[str, Rendered], kube_version: str
) -> None:
    _, result = rendered
    assert result.objects
    for obj in result.objects:
        validate(obj, kube_version)


def test_every_object_is_labelled_and_named_for_kubernetes(rendered: tuple[str, Rendered]) -> None:
    _, result = rendered
    seen = set()
    for obj in result.objects:
        name = obj["metadata"]["name"]
        assert DNS_LABEL.match(name) and len(name) <= 63, name
        assert (obj["kind"], name) not in seen, f"duplicate {obj['kind']} {name}"
        seen.add((obj["kind"], name))
        assert labels(obj)["app.kubernetes.io/instance"] == "ship"
        assert labels(obj)["app.kubernetes.io/managed-by"] == "Helm"
        assert "namespace" not in obj["metadata"]  # helm install -n decides


def test_selectors_match_their_pods(rendered: tuple[str, Rendered]) -> None:
    """Every Deployment, Service and PDB selects the pods it means, and only those."""
    _, result = rendered
    pods = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for d in result.of_kind("Deployment")
    }
    for deployment in result.of_kind("Deployment"):
        selector = deployment["spec"]["selector"]["matchLabels"]
        matching = [n for n, lbl in pods.items() if selector.items() <= lbl.items()]
        assert matching == [deployment["metadata"]["name"]]
    for selecting in result.of_kind("Service") + result.of_kind("PodDisruptionBudget"):
        spec = selecting["spec"]
        selector = spec["selector"].get("matchLabels", spec["selector"])
        assert any(selector.items() <= lbl.items() for lbl in pods.values()), selecting


def test_service_ports_lead_to_container_ports(rendered: tuple[str, Rendered]) -> None:
    _, result = rendered
    for service in result.of_kind("Service"):
        selector = service["spec"]["selector"]
        (deployment,) = [
            d
            for d in result.of_kind("Deployment")
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        ports = [
            p
            for c in deployment["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", [])
        ]
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            key = "name" if isinstance(target, str) else "containerPort"
            assert any(p.get(key) == target for p in ports), (service["metadata"]["name"], target)


def test_disruption_budgets_set_one_limit(rendered: tuple[str, Rendered]) -> None:
    """The API refuses a PodDisruptionBudget with both minAvailable and maxUnavailable."""
    _, result = rendered
    for pdb in result.of_kind("PodDisruptionBudget"):
        assert len({"minAvailable", "maxUnavailable"} & set(pdb["spec"])) == 1


def test_secret_references_resolve(rendered: tuple[str, Rendered]) -> None:
    """A secret the chart creates has every key a pod reads from it."""
    _, result = rendered
    created = {
        s["metadata"]["name"]: set(s.get("stringData", {})) | set(s.get("data", {}))
        for s in result.of_kind("Secret")
    }
    for deployment in result.of_kind("Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["name"] in created:
                    assert ref["key"] in created[ref["name"]], (ref, created)


def test_notes_render(rendered: tuple[str, Rendered]) -> None:
    _, result = rendered
    assert "ship" in result.notes
    assert "<no value>" not in result.notes


# The checks above must be able to fail: they do on broken objects.


def test_kubernetes_schema_rejects_an_unknown_field() -> None:
    deployment = copy.deepcopy(render().one("Deployment", "worker"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)


def test_kubernetes_schema_rejects_a_wrong_type() -> None:
    deployment = copy.deepcopy(render().one("Deployment", "worker"))
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "6h"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)


def test_kinds_without_a_schema_are_not_waved_through() -> None:
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validate({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})


def _trigger_metadata(scaled: dict[str, Any]) -> dict[str, Any]:
    metadata: dict[str, Any] = scaled["spec"]["triggers"][0]["metadata"]
    return metadata


KEDA_MISTAKES: dict[str, Callable[[dict[str, Any]], object]] = {
    # KEDA reads trigger metadata as strings only.
    "numeric listLength": lambda so: _trigger_metadata(so).update(listLength=4),
    "URL instead of host:port": lambda so: _trigger_metadata(so).update(address="redis://r:6379"),
    "no list name": lambda so: _trigger_metadata(so).pop("listName"),
    "no target": lambda so: so["spec"]["scaleTargetRef"].pop("name"),
    "an HPA field": lambda so: so["spec"].update(minReplicas=1),
}


@pytest.mark.parametrize("mistake", sorted(KEDA_MISTAKES))
def test_keda_schema_rejects_mistakes(mistake: str) -> None:
    scaled = copy.deepcopy(render(VALUE_SETS["keda"]).one("ScaledObject"))
    validate(scaled)
    KEDA_MISTAKES[mistake](scaled)
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)


def test_custom_schemas_cover_the_custom_kinds_rendered() -> None:
    kinds = {(o["apiVersion"], o["kind"]) for o in render(VALUE_SETS["everything"]).objects}
    custom = {k for k in kinds if k[0].startswith(("keda.sh/", "monitoring.coreos.com/"))}
    assert custom == set(CUSTOM_SCHEMAS)


SERVICE_MONITOR_MISTAKES: dict[str, Callable[[dict[str, Any]], object]] = {
    "no selector": lambda sm: sm["spec"].pop("selector"),
    "interval without a unit": lambda sm: sm["spec"]["endpoints"][0].update(interval="30"),
    "port and targetPort": lambda sm: sm["spec"]["endpoints"][0].update(targetPort=9808),
    "a misspelt field": lambda sm: sm["spec"]["endpoints"][0].update(scrapeTimout="10s"),
    "a numeric port name": lambda sm: sm["spec"]["endpoints"][0].update(port=9808),
}


@pytest.mark.parametrize("mistake", sorted(SERVICE_MONITOR_MISTAKES))
def test_service_monitor_schema_rejects_mistakes(mistake: str) -> None:
    monitor = copy.deepcopy(render(VALUE_SETS["everything"]).one("ServiceMonitor"))
    validate(monitor)
    SERVICE_MONITOR_MISTAKES[mistake](monitor)
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor)


def test_values_schema_refuses_what_the_worker_settings_refuse() -> None:
    """No value the chart accepts may stop the workers from starting."""
    with helm.Chart.load(CHART) as chart:
        schema = chart.schema
        defaults = chart.values
    assert schema is not None
    worker = schema["properties"]["worker"]["properties"]
    pairs = {
        "taskTimeLimit": "task_time_limit",
        "taskSoftTimeLimit": "task_soft_time_limit",
        "visibilityTimeout": "visibility_timeout",
    }
    for value, field_name in pairs.items():
        field = Settings.model_fields[field_name]
        minimum = next(m.ge for m in field.metadata if hasattr(m, "ge"))
        assert worker[value]["minimum"] >= minimum, value
        assert defaults["worker"][value] == field.default, value
    assert defaults["worker"]["queue"] == Settings.model_fields["queue"].default


@pytest.mark.parametrize(
    "values",
    [
        {"worker": {"concurrency": 0}},
        {"worker": {"taskTimeLimit": "6h"}},
        {"s3": {"credentials": {"source": "vault"}}},
        {"s3": {"credentials": {"source": "irsa", "irsaRoleArn": "cacheship-role"}}},
        {"autoscaling": {"keda": {"redis": {"address": "redis://redis:6379"}}}},
        {"flower": {"auth": {"username": "a:b"}}},
        {"worker": {"heartbeat": {"dir": "relative/dir"}}},
        {"wokrer": {}},  # a misspelt section
        {"metrics": {"port": 0}},
        {"metrics": {"serviceMonitor": {"interval": "30"}}},
        {"metrics": {"serviceMonitor": {"enable": True}}},
    ],
    ids=lambda v: repr(v),
)
def test_values_schema_rejects_bad_values(values: dict[str, Any]) -> None:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema({})  # the defaults pass
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(values)
    with pytest.raises(helm.HelmError):
        render(values)
