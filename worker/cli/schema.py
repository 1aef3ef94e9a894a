"""``cacheship schema``: the JSON schema of an export request."""

from __future__ import annotations

import json

import click

from tasks.request import request_schema


@click.command("schema", short_help="Print the JSON schema of an export request.")
def schema_command() -> None:
    """Print the JSON schema of an export request (what --request and Client.submit take)."""
    click.echo(json.dumps(request_schema(), indent=2))
