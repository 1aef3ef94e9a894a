"""The command line without servers: parsing, one-line errors, exit codes, --json shapes."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner, Result

from tasks.request import ExportRequest, request_schema
from worker.cli import main
from worker.cli.common import mask_url, redact, remember_secret
from worker.cli.watch import PlainView, Tracker, display_name
from worker.cli.worker import worker_argv
from worker.client import Snapshot, StepStatus

EXPORT_ID = "0b7c4f8e-2a61-4d0f-9a7e-5f4a3c2b1d00"
LAYER_A = "sha256:" + "a" * 64
LAYER_B = "sha256:" + "b" * 64
CONFIG = "sha256:" + "c" * 64
MANIFEST = "sha256:" + "d" * 64
MiB = 1024 * 1024


def run(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=stdin, prog_name="cacheship")


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def steps(
    a: tuple[str, str, int] = ("PENDING", "waiting", 0),
    b: tuple[str, str, int] = ("PENDING", "waiting", 0),
    finalize: tuple[str, str] = ("PENDING", "waiting"),
) -> list[StepStatus]:
    return [
        StepStatus(f"writing layer {LAYER_A}", "ta", "layer", LAYER_A, 4 * MiB, *a),
        StepStatus(f"writing layer {LAYER_B}", "tb", "layer", LAYER_B, 2 * MiB, *b),
        StepStatus(f"writing config {CONFIG}", EXPORT_ID, "config", CONFIG, 900, *finalize),
        StepStatus(
            f"writing cache manifest {MANIFEST}", EXPORT_ID, "manifest", MANIFEST, 700, *finalize
        ),
    ]


RESULT: dict[str, Any] = {
    "status": "complete",
    "export_id": EXPORT_ID,
    "cache.manifest": json.dumps(
        {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": MANIFEST, "size": 700}
    ),
    "config": CONFIG,
    "bucket": "cache-bucket",
    "names": ["manifests/buildkit"],
    "layers": 2,
    "layers_uploaded": 1,
    "layers_skipped": 1,
    "layers_touched": 0,
    "bytes_total": 6 * MiB,
    "bytes_sent": 4 * MiB,
    "bytes_resumed": 0,
    "steps": [],
    "completed_at": "2026-01-01T00:00:00.000Z",
}


def running_then_done() -> list[Snapshot]:
    return [
        Snapshot(EXPORT_ID, "PENDING"),
        Snapshot(
            EXPORT_ID,
            "PROGRESS",
            "copying",
            steps(("PROGRESS", "copying", MiB), ("PROGRESS", "skipped", 2 * MiB)),
        ),
        Snapshot(
            EXPORT_ID,
            "SUCCESS",
            "",
            steps(("SUCCESS", "uploaded", 4 * MiB), ("SUCCESS", "skipped", 2 * MiB)),
            result=RESULT,
        ),
    ]


def running_then_failed() -> list[Snapshot]:
    error = f"writing layer {LAYER_A}: sha256 of the written bytes does not match"
    return [
        Snapshot(EXPORT_ID, "PROGRESS", "copying", steps(("PROGRESS", "copying", MiB))),
        Snapshot(
            EXPORT_ID,
            "FAILURE",
            "",
            [
                StepStatus(
                    f"writing layer {LAYER_A}",
                    "ta",
                    "layer",
                    LAYER_A,
                    4 * MiB,
                    "FAILURE",
                    "failed",
                    MiB,
                    error,
                ),
                *steps()[1:],
            ],
            error=error,
        ),
    ]


class FakeClient:
    """Stands in for worker.client.Client: replays snapshots, records submissions.

    ``down``: how many reads fail first as if Redis were unreachable.
    """

    redis_patience = 180.0
    where = "redis://127.0.0.1:1/0"

    def __init__(self, snapshots: list[Snapshot], down: int = 0) -> None:
        self._snapshots = snapshots
        self._index = 0
        self._down = down
        self.submitted: list[ExportRequest] = []

    def submit(self, request: ExportRequest) -> str:
        self.submitted.append(request)
        return EXPORT_ID

    def snapshot(self, export_id: str, with_steps: bool = True) -> Snapshot:
        assert export_id == EXPORT_ID
        if self._index == 1 and self._down > 0:
            self._down -= 1
            raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")
        snap = self._snapshots[min(self._index, len(self._snapshots) - 1)]
        self._index += 1
        return snap


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[FakeClient]]:
    """``fake.append(FakeClient([...]))`` before invoking; commands get the last one."""
    made: list[FakeClient] = []

    def connect(redis_url: str | None) -> FakeClient:
        return made[-1]

    monkeypatch.setattr("worker.cli.export.connect", connect)
    monkeypatch.setattr("worker.cli.status.connect", connect)
    monkeypatch.setattr("worker.cli.watch.time.sleep", lambda seconds: None)
    yield made


FROM = "type=local,src=/var/cache/bk"
TO = "type=s3,bucket=cache-bucket,region=eu-west-1"


# --- schema -------------------------------------------------------------------------------


def test_schema_prints_the_request_schema() -> None:
    result = run("schema")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == request_schema()


# --- errors: one line, exit codes ------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["export", "--from", FROM, "--to", "type=s3"], "error: --to: target.bucket: required"),
        (
            ["export", "--from", FROM, "--to", "type=s3,bucket=cache-bucket,colour=red"],
            "error: --to: target.colour: unknown attribute",
        ),
        (
            ["export", "--from", "type=local", "--to", TO],
            "error: --from: source.src: required",
        ),
        (
            ["export", "--from", FROM, "--to", "type=local,src=/x"],
            "error: --to: target.dest: required; target.src: unknown attribute",
        ),
        (["export", "--from", FROM], "error: give --from SRC and --to DST"),
        (["export", "--bogus"], "error: No such option"),
        (["status", "not an id"], "error: 'not an id' is not an export id"),
        (
            ["verify", "--cache", "type=local,src=/no/such/dir"],
            "error: --cache: cache.src: /no/such/dir is not a directory",
        ),
        (["verify", "--cache", "type=s3"], "error: --cache: cache.bucket: required"),
        (["nonsense"], "error: No such command"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args: list[str], message: str) -> None:
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert lines(result.stderr) == [lines(result.stderr)[0]]
    assert lines(result.stderr)[0].startswith(message)
    assert "Traceback" not in result.output
    assert result.stdout == ""


def test_credentials_in_a_spec_are_refused_and_never_printed() -> None:
    secret = "AKIAsecretvalue-do-not-print"
    result = run("export", "--from", FROM, "--to", f"{TO},secret_access_key={secret}")
    assert result.exit_code == 2
    assert "credentials are not accepted" in result.stderr
    assert secret not in result.output


def test_request_and_from_are_exclusive(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text("{}")
    result = run("export", "--request", str(path), "--from", FROM, "--to", TO)
    assert result.exit_code == 2
    assert "error: give --request, or --from and --to, not both" in result.stderr


def test_bad_request_on_stdin() -> None:
    result = run("export", "--request", "-", stdin='{"source": {"type": "local"}}')
    assert result.exit_code == 2
    first = lines(result.stderr)[0]
    assert first.startswith("error: --request: ")
    assert "source.src: required" in first
    assert "target: required" in first


def test_unreachable_redis_is_one_masked_line() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        password = "hunter2-very-secret"
        url = f"redis://:{password}@127.0.0.1:{port}/0"
        result = run("status", EXPORT_ID, "--redis-url", url)
    assert result.exit_code == 1
    assert lines(result.stderr) == [lines(result.stderr)[0]]
    assert lines(result.stderr)[0].startswith(
        f"error: cannot reach Redis at redis://:***@127.0.0.1:{port}/0: "
    )
    assert password not in result.output


def test_unexpected_errors_are_one_line_unless_debug(
    fake: list[FakeClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = FakeClient([])
    fake.append(client)

    def explode(request: ExportRequest) -> str:
        raise RuntimeError("broker said no\nsecond line")

    monkeypatch.setattr(client, "submit", explode)
    result = run("export", "--from", FROM, "--to", TO)
    assert result.exit_code == 1
    assert lines(result.stderr) == [
        "error: RuntimeError: broker said no (run `cacheship --debug ...` for the traceback)"
    ]
    debug = run("--debug", "export", "--from", FROM, "--to", TO)
    assert isinstance(debug.exception, RuntimeError)


# --- export ---------------------------------------------------------------------------------


def test_export_prints_the_id_and_how_to_follow(fake: list[FakeClient]) -> None:
    fake.append(FakeClient(running_then_done()))
    result = run("export", "--from", FROM, "--to", TO)
    assert result.exit_code == 0
    assert result.stdout == f"{EXPORT_ID}\n"
    assert f"cacheship status {EXPORT_ID} --wait" in result.stderr
    request = fake[-1].submitted[0]
    assert request.target.bucket == "cache-bucket"
    assert request.target.region == "eu-west-1"


def test_export_json_without_wait(fake: list[FakeClient]) -> None:
    fake.append(FakeClient(running_then_done()))
    result = run("export", "--from", FROM, "--to", TO, "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"export_id": EXPORT_ID, "state": "PENDING"}


def test_relative_local_source_is_made_absolute(
    fake: list[FakeClient], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.append(FakeClient(running_then_done()))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "index.json").write_text("{}")
    result = run("export", "--from", "type=local,src=cache", "--to", TO)
    assert result.exit_code == 0, result.output
    source = fake[-1].submitted[0].source
    assert getattr(source, "src", None) == str(tmp_path / "cache")


# --- local sources checked at enqueue time -------------------------------------------------


@pytest.fixture
def no_roots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CACHESHIP_SOURCE_ROOTS", raising=False)


def test_a_relative_source_that_is_not_here_is_refused(
    fake: list[FakeClient], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_roots: None
) -> None:
    fake.append(FakeClient(running_then_done()))
    monkeypatch.chdir(tmp_path)
    result = run("export", "--from", "type=local,src=nope", "--to", TO)
    assert result.exit_code == 2
    missing = tmp_path / "nope"
    assert lines(result.output) == [f"error: --from: source.src: {missing} does not exist"]
    assert fake[-1].submitted == []


def test_a_directory_that_is_not_a_cache_says_how_buildkit_writes_one(
    fake: list[FakeClient], tmp_path: Path, no_roots: None
) -> None:
    fake.append(FakeClient(running_then_done()))
    (tmp_path / "blobs").mkdir()
    result = run("export", "--from", f"type=local,src={tmp_path}", "--to", TO)
    assert result.exit_code == 2
    [line] = lines(result.output)
    assert line.startswith(f"error: --from: source.src: {tmp_path} is not a BuildKit cache: ")
    assert "no index.json" in line
    assert f"--cache-to type=local,dest={tmp_path}" in line
    assert fake[-1].submitted == []


def test_outside_the_source_roots_names_the_setting_and_the_roots(
    fake: list[FakeClient], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.append(FakeClient(running_then_done()))
    allowed = [tmp_path / "a", tmp_path / "b"]
    for root in allowed:
        root.mkdir()
    monkeypatch.setenv("CACHESHIP_SOURCE_ROOTS", ",".join(map(str, allowed)))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "index.json").write_text("{}")
    result = run("export", "--from", f"type=local,src={elsewhere}", "--to", TO)
    assert result.exit_code == 2
    assert lines(result.output) == [
        f"error: --from: source.src: {elsewhere} is outside CACHESHIP_SOURCE_ROOTS "
        f"({allowed[0]}, {allowed[1]}): local caches are only read under these directories"
    ]
    missing = allowed[1] / "app"
    result = run("export", "--from", f"type=local,src={missing}", "--to", TO)
    assert result.exit_code == 2
    assert lines(result.output) == [f"error: --from: source.src: {missing} does not exist"]
    # a --request file is checked the same way
    source = {"type": "local", "src": str(elsewhere)}
    body = json.dumps({"source": source, "target": {"type": "s3", "bucket": "b-1"}})
    result = run("export", "--request", "-", stdin=body)
    assert result.exit_code == 2
    assert "error: --request: source.src: " in result.output
    assert "is outside CACHESHIP_SOURCE_ROOTS" in result.output
    assert fake[-1].submitted == []
    # under a root and a cache: enqueued
    (allowed[1] / "app").mkdir()
    (allowed[1] / "app" / "index.json").write_text("{}")
    assert run("export", "--from", f"type=local,src={missing}", "--to", TO).exit_code == 0
    assert len(fake[-1].submitted) == 1


def test_an_absolute_source_not_on_this_host_is_left_to_the_workers(
    fake: list[FakeClient], no_roots: None
) -> None:
    fake.append(FakeClient(running_then_done()))
    result = run("export", "--from", "type=local,src=/srv/on-the-workers/app", "--to", TO)
    assert result.exit_code == 0, result.output
    assert len(fake[-1].submitted) == 1


def test_export_request_from_stdin(fake: list[FakeClient]) -> None:
    fake.append(FakeClient(running_then_done()))
    body = json.dumps(
        {
            "source": {"type": "local", "src": "/var/cache/bk"},
            "target": {"type": "s3", "bucket": "cache-bucket", "name": "main;pr-1"},
        }
    )
    result = run("export", "--request", "-", stdin=body)
    assert result.exit_code == 0, result.output
    assert fake[-1].submitted[0].target.name == ["main", "pr-1"]


def test_export_wait_rides_out_redis_being_down_and_reports_the_outcome(
    fake: list[FakeClient],
) -> None:
    fake.append(FakeClient(running_then_done(), down=3))
    result = run("export", "--from", FROM, "--to", TO, "--wait", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == RESULT
    assert "waiting for Redis at redis://127.0.0.1:1/0: unreachable" in result.stderr
    assert "Redis at redis://127.0.0.1:1/0 is back" in result.stderr


def test_export_wait_gives_up_on_redis_after_its_patience(
    fake: list[FakeClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = FakeClient(running_then_done(), down=10**6)
    client.redis_patience = 0.05
    fake.append(client)
    clock = iter(range(0, 10**6))
    monkeypatch.setattr("worker.client.time.monotonic", lambda: float(next(clock)))
    result = run("export", "--from", FROM, "--to", TO, "--wait")
    assert result.exit_code == 1
    assert "unreachable for over 0s" in result.stderr
    assert f"cacheship status {EXPORT_ID} --wait" in result.stderr


def test_export_wait_json_prints_the_final_result(fake: list[FakeClient]) -> None:
    fake.append(FakeClient(running_then_done()))
    result = run("export", "--from", FROM, "--to", TO, "--wait", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == RESULT
    # progress went to stderr, as BuildKit names the steps
    assert f"writing layer {LAYER_A} uploaded 4.0 MiB" in result.stderr
    assert f"writing layer {LAYER_B} skipped: already in the bucket" in result.stderr
    assert f"writing config {CONFIG}" in result.stderr
    assert f"writing cache manifest {MANIFEST}" in result.stderr


def test_export_wait_prints_a_summary(fake: list[FakeClient]) -> None:
    fake.append(FakeClient(running_then_done()))
    result = run("export", "--from", FROM, "--to", TO, "--wait")
    assert result.exit_code == 0, result.output
    out = result.stdout.splitlines()
    assert out[0] == EXPORT_ID
    assert out[1].startswith(f"export {EXPORT_ID}: complete in ")
    assert "  layers    2: 1 uploaded, 1 skipped, 0 touched" in out
    assert "  bytes     4.0 MiB sent of 6.0 MiB" in out
    assert "  name      s3://cache-bucket/manifests/buildkit" in out


def test_failed_export_exits_1_with_the_workers_message(fake: list[FakeClient]) -> None:
    fake.append(FakeClient(running_then_failed()))
    result = run("export", "--from", FROM, "--to", TO, "--wait", "--json")
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert document == {
        "export_id": EXPORT_ID,
        "state": "FAILURE",
        "error": f"writing layer {LAYER_A}: sha256 of the written bytes does not match",
    }
    assert lines(result.stderr)[-1] == (
        f"error: export {EXPORT_ID} failed: writing layer {LAYER_A}: "
        "sha256 of the written bytes does not match"
    )
    assert f"writing layer {LAYER_A} ERROR: " in result.stderr


def test_ignore_error_reports_the_failure_as_a_warning_and_exits_0(
    fake: list[FakeClient],
) -> None:
    fake.append(FakeClient(running_then_failed()))
    result = run("export", "--from", FROM, "--to", TO + ",ignore-error=true", "--wait")
    assert result.exit_code == 0, result.output
    assert fake[-1].submitted[0].target.ignore_error is True
    assert lines(result.stderr)[-1] == (
        f"warning: export {EXPORT_ID} failed: writing layer {LAYER_A}: "
        "sha256 of the written bytes does not match (ignored: the target has ignore-error=true)"
    )
    assert "error:" not in result.stderr


def test_ignore_error_with_json_still_prints_the_failure(fake: list[FakeClient]) -> None:
    fake.append(FakeClient(running_then_failed()))
    result = run("export", "--from", FROM, "--to", TO + ",ignore-error=true", "--wait", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["state"] == "FAILURE"
    assert "warning: export" in result.stderr


def test_ignore_error_false_still_fails(fake: list[FakeClient]) -> None:
    fake.append(FakeClient(running_then_failed()))
    result = run("export", "--from", FROM, "--to", TO + ",ignore-error=false", "--wait")
    assert result.exit_code == 1


def test_ctrl_c_stops_watching_and_says_how_to_resume(
    fake: list[FakeClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = FakeClient(running_then_done())
    fake.append(client)

    def interrupted(export_id: str, with_steps: bool = True) -> Snapshot:
        raise KeyboardInterrupt

    monkeypatch.setattr(client, "snapshot", interrupted)
    result = run("export", "--from", FROM, "--to", TO, "--wait")
    assert result.exit_code == 130
    assert f"Watch it again with: cacheship status {EXPORT_ID} --wait" in result.stderr
    assert "goes on" in result.stderr


# --- status ---------------------------------------------------------------------------------


def test_status_of_a_finished_export(fake: list[FakeClient]) -> None:
    fake.append(FakeClient(running_then_done()[-1:]))
    result = run("status", EXPORT_ID)
    assert result.exit_code == 0
    assert result.stdout.startswith(f"export {EXPORT_ID}: SUCCESS (finished)")
    assert f"writing layer {LAYER_B}" in result.stdout
    assert "SUCCESS skipped" in result.stdout
    assert "  name      s3://cache-bucket/manifests/buildkit" in result.stdout


def test_status_json_shape(fake: list[FakeClient]) -> None:
    fake.append(FakeClient(running_then_done()[1:2]))
    result = run("status", EXPORT_ID, "--json")
    assert result.exit_code == 0
    document = json.loads(result.stdout)
    assert set(document) == {
        "export_id",
        "state",
        "ready",
        "phase",
        "bytes_done",
        "bytes_total",
        "steps",
        "result",
        "error",
    }
    assert document["state"] == "PROGRESS"
    assert document["ready"] is False
    assert (document["bytes_done"], document["bytes_total"]) == (3 * MiB, 6 * MiB)
    assert set(document["steps"][0]) == {
        "name",
        "kind",
        "digest",
        "size",
        "task_id",
        "state",
        "status",
        "bytes_done",
        "error",
        "worker",
        "worker_lost_seconds",
    }
    assert [s["kind"] for s in document["steps"]] == ["layer", "layer", "config", "manifest"]


def test_status_of_a_failed_export_exits_1(fake: list[FakeClient]) -> None:
    fake.append(FakeClient(running_then_failed()[-1:]))
    result = run("status", EXPORT_ID, "--json")
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert document["state"] == "FAILURE"
    assert "does not match" in document["error"]
    assert lines(result.stderr)[-1].startswith(f"error: export {EXPORT_ID} failed: ")


def test_status_of_an_unknown_id_says_so(fake: list[FakeClient]) -> None:
    fake.append(FakeClient([Snapshot(EXPORT_ID, "PENDING")]))
    result = run("status", EXPORT_ID)
    assert result.exit_code == 0
    assert "queued: no worker has taken it yet (or no export has this id)" in result.stdout


# --- helpers ----------------------------------------------------------------------------------


def test_masking() -> None:
    assert mask_url("redis://:pw@host:6379/0") == "redis://:***@host:6379/0"
    assert mask_url("rediss://user:pw@host/1") == "rediss://user:***@host/1"
    assert mask_url("redis://host:6379/0") == "redis://host:6379/0"
    remember_secret("s3kr1t-token")
    assert redact("failed with s3kr1t-token inside") == "failed with *** inside"


def test_worker_passes_options_through() -> None:
    argv = worker_argv(("--concurrency", "4"), "INFO")
    celery = ["-m", "celery", "-A", "worker", "worker"]
    assert argv[1:] == [*celery, "--loglevel", "INFO", "--concurrency", "4"]
    assert "INFO" not in worker_argv(("-l", "DEBUG"), "INFO")
    assert "INFO" not in worker_argv(("--loglevel=DEBUG",), "INFO")
    assert "INFO" not in worker_argv(("-lDEBUG",), "INFO")


def test_plain_progress_lines_follow_buildkits_names() -> None:
    tracker = Tracker(EXPORT_ID)
    written: list[str] = []
    view = PlainView(written.append)
    for now, snap in enumerate(running_then_done()):
        view.show(tracker, tracker.update(snap, float(now)))
    assert written[0] == f"export {EXPORT_ID}: 2 layers, 6.0 MiB to write"
    assert written[1] == f"writing layer {LAYER_A}"
    assert written[2] == f"writing layer {LAYER_B} skipped: already in the bucket 0.0s done"
    assert written[3] == f"writing layer {LAYER_A} uploaded 4.0 MiB 1.0s done"
    assert written[4] == f"writing config {CONFIG} 0.0s done"
    assert written[5] == f"writing cache manifest {MANIFEST} 0.0s done"
    assert len(written) == 6


def test_long_layers_report_bytes_now_and_then() -> None:
    tracker = Tracker(EXPORT_ID)
    snap = running_then_done()[1]
    assert [e.kind for e in tracker.update(snap, 0.0)] == ["start", "start", "done"]
    assert tracker.update(snap, 5.0) == []
    assert [e.kind for e in tracker.update(snap, 10.5)] == ["progress"]
    assert PlainView.line(tracker.update(snap, 21.0)[0]) == (
        f"writing layer {LAYER_A} 1.0 MiB / 4.0 MiB"
    )


def test_queued_hint_comes_once() -> None:
    tracker = Tracker(EXPORT_ID)
    tracker.update(Snapshot(EXPORT_ID, "PENDING"), 0.0)
    assert not tracker.queued_too_long(5.0)
    assert tracker.queued_too_long(20.0)
    assert not tracker.queued_too_long(30.0)


def test_narrow_terminals_get_short_digests() -> None:
    name = f"writing layer {LAYER_A}"
    assert display_name(name, 180) == name
    assert display_name(name, 100) == "writing layer sha256:aaaaaaaaaaaa"


def test_the_client_keeps_results_as_long_as_the_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client marks submissions without importing the settings; same default, same env."""
    from tasks.settings import Settings
    from worker.client import Client

    monkeypatch.delenv("CACHESHIP_RESULT_EXPIRES", raising=False)
    assert Client("redis://127.0.0.1:1/0").result_expires == Settings().result_expires
    monkeypatch.setenv("CACHESHIP_RESULT_EXPIRES", "3600")
    assert Client("redis://127.0.0.1:1/0").result_expires == Settings().result_expires == 3600
    monkeypatch.delenv("CACHESHIP_REDIS_PATIENCE", raising=False)
    assert Client("redis://127.0.0.1:1/0").redis_patience == Settings().redis_patience
    monkeypatch.setenv("CACHESHIP_REDIS_PATIENCE", "30")
    assert Client("redis://127.0.0.1:1/0").redis_patience == Settings().redis_patience == 30


def test_help_and_export_import_neither_celery_nor_boto3() -> None:
    """What keeps ``cacheship --help`` and ``cacheship export`` fast: no Celery, no boto3."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from worker.cli import main\n"
        "main.get_command(None, 'export'); main.list_commands(None)\n"
        "for name in main.list_commands(None): main.get_command(None, name)\n"
        "print(sorted(m for m in ('celery', 'boto3', 'rich') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
