"""``cacheship``: one console script, one click group, a module per command family."""

from __future__ import annotations

import click

from worker.cli.config import config


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Ship BuildKit build caches to S3 with Celery workers."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


main.add_command(config)
