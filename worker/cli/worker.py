"""``cacheship worker``: a Celery worker with cacheship's settings (same as celery -A worker)."""

from __future__ import annotations

import os
import sys

import click


def worker_argv(args: tuple[str, ...] | list[str], log_level: str) -> list[str]:
    """``python -m celery -A worker worker ...``, with a log level unless one is given."""
    argv = [sys.executable, "-m", "celery", "-A", "worker", "worker"]
    given = {a.split("=", 1)[0] for a in args}
    if not given & {"-l", "--loglevel"} and not any(
        a.startswith("-l") and len(a) > 2 and not a.startswith("--") for a in args
    ):
        argv += ["--loglevel", log_level]
    return [*argv, *args]


@click.command(
    "worker",
    short_help="Start a worker (celery worker options pass through).",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker_command(celery_args: tuple[str, ...]) -> None:
    """Start a worker: `celery -A worker worker` with every option passed through.

    Settings come from CACHESHIP_* environment variables (README: configuration);
    S3 credentials from AWS's usual chain. Examples:

    \b
    cacheship worker --concurrency 4
    cacheship worker --hostname copy1@%h --autoscale 8,2
    """
    from tasks.settings import Settings

    argv = worker_argv(celery_args, Settings().log_level)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)
