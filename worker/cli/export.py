"""``cacheship export``: enqueue an export, optionally follow it to the end."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING

import click

from worker.cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    check_redis,
    fail,
    parse_option_spec,
    redact,
    redis_option,
    resolve_redis_url,
)
from worker.cli.report import (
    dumps,
    error_line,
    failed,
    failure_json,
    ignored_error_line,
    summary_lines,
    took,
)
from worker.client import Client, redis_down_errors

if TYPE_CHECKING:
    from tasks.request import ExportRequest, LocalSpec, LocalTargetSpec, RegistrySpec, S3Spec
    from worker.client import Snapshot

# Rich, the request models and the watch view are imported where they are used: without
# --wait the command needs the models and redis-py only, and returns within a quarter second.


def _absolute(spec: LocalSpec | S3Spec | RegistrySpec) -> LocalSpec | S3Spec | RegistrySpec:
    """A relative ``src`` means the current directory here, not the worker's."""
    from tasks.request import LocalSpec

    if isinstance(spec, LocalSpec) and not os.path.isabs(spec.src):
        return spec.model_copy(update={"src": os.path.abspath(spec.src)})
    return spec


def _absolute_dest(
    spec: LocalTargetSpec | S3Spec | RegistrySpec,
) -> LocalTargetSpec | S3Spec | RegistrySpec:
    """A relative ``dest`` too."""
    from tasks.request import LocalTargetSpec

    if isinstance(spec, LocalTargetSpec) and not os.path.isabs(spec.dest):
        return spec.model_copy(update={"dest": os.path.abspath(spec.dest)})
    return spec


def check_local_source(
    spec: LocalSpec | S3Spec | RegistrySpec, given: str, option: str
) -> None:
    """Refuse at enqueue time what the workers would refuse, when this host can tell.

    With ``CACHESHIP_SOURCE_ROOTS`` set here (the demo's env file and the compose ``.env``
    set it: the CLI runs where the workers' paths mean the same), the directory must lie
    under those roots and be a BuildKit cache. Without it, the workers may see another
    filesystem: only a directory that exists here (or a relative ``src``, which was resolved
    here) is checked to be a cache; anything else is left to the workers, whose error names
    the setting.
    """
    from tasks.request import LocalSpec

    if not isinstance(spec, LocalSpec):
        return
    from tasks.backends.local import dirs as localdir
    from tasks.backends.source import SourceError
    from tasks.envlist import env_paths

    roots = env_paths("CACHESHIP_SOURCE_ROOTS")  # what Settings reads, without building it
    try:
        if roots:
            localdir.resolve_source_dir(spec.src, roots)
        elif not os.path.isabs(given) or os.path.exists(spec.src):
            localdir.check_layout(Path(spec.src))
    except SourceError as exc:
        fail(f"{option}: {exc}", EXIT_USAGE)


def check_lists(request: ExportRequest, source_option: str, target_option: str) -> None:
    """Refuse at enqueue an endpoint or bucket the lists in this environment forbid.

    The lists are the workers' settings (``CACHESHIP_S3_ENDPOINT_URL``,
    ``CACHESHIP_ALLOWED_ENDPOINTS``, ``CACHESHIP_ALLOWED_BUCKETS``,
    ``CACHESHIP_READABLE_BUCKETS``); where none is set here, the workers decide.
    """
    from tasks.policy import check_spec, policy_from_env
    from tasks.request import RequestError, S3Spec

    try:
        policy = policy_from_env()
    except RequestError as exc:
        fail(str(exc), EXIT_USAGE)
    try:
        if isinstance(request.target, S3Spec):
            check_spec(request.target, policy, "target", "write")
    except RequestError as exc:
        fail(f"{target_option}: {exc}", EXIT_USAGE)
    try:
        if isinstance(request.source, S3Spec):
            check_spec(request.source, policy, "source", "read")
    except RequestError as exc:
        fail(f"{source_option}: {exc}", EXIT_USAGE)


def build_request(source: str | None, target: str | None, request: IO[str] | None) -> ExportRequest:
    """The request, checked as far as this host can tell; errors exit with 2."""
    built = _build_request(source, target, request)
    if request is not None:
        check_lists(built, "--request", "--request")
    else:
        check_lists(built, "--from", "--to")
    return built


def _build_request(
    source: str | None, target: str | None, request: IO[str] | None
) -> ExportRequest:
    """The request from ``--from``/``--to`` or from ``--request``; errors exit with 2."""
    from tasks.request import LocalSpec, RequestError, parse_request, parse_target

    if request is not None:
        if source or target:
            fail("give --request, or --from and --to, not both", EXIT_USAGE)
        try:
            parsed = parse_request(request.read())
        except RequestError as exc:
            fail(f"--request: {exc}", EXIT_USAGE)
        given = parsed.source.src if isinstance(parsed.source, LocalSpec) else ""
        absolute = _absolute(parsed.source)
        check_local_source(absolute, given, "--request")
        return parsed.model_copy(
            update={"source": absolute, "target": _absolute_dest(parsed.target)}
        )
    if not source or not target:
        fail("give --from SRC and --to DST (or --request FILE)", EXIT_USAGE)
    parsed_src = parse_option_spec(source, "--from", "source")
    src = _absolute(parsed_src)
    try:
        dst = _absolute_dest(parse_target(target))
    except RequestError as exc:
        fail(f"--to: {exc}", EXIT_USAGE)
    check_local_source(
        src, parsed_src.src if isinstance(parsed_src, LocalSpec) else "", "--from"
    )
    try:
        return parse_request(
            {
                "source": src.model_dump(mode="json", by_alias=True),
                "target": dst.model_dump(mode="json", by_alias=True),
            }
        )
    except RequestError as exc:  # pragma: no cover - both parts were validated above
        fail(str(exc), EXIT_USAGE)


def connect(redis_url: str | None) -> Client:
    """A client for the Redis the workers use, after checking it answers."""
    url = resolve_redis_url(redis_url)
    check_redis(url)
    return Client(url)


def follow(
    client: Client, export_id: str, as_json: bool, started: float, ignore_error: bool = False
) -> None:
    """Print the id, watch to the end, then print the summary (or the JSON).

    Exits non-zero on failure, unless ``ignore_error`` (the target's ``ignore-error``): a
    build farm that asked for it wants the failure reported, not its job failed. Ctrl-C
    from the moment the export is enqueued only stops the watching, and says how to pick
    it up again.
    """
    from rich.console import Console

    from worker.cli.watch import watch

    err = Console(stderr=True, highlight=False)
    try:
        if not as_json:
            click.echo(export_id)
        snap: Snapshot = watch(
            client,
            export_id,
            err,
            plain_write=lambda line: click.echo(line, err=True),
            patience=client.redis_patience,
            where=client.where,
        )
    except redis_down_errors() as exc:
        fail(
            redact(
                f"Redis at {client.where} unreachable for over {client.redis_patience:.0f}s "
                f"({type(exc).__name__}: {exc}); export {export_id} may go on: "
                f"cacheship status {export_id} --wait"
            )
        )
    except KeyboardInterrupt:
        click.echo(
            f"\nstopped watching; export {export_id} goes on. "
            f"Watch it again with: cacheship status {export_id} --wait",
            err=True,
        )
        raise SystemExit(EXIT_INTERRUPTED) from None
    if failed(snap):
        if as_json:
            click.echo(dumps(failure_json(snap)))
        if ignore_error:
            click.echo(redact(ignored_error_line(snap)), err=True)
            return
        fail(redact(error_line(snap)), EXIT_FAILED)
    result = snap.result or {}
    if as_json:
        click.echo(dumps(result))
    else:
        for line in summary_lines(result, took(snap, time.monotonic() - started)):
            click.echo(line)


@click.command("export", short_help="Enqueue an export (and follow it with --wait).")
@click.option(
    "--from",
    "source",
    metavar="SRC",
    help="The cache to copy: type=local,src=DIR (as --cache-to type=local,dest=DIR wrote it), "
    "type=s3,bucket=... or type=registry,ref=HOST/REPO[:TAG|@DIGEST]",
)
@click.option(
    "--to",
    "target",
    metavar="DST",
    help="Where to write it: type=s3,bucket=B[,region=R,name=N,prefix=P,...], "
    "type=registry,ref=HOST/REPO[:TAG] or type=local,dest=DIR[,tag=T] (buildx's form).",
)
@click.option(
    "--request",
    "request_file",
    type=click.File("r"),
    metavar="FILE",
    help="A JSON export request ('-' reads stdin) instead of --from/--to; see `cacheship schema`.",
)
@click.option("--wait", is_flag=True, help="Follow the export with live progress until it ends.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print JSON on stdout: the final result with --wait, else the export id.",
)
@redis_option
def export_command(
    source: str | None,
    target: str | None,
    request_file: IO[str] | None,
    wait: bool,
    as_json: bool,
    redis_url: str | None,
) -> None:
    """Enqueue an export of a BuildKit cache into S3 and print its id.

    \b
    cacheship export --from type=local,src=./cache --to type=s3,bucket=my-cache,region=eu-west-1
    cacheship export --request export.json --wait
    echo '{"source": ..., "target": ...}' | cacheship export --request - --json

    Ctrl-C while waiting stops watching, not the export: `cacheship status ID --wait`
    picks it up again.
    """
    request = build_request(source, target, request_file)
    client = connect(redis_url)
    started = time.monotonic()
    export_id = client.submit(request)
    if not wait:
        if as_json:
            click.echo(dumps({"export_id": export_id, "state": "PENDING"}))
        else:
            click.echo(export_id)
            click.echo(f"follow it with: cacheship status {export_id} --wait", err=True)
        return
    follow(client, export_id, as_json, started, request.target.ignore_error)
