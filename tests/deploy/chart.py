"""Render, lint and schema-check the Helm chart offline.

Rendering and linting use Helm's own Go library (embedded in the helm-python-sdk wheel), so
templates, values.schema.json and lint rules behave exactly as with the helm CLI. Kubernetes
objects are checked against the API's JSON schemas shipped by kubernetes-validate (strict:
unknown fields are errors); KEDA's and prometheus-operator's custom resources against schemas
kept next to this file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "cacheship"
SCHEMAS = Path(__file__).resolve().parent / "schemas"

RELEASE = "ship"
NAMESPACE = "builds"
# The newest Kubernetes release kubernetes-validate ships schemas for, and the oldest the
# chart supports (Chart.yaml's kubeVersion).
KUBE_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())

# Custom resources the Kubernetes schemas do not know, with the schema each is checked with.
CUSTOM_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda-triggerauthentication.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "prometheus-servicemonitor.json",
}

IRSA_ROLE = "arn:aws:iam::123456789012:role/cacheship-workers"
EXTERNAL_REDIS = "redis.cache.internal:6379"

# Value sets every test of the chart's validity runs with (besides the defaults, {}).
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "keda": {
        "autoscaling": {
            "keda": {
                "enabled": True,
                "redis": {
                    "address": EXTERNAL_REDIS,
                    "passwordSecret": {"name": "redis-auth", "key": "password"},
                },
            }
        }
    },
    "internal-redis": {"redis": {"internal": {"enabled": True}}},
    "irsa": {"s3": {"credentials": {"source": "irsa", "irsaRoleArn": IRSA_ROLE}}},
    "hpa": {"autoscaling": {"hpa": {"enabled": True}}},
    # Everything optional switched on at once.
    "everything": {
        "redis": {"internal": {"enabled": True, "persistence": {"enabled": True}}},
        "autoscaling": {"keda": {"enabled": True, "minReplicaCount": 0}},
        "s3": {
            "endpointUrl": "https://s3.eu-west-1.amazonaws.com",
            "region": "eu-west-1",
            "allowedBuckets": ["ci-cache", "release-cache"],
            "readableBuckets": ["golden-cache"],
            "allowedEndpoints": ["https://backup.example.com", "http://minio.storage:9000"],
            "credentials": {"source": "irsa", "irsaRoleArn": IRSA_ROLE},
        },
        "sources": {"roots": ["/srv/caches"], "sharedVolume": {"enabled": True}},
        "registries": {
            "allowed": ["ghcr.io/acme/*", "registry.internal:5000"],
            "dockerConfig": {"existingSecret": "registry-credentials"},
        },
        "networkPolicy": {"enabled": True, "s3Ports": [443, 9000]},
        "flower": {
            "ingress": {
                "enabled": True,
                "className": "nginx",
                "tls": [{"hosts": ["flower.example.com"], "secretName": "flower-tls"}],
            }
        },
        "prune": {
            "enabled": True,
            "cache": "type=s3,bucket=ci-cache,prefix=team/",
            "expireNames": "720h",
            "keepNames": ["main", "release/*"],
        },
        "metrics": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
            "dashboard": {"enabled": True},
        },
        "commonLabels": {"team": "build"},
        "commonAnnotations": {"owner": "platform"},
    },
}


@dataclass
class Rendered:
    """The objects one `helm install` would create, and its NOTES.txt."""

    objects: list[dict[str, Any]]
    notes: str
    sources: dict[str, str] = field(default_factory=dict)  # template path -> manifest

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def find(self, kind: str, component: str | None = None) -> list[dict[str, Any]]:
        """Objects of a kind, optionally only one component's (its app.kubernetes.io/component)."""
        found = self.of_kind(kind)
        if component is not None:
            found = [o for o in found if labels(o).get("app.kubernetes.io/component") == component]
        return found

    def one(self, kind: str, component: str | None = None) -> dict[str, Any]:
        found = self.find(kind, component)
        assert len(found) == 1, f"expected one {kind} ({component}), found {len(found)}"
        return found[0]

    def named(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} named {name}, found {len(found)}"
        return found[0]


def labels(obj: dict[str, Any]) -> dict[str, str]:
    result: dict[str, str] = obj.get("metadata", {}).get("labels") or {}
    return result


def render(values: dict[str, Any] | None = None, *, upgrade: bool = False) -> Rendered:
    """Render the chart as an install (or upgrade) of RELEASE into NAMESPACE would."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(
            values or {},
            name=RELEASE,
            namespace=NAMESPACE,
            is_install=not upgrade,
            is_upgrade=upgrade,
        )
    objects: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        for document in yaml.safe_load_all(text):
            if document:
                objects.append(document)
    return Rendered(objects=objects, notes=notes, sources=manifests)


def lint(values: dict[str, Any] | None = None) -> dict[str, Any]:
    """Helm's lint of the chart (strict: warnings count), for the newest supported Kubernetes."""
    report: dict[str, Any] = helm.lint(
        CHART, values or {}, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSIONS[-1]}"
    )
    return report


@cache
def _custom_validator(schema_file: str) -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / schema_file).read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator: jsonschema.protocols.Validator = validator_class(schema)
    return validator


def validate(obj: dict[str, Any], kube_version: str = KUBE_VERSIONS[-1]) -> None:
    """Raise if the object does not match its API schema (Kubernetes' own or KEDA's)."""
    custom = CUSTOM_SCHEMAS.get((obj.get("apiVersion", ""), obj.get("kind", "")))
    if custom is not None:
        _custom_validator(custom).validate(obj)
        return
    # Raises SchemaNotFoundError for kinds Kubernetes does not have: any such kind needs a
    # schema in CUSTOM_SCHEMAS rather than going unchecked.
    kubernetes_validate.validate(obj, kube_version, strict=True)
