"""``cacheship`` as a user runs it: the console script against real Redis, S3 and workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tasks.request import S3Spec
from tests.stack import Worker
from worker.client import Client
from worker.embedded import ServerProcess, start_redis
from worker.samplecache import SampleCache, write_sample_cache

MiB = 1024 * 1024
CACHESHIP = str(Path(sys.executable).with_name("cacheship"))


def cli(
    *args: str, env: dict[str, str], stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CACHESHIP, *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.fixture
def cli_worker(env: dict[str, str], tmp_path: Path) -> Iterator[Worker]:
    """A worker started the documented way: ``cacheship worker`` with celery options."""
    log_path = tmp_path / "cacheship-worker.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [
                CACHESHIP,
                "worker",
                "--concurrency",
                "2",
                "--hostname",
                "cli@%h",
                "--without-mingle",
                "--without-gossip",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    worker = Worker(name="cli", proc=proc, log_path=log_path)
    worker.wait_ready()
    yield worker
    worker.stop()


@pytest.fixture
def cache(source_root: Path) -> SampleCache:
    return write_sample_cache(source_root / "app", [2 * MiB, 700_000, 3 * MiB], seed=11)


@dataclass
class Exported:
    """A cache exported through the CLI, and how to reach it."""

    bucket: str
    spec: str
    result: dict[str, Any]


def test_export_wait_json_status_and_verify(
    env: dict[str, str],
    cli_worker: Worker,
    cache: SampleCache,
    bucket: str,
    s3_server: ServerProcess,
    s3: Any,
) -> None:
    done = cli(
        "export",
        "--from",
        f"type=local,src={cache.path}",
        "--to",
        f"type=s3,bucket={bucket},region=us-east-1,name=main;pr-7",
        "--wait",
        "--json",
        env=env,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result) == {
        "status",
        "export_id",
        "cache.manifest",
        "config",
        "bucket",
        "names",
        "layers",
        "layers_uploaded",
        "layers_skipped",
        "layers_touched",
        "bytes_total",
        "bytes_sent",
        "bytes_resumed",
        "steps",
        "completed_at",
    }
    assert result["status"] == "complete"
    assert result["names"] == ["manifests/main", "manifests/pr-7"]
    assert result["layers"] == result["layers_uploaded"] == 3
    assert result["bytes_sent"] == sum(d.size for d in cache.layers)
    manifest = json.loads(result["cache.manifest"])
    assert manifest["digest"].startswith("sha256:")
    # progress on stderr, one BuildKit-named line per step
    for layer in cache.layers:
        assert f"writing layer {layer.digest} uploaded" in done.stderr
    assert f"writing config {result['config']}" in done.stderr
    assert f"writing cache manifest {manifest['digest']}" in done.stderr
    export_id = result["export_id"]

    status = cli("status", export_id, env=env)
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith(f"export {export_id}: SUCCESS (finished in ")
    for layer in cache.layers:
        assert f"writing layer {layer.digest}" in status.stdout
    assert status.stdout.count("SUCCESS uploaded") == 3
    assert f"  name      s3://{bucket}/manifests/pr-7" in status.stdout

    as_json = json.loads(cli("status", export_id, "--json", env=env).stdout)
    assert as_json["state"] == "SUCCESS"
    assert as_json["result"] == result
    assert [s["kind"] for s in as_json["steps"]] == ["layer"] * 3 + ["config", "manifest"]
    assert all(s["state"] == "SUCCESS" for s in as_json["steps"])

    # the same export again: every layer is already there
    again = cli(
        "export",
        "--from",
        f"type=local,src={cache.path}",
        "--to",
        f"type=s3,bucket={bucket},region=us-east-1,name=main;pr-7",
        "--wait",
        env=env,
    )
    assert again.returncode == 0, again.stderr
    assert "layers    3: 0 uploaded, 3 skipped, 0 touched" in again.stdout
    assert again.stderr.count("skipped: already in the bucket") == 3

    spec = f"type=s3,bucket={bucket},name=main;pr-7"
    verified = cli("verify", "--cache", spec, "--deep", env=env)
    assert verified.returncode == 0, verified.stderr + verified.stdout
    assert "sha256   3 blobs read back and hashed" in verified.stdout
    assert "sound: BuildKit can import it with" in verified.stdout
    assert f"bucket={bucket},name=main ." in verified.stdout
    report = json.loads(cli("verify", "--cache", spec, "--json", env=env).stdout)
    assert report["sound"] is True
    assert report["blobs"] == 3
    assert [n["name"] for n in report["names"]] == ["main", "pr-7"]


def test_failed_export_exit_codes_and_status(
    env: dict[str, str],
    cli_worker: Worker,
    cache: SampleCache,
    bucket: str,
) -> None:
    bad = max(cache.layers, key=lambda d: d.size)
    path = cache.path / "blobs" / "sha256" / bad.digest.removeprefix("sha256:")
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x55
    path.write_bytes(bytes(data))

    failed = cli(
        "export",
        "--from",
        f"type=local,src={cache.path}",
        "--to",
        f"type=s3,bucket={bucket}",
        "--wait",
        "--json",
        env=env,
    )
    assert failed.returncode == 1
    document = json.loads(failed.stdout)
    assert set(document) == {"export_id", "state", "error"}
    assert document["state"] == "FAILURE"
    assert bad.digest in document["error"]
    assert "does not match" in document["error"]
    errors = error_lines(failed.stderr)
    assert errors == [f"error: export {document['export_id']} failed: {document['error']}"]
    assert "Traceback" not in failed.stderr

    status = cli("status", document["export_id"], env=env)
    assert status.returncode == 1
    assert status.stdout.startswith(f"export {document['export_id']}: FAILURE (failed)")
    assert error_lines(status.stderr) == errors
    as_json = cli("status", document["export_id"], "--json", env=env)
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["error"] == document["error"]


def test_a_request_file_on_stdin_and_ctrl_c_stops_only_the_watching(
    env: dict[str, str],
    cli_worker: Worker,
    cache: SampleCache,
    bucket: str,
) -> None:
    body = json.dumps(
        {
            "source": {"type": "local", "src": str(cache.path)},
            "target": {"type": "s3", "bucket": bucket, "name": "from-stdin"},
        }
    )
    # The worker is frozen while the CLI watches, so the export cannot finish before Ctrl-C.
    os.killpg(cli_worker.proc.pid, signal.SIGSTOP)
    try:
        proc = subprocess.Popen(
            [CACHESHIP, "export", "--request", "-", "--wait"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(body)
        proc.stdin.close()
        export_id = proc.stdout.readline().strip()
        uuid.UUID(export_id)
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    finally:
        os.killpg(cli_worker.proc.pid, signal.SIGCONT)
    assert proc.stderr is not None
    stderr = proc.stderr.read()
    assert proc.returncode == 130, stderr
    assert f"Watch it again with: cacheship status {export_id} --wait" in stderr
    assert "Traceback" not in stderr

    resumed = cli("status", export_id, "--wait", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"export {export_id}: complete" in resumed.stdout
    assert "  name      s3://" + bucket + "/manifests/from-stdin" in resumed.stdout


def test_the_redis_password_is_never_printed(env: dict[str, str], tmp_path: Path) -> None:
    password = "pa55-" + uuid.uuid4().hex
    server = start_redis(password=password)
    try:
        good = f"redis://:{password}@127.0.0.1:{server.port}/0"
        unknown = str(uuid.uuid4())
        pending = cli("status", unknown, "--redis-url", good, env=env)
        assert pending.returncode == 1, pending.stderr
        assert f"Redis has no record of export {unknown}" in pending.stderr
        queued = cli(
            "export",
            "--from",
            "type=s3,bucket=source-bucket,region=us-east-1",
            "--to",
            "type=s3,bucket=some-bucket",
            env={**env, "CACHESHIP_REDIS_URL": good},
        )
        assert queued.returncode == 0, queued.stderr
        wrong = f"redis://:not-{password}@127.0.0.1:{server.port}/0"
        refused = cli("status", unknown, env={**env, "CACHESHIP_REDIS_URL": wrong})
        assert refused.returncode == 1
        assert error_lines(refused.stderr) == [error_lines(refused.stderr)[0]] and error_lines(
            refused.stderr
        )[0].startswith(f"error: cannot reach Redis at redis://:***@127.0.0.1:{server.port}/0: ")
        for run in (pending, queued, refused):
            assert password not in run.stdout + run.stderr
    finally:
        server.stop()


@pytest.fixture
def written(
    env: dict[str, str], s3: Any, bucket: str, cache: SampleCache, source_root: Path
) -> Iterator[Exported]:
    """The cache as cacheship writes it (same planning and publishing code), no workers."""
    from tasks.backends.local import source as local
    from tasks.backends.s3.publish import put_blob, put_names
    from tasks.plan import plan_export
    from tasks.request import LocalSpec

    target = S3Spec(bucket=bucket, name=["main"])
    plan = plan_export(local.load(LocalSpec(src=str(cache.path)), [source_root]), target)
    for layer in plan.layers:
        blob = (cache.path / "blobs" / "sha256" / layer.digest.removeprefix("sha256:")).read_bytes()
        s3.put_object(Bucket=bucket, Key=target.blob_key(layer.digest), Body=blob)
    put_blob(s3, target, plan.config_desc, plan.config)
    put_blob(s3, target, plan.manifest_desc, plan.manifest)
    put_names(s3, target, plan.s3_config)
    yield Exported(bucket, f"type=s3,bucket={bucket},name=main", {"layers": plan.layers})


def _verify(
    exported: Exported, env: dict[str, str], *extra: str
) -> subprocess.CompletedProcess[str]:
    return cli("verify", "--cache", exported.spec, *extra, env=env)


def test_verify_a_sound_cache(written: Exported, env: dict[str, str]) -> None:
    for extra in ((), ("--deep",)):
        run = _verify(written, env, *extra)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "blobs    3 of 3 present with their sizes" in run.stdout
        assert "problem" not in run.stdout


def test_verify_finds_a_deleted_blob(written: Exported, env: dict[str, str], s3: Any) -> None:
    gone = written.result["layers"][1].digest
    s3.delete_object(Bucket=written.bucket, Key=f"blobs/{gone}")
    run = _verify(written, env)
    assert run.returncode == 1
    assert f"  problem  layer {gone}: blob missing (nothing at blobs/{gone})" in run.stdout
    assert error_lines(run.stderr) == [
        f"error: the cache is not sound: 1 problem (first: layer {gone}: blob missing "
        f"(nothing at blobs/{gone}))"
    ]


def test_verify_finds_a_blob_with_other_bytes(
    written: Exported, env: dict[str, str], s3: Any
) -> None:
    layer = written.result["layers"][0]
    key = f"blobs/{layer.digest}"
    data = bytearray(s3.get_object(Bucket=written.bucket, Key=key)["Body"].read())
    data[100] ^= 0xFF
    s3.put_object(Bucket=written.bucket, Key=key, Body=bytes(data))
    shallow = _verify(written, env)
    assert shallow.returncode == 0, "same size: only --deep reads the bytes"
    deep = _verify(written, env, "--deep")
    assert deep.returncode == 1
    assert f"layer {layer.digest}: blob holds other bytes: their sha256 is sha256:" in deep.stdout
    report = json.loads(_verify(written, env, "--deep", "--json").stdout)
    assert report["sound"] is False
    assert [p["where"] for p in report["problems"]] == [f"layer {layer.digest}"]

    s3.put_object(Bucket=written.bucket, Key=key, Body=bytes(data[:-10]))
    resized = _verify(written, env)
    assert resized.returncode == 1
    assert f"blob is {layer.size - 10} bytes, the config says {layer.size}" in resized.stdout


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda body: body[: len(body) // 2], "the config does not parse"),
        (lambda body: body + b"\n{}", "the config does not parse"),
        (lambda body: body.replace(b'"diffID":', b'"diffXX":', 1), "no diffID"),
    ],
    ids=["truncated", "trailing-data", "no-diffid"],
)
def test_verify_finds_a_config_buildkit_would_refuse(
    written: Exported, env: dict[str, str], s3: Any, damage: Any, expected: str
) -> None:
    key = "manifests/main"
    body = s3.get_object(Bucket=written.bucket, Key=key)["Body"].read()
    s3.put_object(Bucket=written.bucket, Key=key, Body=damage(body))
    run = _verify(written, env)
    assert run.returncode == 1
    assert f"  problem  {key}" in run.stdout
    assert expected in run.stdout
    assert len(error_lines(run.stderr)) == 1


def test_verify_a_name_that_does_not_exist(written: Exported, env: dict[str, str]) -> None:
    run = cli("verify", "--cache", f"type=s3,bucket={written.bucket},name=nope", env=env)
    assert run.returncode == 1
    assert "manifests/nope: no cache named 'nope'" in run.stdout


def test_worker_command_passes_celery_options(
    cli_worker: Worker, redis_server: ServerProcess
) -> None:
    """``cacheship worker --concurrency 2 --hostname cli@%h`` is a real, configured worker."""
    client = Client(redis_server.url)
    stats = client.app.control.inspect(timeout=2).stats() or {}
    assert len(stats) == 1
    ((name, info),) = stats.items()
    assert name.startswith("cli@")
    assert info["pool"]["max-concurrency"] == 2
    registered = client.app.control.inspect(timeout=2).registered() or {}
    assert {"cacheship.export", "cacheship.copy_layer", "cacheship.finalize"} <= set(
        registered[name]
    )
