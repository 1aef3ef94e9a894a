"""``cacheship prune``: enqueue a garbage collection of an S3 cache, optionally follow it.

It runs on a worker like an export (the workers' credentials and allow-list); everything
the command line can check is checked here first, so a malformed duration or spec exits
with 2 before anything is enqueued.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

import click

from worker.cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    fail,
    human_bytes,
    parse_option_spec,
    redact,
    redis_option,
)
from worker.cli.export import connect
from worker.cli.report import dumps
from worker.client import Client, submitted_key

if TYPE_CHECKING:
    from celery.result import AsyncResult

# Celery, boto3 and the request models are imported where they are used, so that listing
# the commands (and --help) stays fast.

PRUNE_TASK = "cacheship.prune"
DONE = frozenset({"SUCCESS", "FAILURE", "REVOKED"})


def build_request(
    cache: str,
    grace: str,
    expire_names: str | None,
    keep_names: tuple[str, ...],
    dry_run: bool,
) -> dict[str, Any]:
    """The prune message, validated; errors exit with 2 and name the option."""
    from tasks.backends.s3.prune import parse_prune_request
    from tasks.policy import check_spec, policy_from_env
    from tasks.request import RequestError, S3Spec

    spec = parse_option_spec(cache, "--cache", "cache")
    if not isinstance(spec, S3Spec):
        fail("--cache: only type=s3 caches can be pruned", EXIT_USAGE)
    try:
        check_spec(spec, policy_from_env(), "cache", "write")  # prune deletes: write access
    except RequestError as exc:
        fail(f"--cache: {exc}", EXIT_USAGE)
    body: dict[str, Any] = {
        "cache": spec.model_dump(mode="json", by_alias=True),
        "grace": grace,
        "expire_names": expire_names,
        "keep_names": list(keep_names),
        "dry_run": dry_run,
    }
    try:
        request = parse_prune_request(body)
    except RequestError as exc:
        text = str(exc)
        for field, option in (
            ("grace", "--grace"),
            ("expire_names", "--expire-names"),
            ("keep_names", "--keep-names"),
        ):
            if text.startswith(field):
                text = f"{option}: {text[len(field) + 2 :]}"
        fail(text if text.startswith("--") else f"--cache: {text}", EXIT_USAGE)
    return request.model_dump(mode="json", by_alias=True)


def submit(client: Client, request: dict[str, Any]) -> str:
    """Enqueue on the workers' queue; Flower lists it as ``prune s3://bucket/prefix``."""
    prune_id = str(uuid.uuid4())
    cache = request["cache"]
    client._redis().set(submitted_key(prune_id), "1", ex=client.app.conf.result_expires)
    client.app.send_task(
        PRUNE_TASK,
        args=[request],
        task_id=prune_id,
        shadow=f"prune s3://{cache['bucket']}/{cache['prefix']}"
        + (" (dry run)" if request["dry_run"] else ""),
    )
    return prune_id


def follow(client: Client, prune_id: str, interval: float = 0.5) -> AsyncResult[Any]:
    """Wait for the end, printing each phase as it starts (stderr)."""
    from celery.result import AsyncResult

    result: AsyncResult[Any] = AsyncResult(prune_id, app=client.app)
    shown = ""
    while True:
        state = str(result.state)
        if state in DONE:
            return result
        info = result.info if state == "PROGRESS" else None
        if isinstance(info, dict):
            phase = str(info.get("phase", ""))
            if phase and phase != shown:
                click.echo(f"prune: {phase}", err=True)
                shown = phase
        elif state == "PENDING" and client.lost(prune_id):
            fail(f"prune {prune_id}: Redis has no record of it (lost or expired)")
        time.sleep(interval)


def summary_lines(report: dict[str, Any]) -> list[str]:
    """What a person reads at the end (the JSON has every count)."""
    verb = "would be removed" if report["dry_run"] else "removed"
    grace = report["grace_seconds"]
    lines = [
        f"prune {report['cache']} (grace {grace:g}s{', dry run' if report['dry_run'] else ''})",
        f"  names    {len(report['names_kept'])} kept, {len(report['names_removed'])} {verb}",
        f"  blobs    {report['blobs_kept']} kept ({report['blobs_kept_referenced']} referenced, "
        f"{report['blobs_kept_recent']} within the grace period, "
        f"{report['blobs_kept_in_flight']} in flight), {report['blobs_removed']} {verb}, "
        f"{human_bytes(report['bytes_freed'])} freed",
        f"  uploads  {report['uploads_aborted']} unfinished uploads aborted",
    ]
    elsewhere = report.get("roots_elsewhere", [])
    if elsewhere:
        # Names of other caches sharing the bucket: read, their blobs kept, never expired.
        lines.insert(2, f"  roots    {len(elsewhere)} names under other prefixes kept their blobs")
    for name in report["names_removed"][:20]:
        lines.append(f"  name {verb}: {name}")
    for problem in report["problems"]:
        lines.append(f"  problem  {problem}")
    return lines


@click.command("prune", short_help="Delete what no cache name references (S3 caches).")
@click.option(
    "--cache",
    required=True,
    metavar="SPEC",
    help="type=s3,bucket=B[,prefix=P,blobs_prefix=,manifests_prefix=,endpoint_url=,"
    "region=,use_path_style=] (name= is not used: every name is read).",
)
@click.option(
    "--grace",
    default="24h",
    show_default=True,
    metavar="DURATION",
    help="Only blobs and unfinished uploads older than this go (protects writers outside "
    "cacheship, such as BuildKit itself).",
)
@click.option(
    "--expire-names",
    metavar="DURATION",
    help="Also delete names whose object is older than this (except --keep-names).",
)
@click.option(
    "--keep-names",
    multiple=True,
    metavar="GLOB",
    help="Names never expired (fnmatch, '*' also matches '/'); repeatable.",
)
@click.option("--dry-run", is_flag=True, help="Report what would go; delete nothing.")
@click.option("--wait", is_flag=True, help="Follow the prune until it ends, then summarise.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print JSON on stdout: the report with --wait, else the prune id.",
)
@redis_option
def prune_command(
    cache: str,
    grace: str,
    expire_names: str | None,
    keep_names: tuple[str, ...],
    dry_run: bool,
    wait: bool,
    as_json: bool,
    redis_url: str | None,
) -> None:
    """Garbage-collect an S3 cache, safely beside running exports.

    \b
    cacheship prune --cache type=s3,bucket=ci-cache,region=eu-west-1 --dry-run --wait
    cacheship prune --cache type=s3,bucket=ci-cache --expire-names 720h --keep-names 'main' --wait

    Deletes every blob under the blobs prefix that no name references and that is older
    than --grace, and unfinished uploads older than --grace; with --expire-names, old names
    first. A name that cannot be read stops it: nothing is deleted (exit 1).
    """
    request = build_request(cache, grace, expire_names, keep_names, dry_run)
    client = connect(redis_url)
    prune_id = submit(client, request)
    if not wait:
        if as_json:
            click.echo(dumps({"prune_id": prune_id, "state": "PENDING"}))
        else:
            click.echo(prune_id)
            click.echo(f"follow it with: cacheship prune ... --wait, or Flower ({prune_id})",
                       err=True)
        return
    if not as_json:
        click.echo(prune_id)
    try:
        result = follow(client, prune_id)
    except KeyboardInterrupt:
        click.echo(f"\nstopped watching; prune {prune_id} goes on", err=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    if result.state != "SUCCESS":
        error = redact(str(result.info) if result.info else result.state.lower())
        if as_json:
            click.echo(dumps({"prune_id": prune_id, "state": result.state, "error": error}))
        fail(f"prune {prune_id} failed: {error}", EXIT_FAILED)
    raw: Any = result.result
    report: dict[str, Any] = dict(raw) if isinstance(raw, dict) else {}
    if as_json:
        click.echo(dumps({"prune_id": prune_id, "state": "SUCCESS", **report}))
    else:
        for line in summary_lines(report):
            click.echo(line)
    if not report.get("ok", False):
        fail(f"prune {prune_id} finished with problems: {report['problems'][0]}", EXIT_FAILED)
