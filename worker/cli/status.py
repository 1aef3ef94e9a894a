"""``cacheship status ID``: where an export stands, read from Redis (also once it is done)."""

from __future__ import annotations

import re
import time

import click

from worker.cli.common import EXIT_FAILED, EXIT_USAGE, fail, redact, redis_option
from worker.cli.export import connect, follow
from worker.cli.report import dumps, error_line, failed, status_json, status_lines

_TASK_ID = re.compile(r"^[0-9a-fA-F-]{8,64}$")


@click.command("status", short_help="Show where an export stands (--wait to follow it).")
@click.argument("export_id")
@click.option("--wait", is_flag=True, help="Follow it with live progress until it ends.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON on stdout.")
@redis_option
def status_command(export_id: str, wait: bool, as_json: bool, redis_url: str | None) -> None:
    """Show where export EXPORT_ID stands: every step, then its result or its error.

    Exits 0 when the export succeeded or is still running, 1 when it failed.
    """
    if not _TASK_ID.match(export_id):
        fail(f"{export_id[:80]!r} is not an export id (cacheship export prints one)", EXIT_USAGE)
    client = connect(redis_url)
    if wait:
        follow(client, export_id, as_json, time.monotonic())
        return
    snap = client.snapshot(export_id)
    if as_json:
        click.echo(dumps(status_json(snap)))
    else:
        for line in status_lines(snap):
            click.echo(line)
    if failed(snap):
        fail(redact(error_line(snap)), EXIT_FAILED)
