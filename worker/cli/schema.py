"""``cacheship schema``: the JSON schema of an export request."""

from __future__ import annotations

import json

import click


@click.command("schema", short_help="Print the JSON schema of an export request.")
def schema_command() -> None:
    """Print the JSON schema of an export request (what --request and Client.submit take)."""
    from tasks.request import request_schema

    click.echo(json.dumps(request_schema(), indent=2))
