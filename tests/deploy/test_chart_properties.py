"""What the chart's objects do: security, health, wiring, shutdown and scaling."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest

from tasks.settings import Settings
from tests.deploy.chart import CHART, EXTERNAL_REDIS, IRSA_ROLE, VALUE_SETS, Rendered, render
from tests.deploy.chart import labels as labels_of

DEFAULT_TIME_LIMIT = Settings.model_fields["task_time_limit"].default
DASHBOARD = CHART / "dashboards" / "cacheship.json"


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def container(deployment: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    containers = pod_spec(deployment)["containers"]
    if name is None:
        assert len(containers) == 1
        return dict(containers[0])
    return dict(next(c for c in containers if c["name"] == name))


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    """Container env by name: a literal value, or the valueFrom mapping."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def secret_ref(c: dict[str, Any], name: str) -> tuple[str, str]:
    ref = env_of(c)[name]["secretKeyRef"]
    return ref["name"], ref["key"]


def mounts(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in c.get("volumeMounts", [])}


def volumes(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod_spec(deployment).get("volumes", [])}


@pytest.fixture(scope="module")
def defaults() -> Rendered:
    return render()


@pytest.fixture(scope="module")
def worker(defaults: Rendered) -> dict[str, Any]:
    return defaults.one("Deployment", "worker")


# Security --------------------------------------------------------------------------------


@pytest.mark.parametrize("value_set", ["defaults", "everything"])
def test_every_pod_runs_non_root_with_a_read_only_root(value_set: str) -> None:
    for deployment in render(VALUE_SETS[value_set]).of_kind("Deployment"):
        pod = pod_spec(deployment)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            ctx = c["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True
            assert ctx["allowPrivilegeEscalation"] is False
            assert ctx["capabilities"]["drop"] == ["ALL"]
            assert "privileged" not in ctx
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]


def test_worker_writes_only_to_its_empty_dirs(worker: dict[str, Any]) -> None:
    c = container(worker)
    vols = volumes(worker)
    tmp = mounts(c)["/tmp"]
    assert "emptyDir" in vols[tmp["name"]]
    heartbeat = Path(env_of(c)["CACHESHIP_HEARTBEAT_FILE"])
    heartbeat_mount = mounts(c)[str(heartbeat.parent)]
    assert heartbeat_mount["name"] != tmp["name"]
    assert vols[heartbeat_mount["name"]]["emptyDir"]["medium"] == "Memory"


def test_worker_image_and_command(worker: dict[str, Any]) -> None:
    c = container(worker)
    assert c["image"] == "cacheship:0.1.0"  # the chart's appVersion by default
    assert "command" not in c  # the image's entry point, `cacheship`
    assert c["args"][0] == "worker"
    assert "--concurrency=4" in c["args"]
    extra = render({"worker": {"concurrency": 8, "extraArgs": ["--without-gossip"]}})
    args = container(extra.one("Deployment", "worker"))["args"]
    assert args == ["worker", "--concurrency=8", "--without-gossip"]


# Health ---------------------------------------------------------------------------------


def run_probe(probe: dict[str, Any], heartbeat: Path) -> int:
    """Run an exec probe's command the way the kubelet does: in the container's environment."""
    env = {"PATH": os.environ["PATH"], "CACHESHIP_HEARTBEAT_FILE": str(heartbeat)}
    done = subprocess.run(probe["exec"]["command"], env=env, capture_output=True, timeout=10)
    return done.returncode


def age(path: Path, seconds: float) -> None:
    path.touch()
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_probes_check_the_heartbeat_without_python(worker: dict[str, Any]) -> None:
    c = container(worker)
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        command = c[kind]["exec"]["command"]
        assert command[0] == "/bin/sh", kind
        assert not any("python" in part for part in command), kind
        assert "CACHESHIP_HEARTBEAT_FILE" in command[-1]
    # A wedged worker is restarted within a minute, not after the hours-long grace period.
    assert c["livenessProbe"]["terminationGracePeriodSeconds"] <= 60


def test_liveness_fails_on_a_stale_or_missing_heartbeat(
    worker: dict[str, Any], tmp_path: Path
) -> None:
    liveness = container(worker)["livenessProbe"]
    heartbeat = tmp_path / "heartbeat"
    assert run_probe(liveness, heartbeat) != 0  # not started yet
    age(heartbeat, 1)
    assert run_probe(liveness, heartbeat) == 0
    age(heartbeat, 100)
    assert run_probe(liveness, heartbeat) == 0
    age(heartbeat, 600)
    assert run_probe(liveness, heartbeat) != 0


def test_readiness_is_stricter_than_liveness(worker: dict[str, Any], tmp_path: Path) -> None:
    c = container(worker)
    heartbeat = tmp_path / "heartbeat"
    age(heartbeat, 60)
    assert run_probe(c["readinessProbe"], heartbeat) != 0
    assert run_probe(c["livenessProbe"], heartbeat) == 0
    age(heartbeat, 2)
    assert run_probe(c["readinessProbe"], heartbeat) == 0


def test_probe_thresholds_follow_the_values(tmp_path: Path) -> None:
    rendered = render({"worker": {"heartbeat": {"livenessMaxAgeSeconds": 20}}})
    liveness = container(rendered.one("Deployment", "worker"))["livenessProbe"]
    heartbeat = tmp_path / "heartbeat"
    age(heartbeat, 40)
    assert run_probe(liveness, heartbeat) != 0


def test_flower_probes_use_its_unauthenticated_healthcheck(defaults: Rendered) -> None:
    c = container(defaults.one("Deployment", "flower"))
    for kind in ("readinessProbe", "livenessProbe"):
        assert c[kind]["httpGet"] == {"path": "/healthcheck", "port": "http"}
    assert c["ports"] == [{"name": "http", "containerPort": 5555, "protocol": "TCP"}]


# Environment wiring ----------------------------------------------------------------------


def test_worker_settings_come_through_as_the_settings_class_reads_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    values = VALUE_SETS["everything"]
    c = container(render(values).one("Deployment", "worker"))
    env = env_of(c)
    literal = {k: v for k, v in env.items() if isinstance(v, str)}
    for name in env:
        if name.startswith("CACHESHIP_"):
            assert name[len("CACHESHIP_") :].lower() in Settings.model_fields, name
    for name in list(os.environ):
        if name.startswith("CACHESHIP_"):
            monkeypatch.delenv(name)
    for name, value in literal.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.queue == "cacheship"
    assert settings.allowed_buckets == ["ci-cache", "release-cache"]
    assert settings.readable_buckets == ["golden-cache"]
    assert settings.allowed_endpoints == ["https://backup.example.com", "http://minio.storage:9000"]
    assert settings.source_roots == [Path("/srv/caches"), Path("/var/lib/cacheship/sources")]
    assert settings.s3_endpoint_url == "https://s3.eu-west-1.amazonaws.com"
    assert settings.s3_region == "eu-west-1"
    assert settings.s3_use_path_style is False
    assert settings.task_time_limit == DEFAULT_TIME_LIMIT
    assert settings.task_soft_time_limit < settings.task_time_limit
    assert 30 <= settings.visibility_timeout <= 120  # leases: a lost pod's work moves on fast
    assert settings.heartbeat_file == Path("/run/cacheship/heartbeat")
    assert settings.allowed_registries == ["ghcr.io/acme/*", "registry.internal:5000"]
    assert settings.registry_chunk_size == 32 * 1024 * 1024


def test_redis_url_comes_from_the_external_secret_by_default(defaults: Rendered) -> None:
    for component in ("worker", "flower"):
        c = container(defaults.one("Deployment", component))
        assert secret_ref(c, "CACHESHIP_REDIS_URL") == ("ship-cacheship-redis", "redis-url")
    assert defaults.of_kind("Secret") == [defaults.named("Secret", "ship-cacheship-flower-auth")]
    own = render(
        {"redis": {"external": {"existingSecret": "shared-redis", "existingSecretKey": "url"}}}
    )
    c = container(own.one("Deployment", "worker"))
    assert secret_ref(c, "CACHESHIP_REDIS_URL") == ("shared-redis", "url")


def test_redis_url_value_becomes_a_chart_secret() -> None:
    url = "rediss://:pw@redis.example:6380/2"
    rendered = render({"redis": {"external": {"url": url}}})
    secret = rendered.named("Secret", "ship-cacheship-redis")
    assert secret["stringData"] == {"redis-url": url}
    c = container(rendered.one("Deployment", "worker"))
    assert url not in str(c)  # only the reference, never the URL itself
    assert secret_ref(c, "CACHESHIP_REDIS_URL") == ("ship-cacheship-redis", "redis-url")


def test_s3_keys_come_from_a_secret_by_default(worker: dict[str, Any]) -> None:
    c = container(worker)
    assert secret_ref(c, "AWS_ACCESS_KEY_ID") == ("ship-cacheship-s3", "AWS_ACCESS_KEY_ID")
    assert secret_ref(c, "AWS_SECRET_ACCESS_KEY") == ("ship-cacheship-s3", "AWS_SECRET_ACCESS_KEY")
    assert "AWS_SESSION_TOKEN" not in env_of(c)
    with_token = render(
        {"s3": {"credentials": {"existingSecret": "ci-s3", "sessionTokenKey": "token"}}}
    )
    c = container(with_token.one("Deployment", "worker"))
    assert secret_ref(c, "AWS_SESSION_TOKEN") == ("ci-s3", "token")
    assert secret_ref(c, "AWS_ACCESS_KEY_ID") == ("ci-s3", "AWS_ACCESS_KEY_ID")


def test_irsa_annotates_the_service_account_and_drops_static_keys() -> None:
    rendered = render(VALUE_SETS["irsa"])
    account = rendered.one("ServiceAccount")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == IRSA_ROLE
    worker = rendered.one("Deployment", "worker")
    assert pod_spec(worker)["serviceAccountName"] == account["metadata"]["name"]
    env = env_of(container(worker))
    assert not any(name.startswith("AWS_") for name in env)
    assert "AWS_" not in str(pod_spec(worker).get("volumes"))


def test_no_credentials_at_all_with_source_none() -> None:
    rendered = render({"s3": {"credentials": {"source": "none"}}})
    env = env_of(container(rendered.one("Deployment", "worker")))
    assert not any(name.startswith("AWS_") for name in env)
    assert "eks.amazonaws.com/role-arn" not in str(rendered.one("ServiceAccount"))


def test_irsa_needs_a_role() -> None:
    with pytest.raises(helm.HelmRenderError, match="irsaRoleArn is required"):
        render({"s3": {"credentials": {"source": "irsa"}}})


def test_shared_volume_is_mounted_read_only_and_allowed_as_a_source_root() -> None:
    rendered = render({"sources": {"sharedVolume": {"enabled": True}}})
    worker = rendered.one("Deployment", "worker")
    c = container(worker)
    mount = mounts(c)["/var/lib/cacheship/sources"]
    assert mount["readOnly"] is True
    claim = volumes(worker)[mount["name"]]["persistentVolumeClaim"]
    pvc = rendered.named("PersistentVolumeClaim", claim["claimName"])
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert env_of(c)["CACHESHIP_SOURCE_ROOTS"] == "/var/lib/cacheship/sources"
    existing = render({"sources": {"sharedVolume": {"enabled": True, "existingClaim": "farm-nfs"}}})
    assert not existing.of_kind("PersistentVolumeClaim")
    worker = existing.one("Deployment", "worker")
    assert volumes(worker)["sources"]["persistentVolumeClaim"]["claimName"] == "farm-nfs"


def test_registry_credentials_are_a_secret_mounted_as_config_json_in_workers_only(
    tmp_path: Path,
) -> None:
    from tasks.backends.registry.auth import config_path

    plain = container(render().one("Deployment", "worker"))
    assert env_of(plain)["CACHESHIP_ALLOWED_REGISTRIES"] == ""  # no registry unless listed
    assert "DOCKER_CONFIG" not in env_of(plain)
    rendered = render(VALUE_SETS["everything"])
    worker = rendered.one("Deployment", "worker")
    c = container(worker)
    directory = env_of(c)["DOCKER_CONFIG"]
    mount = mounts(c)[directory]
    assert mount["readOnly"] is True
    secret = volumes(worker)[mount["name"]]["secret"]
    assert secret["secretName"] == "registry-credentials"
    assert secret["items"] == [{"key": ".dockerconfigjson", "path": "config.json"}]
    # The file the workers read is the mounted key.
    assert config_path({"DOCKER_CONFIG": directory}) == Path(directory) / "config.json"
    flower = container(rendered.one("Deployment", "flower"))
    assert "DOCKER_CONFIG" not in env_of(flower)
    assert directory not in mounts(flower)


def test_flower_has_authentication_on_by_default(defaults: Rendered) -> None:
    c = container(defaults.one("Deployment", "flower"))
    assert c["command"] == ["celery"]
    assert c["args"][:3] == ["-A", "worker", "flower"]
    name, key = secret_ref(c, "FLOWER_BASIC_AUTH")
    secret = defaults.named("Secret", name)
    user, _, password = secret["stringData"][key].partition(":")
    assert user == "admin"
    assert len(password) >= 16 and password == secret["stringData"]["password"]
    assert "FLOWER_BASIC_AUTH" not in str(render({"flower": {"auth": {"enabled": False}}}).objects)


def test_flower_service_and_optional_ingress(defaults: Rendered) -> None:
    service = defaults.one("Service", "flower")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"][0]["port"] == 5555
    assert not defaults.of_kind("Ingress")
    ingress = render(VALUE_SETS["everything"]).one("Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": service["metadata"]["name"], "port": {"number": 5555}}
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"][0]["secretName"] == "flower-tls"


# Shutdown: the grace period against the task time limits ---------------------------------


def grace(rendered: Rendered) -> int:
    value: int = pod_spec(rendered.one("Deployment", "worker"))["terminationGracePeriodSeconds"]
    return value


def test_grace_period_outlasts_the_longest_task(worker: dict[str, Any]) -> None:
    env = env_of(container(worker))
    time_limit = int(env["CACHESHIP_TASK_TIME_LIMIT"])
    assert time_limit == DEFAULT_TIME_LIMIT
    assert int(env["CACHESHIP_TASK_SOFT_TIME_LIMIT"]) < time_limit
    assert int(env["CACHESHIP_VISIBILITY_TIMEOUT"]) == Settings().visibility_timeout  # the lease
    assert pod_spec(worker)["terminationGracePeriodSeconds"] >= time_limit + 60


def test_grace_period_follows_the_time_limit() -> None:
    rendered = render({"worker": {"taskTimeLimit": 3600, "taskSoftTimeLimit": 3300}})
    assert grace(rendered) == 3600 + 120
    env = env_of(container(rendered.one("Deployment", "worker")))
    assert env["CACHESHIP_TASK_TIME_LIMIT"] == "3600"


def test_a_grace_period_shorter_than_tasks_must_be_chosen_deliberately() -> None:
    short = {"worker": {"terminationGracePeriodSeconds": 600}}
    with pytest.raises(helm.HelmRenderError, match="allowTaskInterruption"):
        render(short)
    accepted = render(
        {"worker": {"terminationGracePeriodSeconds": 600, "allowTaskInterruption": True}}
    )
    assert grace(accepted) == 600


@pytest.mark.parametrize(
    ("worker_values", "message"),
    [
        ({"taskSoftTimeLimit": 21600}, "taskSoftTimeLimit"),
        ({"visibilityTimeout": 29}, "visibilityTimeout"),
    ],
)
def test_inconsistent_time_limits_are_refused(worker_values: dict[str, int], message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=message):
        render({"worker": worker_values})


def test_rollouts_keep_capacity_and_drains_go_one_by_one(
    defaults: Rendered, worker: dict[str, Any]
) -> None:
    assert worker["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pdb = defaults.one("PodDisruptionBudget", "worker")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == worker["spec"]["selector"]["matchLabels"]


# Scaling -----------------------------------------------------------------------------------


def test_fixed_replicas_without_an_autoscaler(defaults: Rendered, worker: dict[str, Any]) -> None:
    assert worker["spec"]["replicas"] == 2
    assert not defaults.of_kind("HorizontalPodAutoscaler")
    assert not defaults.of_kind("ScaledObject")


def test_keda_scales_the_workers_on_the_queue_list() -> None:
    rendered = render(VALUE_SETS["keda"])
    worker = rendered.one("Deployment", "worker")
    assert "replicas" not in worker["spec"]  # KEDA's HPA owns it
    assert not rendered.of_kind("HorizontalPodAutoscaler")
    scaled = rendered.one("ScaledObject")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert spec["scaleTargetRef"]["kind"] == "Deployment"
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (1, 20)
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "redis"
    queue = env_of(container(worker))["CACHESHIP_QUEUE"]
    assert trigger["metadata"]["listName"] == queue == "cacheship"
    assert trigger["metadata"]["address"] == EXTERNAL_REDIS
    assert trigger["metadata"]["listLength"] == "4"
    auth = rendered.named("TriggerAuthentication", trigger["authenticationRef"]["name"])
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "password", "name": "redis-auth", "key": "password"}
    ]
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_keda_follows_the_queue_name() -> None:
    values = {**VALUE_SETS["keda"], "worker": {"queue": "caches-eu"}}
    rendered = render(values)
    assert (
        rendered.one("ScaledObject")["spec"]["triggers"][0]["metadata"]["listName"] == "caches-eu"
    )
    env = env_of(container(rendered.one("Deployment", "worker")))
    assert env["CACHESHIP_QUEUE"] == "caches-eu"


def test_keda_with_the_in_chart_redis_needs_no_address() -> None:
    rendered = render(VALUE_SETS["everything"])
    trigger = rendered.one("ScaledObject")["spec"]["triggers"][0]
    redis_service = rendered.one("Service", "redis")
    assert trigger["metadata"]["address"] == f"{redis_service['metadata']['name']}:6379"
    auth = rendered.named("TriggerAuthentication", trigger["authenticationRef"]["name"])
    (ref,) = auth["spec"]["secretTargetRef"]
    secret = rendered.named("Secret", ref["name"])
    assert ref["key"] in secret["stringData"]


def test_keda_without_an_address_is_refused() -> None:
    with pytest.raises(helm.HelmRenderError, match="address"):
        render({"autoscaling": {"keda": {"enabled": True}}})


def test_hpa_targets_the_workers() -> None:
    rendered = render(VALUE_SETS["hpa"])
    worker = rendered.one("Deployment", "worker")
    assert "replicas" not in worker["spec"]
    hpa = rendered.one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": worker["metadata"]["name"],
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    assert hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] == 70
    # Workers use CPU requests, without which a CPU utilisation target means nothing.
    assert container(worker)["resources"]["requests"]["cpu"]


def test_two_autoscalers_are_refused() -> None:
    both = {"autoscaling": {"hpa": {"enabled": True}, **VALUE_SETS["keda"]["autoscaling"]}}
    with pytest.raises(helm.HelmRenderError, match="cannot both be enabled"):
        render(both)


# The in-chart Redis ------------------------------------------------------------------------


def test_in_chart_redis_requires_its_generated_password() -> None:
    rendered = render(VALUE_SETS["internal-redis"])
    redis = rendered.one("Deployment", "redis")
    c = container(redis)
    secret_name, key = secret_ref(c, "REDIS_PASSWORD")
    secret = rendered.named("Secret", secret_name)
    password = secret["stringData"][key]
    assert len(password) >= 24
    assert "--requirepass" in c["command"][-1] and "$REDIS_PASSWORD" in c["command"][-1]
    assert password not in str(c)
    service = rendered.one("Service", "redis")
    url = secret["stringData"]["redis-url"]
    assert url == f"redis://:{password}@{service['metadata']['name']}:6379/0"
    worker = container(rendered.one("Deployment", "worker"))
    assert secret_ref(worker, "CACHESHIP_REDIS_URL") == (secret_name, "redis-url")
    assert redis["spec"]["strategy"]["type"] == "Recreate"


def test_in_chart_redis_keeps_its_data_across_restarts_by_default() -> None:
    rendered = render(VALUE_SETS["internal-redis"])
    redis = rendered.one("Deployment", "redis")
    command = container(redis)["command"][-1]
    assert "--appendonly yes" in command and "--dir /data" in command
    mounts = {m["name"]: m["mountPath"] for m in container(redis)["volumeMounts"]}
    assert mounts["data"] == "/data"
    claim = volumes(redis)["data"]["persistentVolumeClaim"]["claimName"]
    assert rendered.named("PersistentVolumeClaim", claim)["spec"]["accessModes"] == [
        "ReadWriteOnce"
    ]


def test_in_chart_redis_without_a_volume_keeps_data_across_container_restarts_only() -> None:
    rendered = render({"redis": {"internal": {"enabled": True, "persistence": {"enabled": False}}}})
    redis = rendered.one("Deployment", "redis")
    assert "emptyDir" in volumes(redis)["data"]
    assert "--appendonly yes" in container(redis)["command"][-1]
    assert not rendered.of_kind("PersistentVolumeClaim")


# NetworkPolicy -------------------------------------------------------------------------------


def test_network_policies_are_off_by_default(defaults: Rendered) -> None:
    assert not defaults.of_kind("NetworkPolicy")


def test_network_policies_fence_every_component() -> None:
    rendered = render(VALUE_SETS["everything"])
    policies = {
        p["metadata"]["labels"]["app.kubernetes.io/component"]: p
        for p in rendered.of_kind("NetworkPolicy")
    }
    assert set(policies) == {"worker", "flower", "redis", "prune"}
    for component, policy in policies.items():
        if component == "prune":
            job = rendered.one("CronJob", "prune")["spec"]["jobTemplate"]["spec"]
            pods = job["template"]["metadata"]["labels"]
        else:
            pods = rendered.one("Deployment", component)["spec"]["template"]["metadata"]["labels"]
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= pods.items()
        assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}

    worker = policies["worker"]["spec"]
    # The metrics port is the only way in, from anywhere unless metricsIngressFrom says.
    assert worker["ingress"] == [{"ports": [{"port": "metrics", "protocol": "TCP"}]}]
    egress_ports = {(p["port"], p["protocol"]) for rule in worker["egress"] for p in rule["ports"]}
    assert egress_ports == {(53, "UDP"), (53, "TCP"), (6379, "TCP"), (443, "TCP"), (9000, "TCP")}

    redis = policies["redis"]["spec"]
    allowed = [peer for rule in redis["ingress"] for peer in rule["from"]]
    components = {
        p["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        for p in allowed
        if "podSelector" in p
    }
    assert components == {"worker", "flower", "prune"}
    # KEDA's operator reads the queue length from another namespace.
    assert {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}}
    } in allowed
    assert redis["egress"] == []


# The periodic prune ----------------------------------------------------------------------------


def test_no_prune_job_by_default(defaults: Rendered) -> None:
    assert not defaults.of_kind("CronJob")


def test_the_prune_job_runs_the_command_line_against_the_workers() -> None:
    from tasks.backends.s3.prune import parse_prune_request
    from worker.cli.prune import build_request

    rendered = render(VALUE_SETS["everything"])
    cron = rendered.one("CronJob", "prune")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert cron["spec"]["schedule"] == "17 3 * * *"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    (job,) = pod["containers"]
    assert job["securityContext"]["readOnlyRootFilesystem"] is True
    args = job["args"]
    assert args[0] == "prune" and "--wait" in args
    # The arguments are what the command line accepts, and mean what the values say.
    options = dict(a[2:].split("=", 1) for a in args if "=" in a)
    request = parse_prune_request(
        build_request(options["cache"], options["grace"], options.get("expire-names"),
                      tuple(a.split("=", 1)[1] for a in args if a.startswith("--keep-names=")),
                      "--dry-run" in args)
    )
    assert request.cache.bucket == "ci-cache" and request.cache.prefix == "team/"
    assert request.expire_names == 720 * 3600 and request.keep_names == ["main", "release/*"]
    env = env_of(job)
    assert set(env) == {"CACHESHIP_REDIS_URL", "CACHESHIP_QUEUE"}  # no S3 credentials
    assert "secretKeyRef" in env["CACHESHIP_REDIS_URL"]


@pytest.mark.parametrize(
    ("prune", "message"),
    [
        ({"enabled": True}, "prune.cache"),
        ({"enabled": True, "cache": "type=s3,bucket=elsewhere"}, "outside s3.allowedBuckets"),
    ],
)
def test_a_prune_job_without_a_usable_cache_is_refused(prune: dict[str, Any], message: str) -> None:
    with pytest.raises(Exception, match=message):
        render({"prune": prune, "s3": {"allowedBuckets": ["ci-cache"]}})


# Metrics ---------------------------------------------------------------------------------


def test_workers_serve_metrics_where_prometheus_looks(
    defaults: Rendered, worker: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    c = container(worker)
    (port,) = [p for p in c["ports"] if p["name"] == "metrics"]
    monkeypatch.setenv("CACHESHIP_METRICS_PORT", env_of(c)["CACHESHIP_METRICS_PORT"])
    assert Settings().metrics_port == port["containerPort"]
    service = defaults.one("Service", "worker-metrics")
    assert service["spec"]["clusterIP"] == "None"  # every worker pod is its own target
    pods = worker["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pods.items()
    flower_pods = defaults.one("Deployment", "flower")["spec"]["template"]["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= flower_pods.items()
    annotations = service["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == port["containerPort"]
    (service_port,) = service["spec"]["ports"]
    assert service_port["port"] == port["containerPort"]
    assert service_port["targetPort"] == "metrics"


def test_metrics_port_follows_the_value() -> None:
    rendered = render({"metrics": {"port": 9100, "service": {"annotations": {"team": "ci"}}}})
    c = container(rendered.one("Deployment", "worker"))
    assert c["ports"][0]["containerPort"] == 9100
    assert env_of(c)["CACHESHIP_METRICS_PORT"] == "9100"
    annotations = rendered.one("Service", "worker-metrics")["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9100"
    assert annotations["team"] == "ci"


def test_metrics_can_be_switched_off() -> None:
    rendered = render({"metrics": {"enabled": False}, "networkPolicy": {"enabled": True}})
    c = container(rendered.one("Deployment", "worker"))
    assert "ports" not in c
    assert "CACHESHIP_METRICS_PORT" not in env_of(c)
    assert not rendered.find("Service", "worker-metrics")
    assert rendered.one("NetworkPolicy", "worker")["spec"]["ingress"] == []


def test_service_monitor_is_optional_and_scrapes_the_metrics_service(defaults: Rendered) -> None:
    assert not defaults.of_kind("ServiceMonitor")
    rendered = render(VALUE_SETS["everything"])
    monitor = rendered.one("ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    matching = [
        s
        for s in rendered.of_kind("Service")
        if monitor["spec"]["selector"]["matchLabels"].items() <= labels_of(s).items()
    ]
    assert [s["metadata"]["name"] for s in matching] == ["ship-cacheship-worker-metrics"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in matching[0]["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


def test_service_monitor_without_metrics_is_refused() -> None:
    values = {"metrics": {"enabled": False, "serviceMonitor": {"enabled": True}}}
    with pytest.raises(helm.HelmError, match=r"metrics\.serviceMonitor\.enabled needs"):
        render(values)


def test_dashboard_ships_for_grafana_sidecars_when_asked(defaults: Rendered) -> None:
    assert not defaults.of_kind("ConfigMap")
    rendered = render({"metrics": {"dashboard": {"enabled": True}}})
    configmap = rendered.one("ConfigMap", "dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads(configmap["data"]["cacheship.json"])
    assert shipped == json.loads(DASHBOARD.read_text())


def test_only_the_named_peers_may_scrape_when_given() -> None:
    peers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    rendered = render({"networkPolicy": {"enabled": True, "metricsIngressFrom": peers}})
    (rule,) = rendered.one("NetworkPolicy", "worker")["spec"]["ingress"]
    assert rule == {"ports": [{"port": "metrics", "protocol": "TCP"}], "from": peers}
