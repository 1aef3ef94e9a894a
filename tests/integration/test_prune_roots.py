"""Prune's roots: every cache name in the bucket, whoever wrote it and under any prefix.

Real worker processes, Redis and an S3 server over HTTP; the command line as an operator
runs it, with its defaults.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.backends.local import source as local
from tasks.plan import plan_export
from tasks.request import LocalSpec, S3Spec
from tasks.verify import verify_cache
from tests.integration.test_prune import cli, keys, write_cache
from tests.stack import Worker
from worker.client import Client
from worker.embedded import ServerProcess


def team_spec(bucket: str, s3_server: ServerProcess, manifests: str, name: str) -> S3Spec:
    return S3Spec(
        bucket=bucket,
        name=[name],
        manifests_prefix=manifests,
        endpoint_url=s3_server.url,
        use_path_style=True,
    )


def buildkit_export(s3: Any, source: Path, target: S3Spec, root: Path) -> list[str]:
    """What ``docker buildx build --cache-to type=s3,...`` writes: the layer blobs it does
    not find, then the cache config under the name. No config or manifest blob."""
    plan = plan_export(local.load(LocalSpec(src=str(source)), [root]), target)
    for layer in plan.layers:
        key = target.blob_key(layer.digest)
        data = (source / "blobs" / "sha256" / layer.digest.split(":")[1]).read_bytes()
        s3.put_object(Bucket=target.bucket, Key=key, Body=data)
    for name in target.name:
        s3.put_object(Bucket=target.bucket, Key=target.manifest_key(name), Body=plan.s3_config)
    return [layer.digest for layer in plan.layers]


def test_caches_sharing_one_blobs_prefix_survive_a_prune_with_the_defaults(
    env: dict[str, str],
    workers: Callable[..., Worker],
    source_root: Path,
    bucket: str,
    s3: Any,
    s3_server: ServerProcess,
) -> None:
    """The measured loss: teamA/ and teamB/ (cacheship) and bk/ (BuildKit's exporter) share
    blobs/; ``prune --cache type=s3,bucket=B --grace 0s`` used to delete all their layers."""
    workers(env, name="w1", concurrency=3)
    client = Client(env["CACHESHIP_REDIS_URL"])
    layers: set[str] = set()
    specs = {
        "teamA": team_spec(bucket, s3_server, "teamA/", "main"),
        "teamB": team_spec(bucket, s3_server, "teamB/", "main"),
        "bk": team_spec(bucket, s3_server, "bk/", "buildkit"),
    }
    # Twelve layer blobs, some shared: all three share two, B and bk one more.
    layers |= set(write_cache(source_root / "a", [11, 12, 13, 14, 15]))
    layers |= set(write_cache(source_root / "b", [11, 12, 23, 24, 25]))
    layers |= set(write_cache(source_root / "k", [11, 12, 23, 34, 35, 36, 37]))
    assert len(layers) == 12
    for team, path in (("teamA", "a"), ("teamB", "b")):
        export_id = client.submit(
            {
                "source": {"type": "local", "src": str(source_root / path)},
                "target": {
                    "type": "s3", "bucket": bucket, "name": "main",
                    "manifests_prefix": f"{team}/",
                },
            }
        )
        assert client.wait(export_id, timeout=600)["status"] == "complete"
    buildkit_export(s3, source_root / "k", specs["bk"], source_root)
    junk = {f"blobs/sha256:{i:064x}" for i in range(1, 6)}
    for key in junk:
        s3.put_object(Bucket=bucket, Key=key, Body=b"referenced by nobody")
    # Objects that are not names: a text file, JSON of another kind, another cache's blob.
    s3.put_object(Bucket=bucket, Key="notes/readme.txt", Body=b"hello")
    s3.put_object(Bucket=bucket, Key="ci/settings.json", Body=b'{"retries": 3}')
    s3.put_object(Bucket=bucket, Key=f"other/blobs/sha256:{'c' * 64}", Body=b"{}")
    layer_keys = {f"blobs/{digest}" for digest in layers}
    assert layer_keys <= keys(s3, bucket)
    before = keys(s3, bucket)
    time.sleep(1.1)  # grace 0s on a server clock with one-second steps

    cache = f"type=s3,bucket={bucket}"
    done = cli("prune", "--cache", cache, "--grace", "0s", "--wait", "--json", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    after = keys(s3, bucket)

    assert report["ok"] is True
    assert layer_keys <= after, sorted(layer_keys - after)
    assert before - after == junk
    assert report["blobs_removed"] == len(junk)
    assert sorted(report["roots_elsewhere"]) == ["bk/buildkit", "teamA/main", "teamB/main"]
    assert report["objects_not_names"] == 2
    for team, target in specs.items():
        checked = verify_cache(s3, target, deep=True)
        assert checked.sound, (team, checked)
    again = cli("prune", "--cache", cache, "--grace", "0s", "--wait", env=env)
    assert again.returncode == 0, again.stderr
    assert "roots    3 names under other prefixes kept their blobs" in again.stdout
    assert "0 removed" in again.stdout
    for team, target in specs.items():
        verified = cli(
            "verify", "--cache",
            f"{cache},manifests_prefix={target.manifests_prefix},name={target.name[0]}",
            "--deep", env=env,
        )
        assert verified.returncode == 0, (team, verified.stdout + verified.stderr)


def test_a_would_be_name_anywhere_that_does_not_parse_stops_the_prune(
    env: dict[str, str],
    workers: Callable[..., Worker],
    source_root: Path,
    bucket: str,
    s3: Any,
) -> None:
    workers(env, name="w1", concurrency=2)
    s3.put_object(Bucket=bucket, Key="blobs/sha256:" + "1" * 64, Body=b"garbage")
    # A cache config cut short, under a prefix nobody told prune about.
    s3.put_object(Bucket=bucket, Key="teamC/main", Body=b'{"layers":[{"blob":"sha256:')
    before = keys(s3, bucket)
    time.sleep(1.1)
    refused = cli("prune", "--cache", f"type=s3,bucket={bucket}", "--grace", "0s", "--wait",
                  env=env)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert keys(s3, bucket) == before
    error = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1, refused.stderr
    assert "nothing deleted" in error[0] and "(teamC/main)" in error[0], error[0]
    assert "does not parse" in error[0], error[0]
